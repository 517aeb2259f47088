"""Image preprocessing in numpy/Pillow: resize, crop, normalize, and the
LLaVA-NeXT "anyres" tiling. Arrays are uint8 (H, W, 3) until `normalize`,
which returns float32 (H, W, 3): MLX convolutions are channels-last."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (H, W, 3) image array, got {image.dtype} {image.shape}")
        return image[..., :3]
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def resize(image: np.ndarray, height: int, width: int, resample=BICUBIC) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def resize_shortest_edge(image: np.ndarray, size: int, resample=BICUBIC) -> np.ndarray:
    """Aspect-preserving resize so the short side is `size` (transformers' rounding: int of the scaled long side)."""
    h, w = image.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    return resize(image, new_h, new_w, resample)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top < 0 or left < 0:  # smaller than the crop: pad with zeros, centered
        out = np.zeros((max(h, height), max(w, width), image.shape[2]), image.dtype)
        pt, pl = max(-top, 0), max(-left, 0)
        out[pt:pt + h, pl:pl + w] = image
        return center_crop(out, height, width)
    return image[top:top + height, left:left + width]


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float], scale: float = 1 / 255) -> np.ndarray:
    x = (image.astype(np.float64) * scale).astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def pad_to_square(image: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = np.asarray(fill, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = image
    return out


# --- anyres (LLaVA-NeXT / OneVision) -------------------------------------------------

def select_best_resolution(size_hw: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (h, w) pinpoint that keeps the most image resolution, then wastes the least area."""
    H, W = size_hw
    best, best_eff, best_waste = None, -1, math.inf
    for h, w in pinpoints:
        scale = min(w / W, h / H)
        eff = min(int(W * scale) * int(H * scale), W * H)
        waste = h * w - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def fit_size(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """Aspect-preserving size inside target: the filling side is exact, the other is ceil'ed."""
    H, W = size_hw
    th, tw = target_hw
    sw, sh = tw / W, th / H
    if sw < sh:
        return min(math.ceil(H * sw), th), tw
    return th, min(math.ceil(W * sh), tw)


def anyres_tiles(image: np.ndarray, pinpoints: Sequence[Sequence[int]], tile: int) -> list[np.ndarray]:
    """Resize into the best pinpoint, pad black (centered), cut into row-major tiles."""
    bh, bw = select_best_resolution(image.shape[:2], pinpoints)
    nh, nw = fit_size(image.shape[:2], (bh, bw))
    resized = resize(image, nh, nw)
    canvas = np.zeros((bh, bw, 3), np.uint8)
    top, left = (bh - nh) // 2, (bw - nw) // 2
    canvas[top:top + nh, left:left + nw] = resized
    return [canvas[r:r + tile, c:c + tile] for r in range(0, bh, tile) for c in range(0, bw, tile)]


def anyres_grid(size_hw: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """Number of tile rows and columns for an image of size (H, W)."""
    bh, bw = select_best_resolution(size_hw, pinpoints)
    return bh // tile, bw // tile


def unpadded_shape(size_hw: tuple[int, int], canvas_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Crop of a (canvas_h, canvas_w) feature canvas that holds the image without its padding.
    Returns (top, bottom, left, right)."""
    H, W = size_hw
    ch, cw = canvas_hw
    if W / H > cw / ch:
        new_h = int(round(H * (cw / W), 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(round(W * (ch / H), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def anyres_max_shape(h: int, w: int, grid: int, max_tiles: int) -> tuple[int, int]:
    """anyres_max_N: a canvas holding more than ~N tiles' worth of features is scaled down."""
    ratio = math.sqrt(h * w / (max_tiles * grid**2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return h, w


def anyres_token_count(size_hw: tuple[int, int], pinpoints, tile: int, grid: int, max_tiles: int) -> int:
    """Tokens of one anyres image: base grid + unpadded (downscaled) grid with a newline per row."""
    rows, cols = anyres_grid(size_hw, pinpoints, tile)
    top, bottom, left, right = unpadded_shape(size_hw, (rows * grid, cols * grid))
    h, w = anyres_max_shape(bottom - top, right - left, grid, max_tiles)
    return grid * grid + h * (w + 1)
