"""LLaVA-OneVision: SigLIP -> mlp2x_gelu projector -> Qwen2 (mlx-lm).

Images use anyres_max_9 (base view + unpadded tile canvas with a newline per
row); video frames are projected, bilinearly pooled 27x27 -> 14x14 and
followed by a single newline after the last frame (196*T + 1 tokens).

The video token layout and the pooling are options (`OneVisionConfig.video_layout`,
`.pool_mode`, set with `processor.configure(...)` or `load(..., video_layout=...)`):
LLaVA-Video was trained with the "grid" layout (a newline after every pooled row
of every frame, p*(p+1)*T tokens); transformers implements only "one_token".
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
import os
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from pathlib import Path

from PIL import Image

from ..errors import ModelError
from ..media import image as imgops
from ..media.image import anyres_grid, anyres_max_shape, unpadded_shape
from ..processing import (ImageLike, NormalizeConfig, Processor, VideoLike, eos_token_ids, load_chat_template,
                          load_image, load_tokenizer, read_json)
from .blocks import LlavaModel, MLPProjector, bilinear_resize, merge_placeholders, pooled_size
from .decoder import build_decoder, warn_unused_keys
from .siglip import SiglipConfig, SiglipVisionModel

# How many frames go through the vision tower at once: bounds memory on long videos. SigLIP's MLP
# activations are ~50 MB per frame in float32; 4 frames (2,916 rows) still keep the matmuls efficient.
VISION_CHUNK = 4

# Where image_newline goes in a video (LLaVA-NeXT's mm_newline_position):
#   one_token: once after all frames (transformers' OneVision, p*p*T + 1)
#   grid:      after every pooled row of every frame (LLaVA-Video training, p*(p+1)*T)
#   frame:     after every frame (T*(p*p + 1));  no_token: nowhere (p*p*T)
VIDEO_LAYOUTS = ("one_token", "grid", "frame", "no_token")
# LLaVA-NeXT get_2dPool modes (stride 2): bilinear = interpolate to ceil(g/2) (align_corners=False),
# average / max = avg_pool2d / max_pool2d(2) (floor(g/2)).
POOL_MODES = ("bilinear", "average", "max")


def check_video_options(video_layout: str | None = None, pool_mode: str | None = None) -> None:
    if video_layout is not None and video_layout not in VIDEO_LAYOUTS:
        raise ModelError(f"video_layout {video_layout!r} is not one of {', '.join(VIDEO_LAYOUTS)}")
    if pool_mode is not None and pool_mode not in POOL_MODES:
        raise ModelError(f"pool_mode {pool_mode!r} is not one of {', '.join(POOL_MODES)}")


def video_pooled_side(grid: int, pool_mode: str) -> int:
    """Side of a frame's feature grid after get_2dPool (stride 2)."""
    return pooled_size(grid) if pool_mode == "bilinear" else grid // 2


def video_token_count(grid: int, num_frames: int, video_layout: str = "one_token", pool_mode: str = "bilinear") -> int:
    """Visual tokens of one video of `num_frames` frames."""
    p = video_pooled_side(grid, pool_mode)
    per_frame = {"grid": p * (p + 1), "frame": p * p + 1}.get(video_layout, p * p)
    return num_frames * per_frame + (1 if video_layout == "one_token" else 0)


# The keys of a transformers LlavaOnevisionConfig that OneVisionConfig.from_hf reads.
ONEVISION_CONFIG_KEYS = {
    "vision_config", "text_config", "image_token_index", "image_token_id", "video_token_index",
    "video_token_id", "image_grid_pinpoints", "vision_feature_layer", "vision_aspect_ratio",
    "projector_hidden_act", "tie_word_embeddings", "vision_feature_select_strategy",
    "multimodal_projector_bias", "image_seq_length", "video_seq_length",
}


@dataclass
class OneVisionConfig:
    vision: SiglipConfig
    text_config: dict
    image_token_id: int
    video_token_id: int
    image_grid_pinpoints: list = field(default_factory=list)
    vision_feature_layer: int = -1
    vision_aspect_ratio: str = "anyres_max_9"
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool | None = None
    video_layout: str = "one_token"  # see VIDEO_LAYOUTS
    pool_mode: str = "bilinear"  # see POOL_MODES

    @property
    def max_tiles(self) -> int:
        return int(self.vision_aspect_ratio.removeprefix("anyres_max_"))

    @classmethod
    def from_hf(cls, config: dict) -> "OneVisionConfig":
        """Read a transformers LlavaOnevisionConfig dict (v4 or v5)."""
        vision_keys = {f.name for f in fields(SiglipConfig)}
        vc = config.get("vision_config", {})
        warn_unused_keys("vision_config", vc, vision_keys | {"vision_use_head", "attention_dropout"})
        if vc.get("vision_use_head"):
            pass  # the pooling head is never used by LLaVA; its weights are dropped in sanitize
        strategy = config.get("vision_feature_select_strategy", "full")
        if strategy != "full":
            raise ValueError(f"vision_feature_select_strategy={strategy!r}: SigLIP has no CLS, expected 'full'")
        if config.get("multimodal_projector_bias", True) is not True:
            raise ValueError("multimodal_projector_bias=False is not supported")
        warn_unused_keys("config", config, ONEVISION_CONFIG_KEYS)
        return cls(
            vision=SiglipConfig(**{k: v for k, v in vc.items() if k in vision_keys}),
            text_config=config["text_config"],
            image_token_id=config.get("image_token_id", config.get("image_token_index")),
            video_token_id=config.get("video_token_id", config.get("video_token_index")),
            image_grid_pinpoints=config.get("image_grid_pinpoints", []),
            vision_feature_layer=config.get("vision_feature_layer", -1),
            vision_aspect_ratio=config.get("vision_aspect_ratio", "anyres_max_9"),
            projector_hidden_act=config.get("projector_hidden_act", "gelu"),
            tie_word_embeddings=config.get("tie_word_embeddings"),
        )


class Model(LlavaModel):
    def __init__(self, config: OneVisionConfig, tie_word_embeddings: bool | None = None):
        super().__init__()
        self.config = config
        d_text = config.text_config["hidden_size"]
        self.vision_tower = SiglipVisionModel(config.vision, config.vision_feature_layer)
        self.multi_modal_projector = MLPProjector(config.vision.hidden_size, d_text, config.projector_hidden_act)
        self.image_newline = mx.zeros((d_text,))
        tie = tie_word_embeddings if tie_word_embeddings is not None else config.tie_word_embeddings
        self.language_model = build_decoder(config.text_config, tie)

    # --- vision -> projected tokens ----------------------------------------------------

    def encode_frames(self, pixels: mx.array, reduce: Callable[[mx.array], mx.array] | None = None) -> mx.array:
        """(N, S, S, 3) -> projected patch features (N, grid*grid, D), VISION_CHUNK frames at a time; `reduce`
        (a video's pooling) is applied per chunk, so only the reduced features of a long video are kept."""
        out = []
        for i in range(0, pixels.shape[0], VISION_CHUNK):
            feats = self.multi_modal_projector(self.vision_tower(pixels[i:i + VISION_CHUNK]))
            feats = reduce(feats) if reduce is not None else feats
            mx.eval(feats)
            out.append(feats)
        return mx.concatenate(out) if len(out) > 1 else out[0]

    def image_features(
        self, pixel_values: mx.array, image_sizes: Sequence[Sequence[int]], batch_num_images: Sequence[int]
    ) -> list[mx.array]:
        """One (tokens, D) block per image, in prompt order."""
        cfg, g = self.config, self.config.vision.grid
        feats = self.encode_frames(pixel_values)
        multi = [n > 1 for n in batch_num_images for _ in range(n)]
        blocks, start = [], 0
        for (H, W), is_multi in zip(image_sizes, multi):
            if is_multi:  # multi-image prompts: one padded-square view, no tiles
                blocks.append(mx.concatenate([feats[start], self.image_newline[None]]))
                start += 1
                continue
            rows, cols = anyres_grid((H, W), cfg.image_grid_pinpoints, cfg.vision.image_size)
            base, tiles = feats[start], feats[start + 1:start + 1 + rows * cols]
            start += 1 + rows * cols
            # tiles (rows*cols, g*g, D) -> one (rows*g, cols*g, D) canvas, row-major over tiles
            canvas = tiles.reshape(rows, cols, g, g, -1).transpose(0, 2, 1, 3, 4).reshape(rows * g, cols * g, -1)
            top, bottom, left, right = unpadded_shape((H, W), canvas.shape[:2])
            canvas = canvas[top:bottom, left:right]
            h, w = anyres_max_shape(*canvas.shape[:2], g, cfg.max_tiles)
            canvas = bilinear_resize(canvas[None], h, w)[0]
            newline = mx.broadcast_to(self.image_newline, (h, 1, canvas.shape[-1])).astype(canvas.dtype)
            grid_tokens = mx.concatenate([canvas, newline], axis=1).reshape(-1, canvas.shape[-1])
            blocks.append(mx.concatenate([base, grid_tokens]))
        if start != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} views, image_sizes account for {start}")
        return blocks

    def video_features(self, frames: mx.array) -> mx.array:
        """(T, S, S, 3) -> visual tokens, by default (196*T + 1, D): pooled frames in time order, then one newline.

        Other `config.video_layout` / `config.pool_mode` values follow LLaVA-NeXT's get_2dPool and
        add_token_per_grid / add_token_per_frame (see VIDEO_LAYOUTS)."""
        g = self.config.vision.grid
        layout, mode = self.config.video_layout, self.config.pool_mode
        check_video_options(layout, mode)
        p = video_pooled_side(g, mode)

        def pool(feats: mx.array) -> mx.array:  # (t, g*g, D) -> (t, p, p, D): LLaVA-NeXT's get_2dPool
            x = feats.reshape(-1, g, g, feats.shape[-1])
            if mode == "bilinear":
                return bilinear_resize(x, p, p)
            # avg_pool2d / max_pool2d with kernel = stride = 2, no padding: a trailing odd row/column is dropped
            x = x[:, : 2 * p, : 2 * p].reshape(x.shape[0], p, 2, p, 2, x.shape[-1])
            return x.mean(axis=(2, 4)) if mode == "average" else x.max(axis=(2, 4))

        x = self.encode_frames(frames, reduce=pool)
        T, D = x.shape[0], x.shape[-1]
        if (layout, mode) == ("one_token", "bilinear"):  # transformers' OneVision
            return mx.concatenate([x.reshape(T * p * p, D), self.image_newline[None].astype(x.dtype)])
        newline = self.image_newline.astype(x.dtype)
        if layout == "grid":
            x = mx.concatenate([x, mx.broadcast_to(newline, (T, p, 1, D))], axis=2)
        elif layout == "frame":
            x = mx.concatenate([x.reshape(T, p * p, D), mx.broadcast_to(newline, (T, 1, D))], axis=1)
        x = x.reshape(-1, D)
        return mx.concatenate([x, newline[None]]) if layout == "one_token" else x

    # --- merge and decode ----------------------------------------------------------------

    def get_input_embeddings(
        self,
        input_ids: mx.array | np.ndarray,
        pixel_values: mx.array | np.ndarray | None = None,
        image_sizes: Sequence[Sequence[int]] | None = None,
        batch_num_images: Sequence[int] | None = None,
        pixel_values_videos: Sequence | mx.array | np.ndarray | None = None,
        **unused,
    ) -> mx.array:
        """Text embeddings with every placeholder replaced by its visual features: (L, D)."""
        ids = np.asarray(input_ids).reshape(-1)
        embeds = self.language_model.model.embed_tokens(mx.array(ids))
        if pixel_values is not None and len(pixel_values):
            sizes = np.asarray(image_sizes).reshape(-1, 2).tolist()
            counts = list(batch_num_images) if batch_num_images is not None else [1] * len(sizes)
            blocks = self.image_features(mx.array(pixel_values), sizes, counts)
            embeds = merge_placeholders(embeds, ids, self.config.image_token_id, mx.concatenate(blocks), "image")
        if pixel_values_videos is not None and len(pixel_values_videos):
            videos = [self.video_features(mx.array(v)) for v in pixel_values_videos]
            embeds = merge_placeholders(embeds, ids, self.config.video_token_id, mx.concatenate(videos), "video")
        return embeds


class OneVisionProcessor(Processor):
    """LLaVA-OneVision: anyres_max_9 images, 384x384 squashed video frames."""

    def __init__(self, tokenizer, chat_template, eos_ids, model_config, norm: NormalizeConfig, size: int,
                 resample: int):
        super().__init__(tokenizer, chat_template, eos_ids)
        self.config = model_config
        self.norm = norm
        self.size = size
        self.resample = Image.Resampling(resample)
        self.image_token_id = model_config.image_token_id
        self.video_token_id = model_config.video_token_id
        self.check_placeholder_tokens()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model_config) -> "OneVisionProcessor":
        path = Path(path)
        pp_file = path / "preprocessor_config.json"
        if not pp_file.exists():
            raise ModelError(f"{path}: preprocessor_config.json is missing")
        pp = read_json(pp_file)
        size = pp.get("size", {})
        side = size.get("height", size.get("shortest_edge", model_config.vision.image_size))
        tokenizer = load_tokenizer(path)
        return cls(tokenizer, load_chat_template(path, tokenizer), eos_token_ids(path, tokenizer),
                   model_config, NormalizeConfig.from_preprocessor(pp, path), side, pp.get("resample", 3))

    @property
    def grid(self) -> int:
        return self.config.vision.grid

    def frame_transform(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB").resize((self.size, self.size), resample=self.resample)

    def preprocess_images(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """All views of all images stacked (N, S, S, 3), and the token count of each image."""
        S, cfg = self.size, self.config
        views, counts = [], []
        for image in images:
            if len(images) == 1:
                tiles = imgops.anyres_tiles(image, cfg.image_grid_pinpoints, S)
                views += [imgops.resize(image, S, S, self.resample)] + tiles
                counts.append(imgops.anyres_token_count(image.shape[:2], cfg.image_grid_pinpoints, S,
                                                        self.grid, cfg.max_tiles))
            else:  # multi-image prompts: no tiles, pad to a square with the mean colour
                fill = [int(m * 255) for m in self.norm.mean]
                views.append(imgops.resize(imgops.pad_to_square(image, fill), S, S, self.resample))
                counts.append(self.grid**2 + 1)
        return np.stack([self.norm(v) for v in views]), counts

    def preprocess_video(self, frames: np.ndarray) -> np.ndarray:
        S = self.size
        return np.stack([self.norm(imgops.resize(f, S, S, self.resample)) for f in frames])

    @property
    def tokens_per_frame(self) -> int:
        return self.video_token_count(1) - self.video_token_count(0)

    def video_token_count(self, num_frames: int) -> int:
        return video_token_count(self.grid, num_frames, self.config.video_layout, self.config.pool_mode)

    @property
    def cache_settings(self) -> tuple:
        """What, besides the media and the sampling arguments, the visual features depend on (chat media cache)."""
        return (self.config.video_layout, self.config.pool_mode)

    def configure(self, video_layout: str | None = None, pool_mode: str | None = None) -> None:
        """Change the video token layout / pooling (shared with the model: its config is the same object)."""
        check_video_options(video_layout, pool_mode)
        if video_layout is not None:
            self.config.video_layout = video_layout
        if pool_mode is not None:
            self.config.pool_mode = pool_mode

    def __call__(self, text: str, images: Sequence[ImageLike] | None = None,
                 videos: Sequence[VideoLike] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        images = [load_image(i) for i in images or []]
        if images:
            out["pixel_values"], counts = self.preprocess_images(images)
            out["image_sizes"] = np.asarray([i.shape[:2] for i in images], dtype=np.int64)
            out["batch_num_images"] = [len(images)]
        text = self.expand(text, self.image_token, counts if images else [], self.image_token)
        if videos:
            pix = [self.preprocess_video(self._frames(v)) for v in videos]
            out["pixel_values_videos"] = pix
            text = self.expand(text, self.video_token, [self.video_token_count(len(p)) for p in pix],
                               self.video_token)
        else:
            text = self.expand(text, self.video_token, [], self.video_token)
        out["input_ids"] = self.tokenize(text)
        return out
