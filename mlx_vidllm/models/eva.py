"""EVA-ViT-G (LAVIS `create_eva_vit_g`, as LLaMA-VID runs it).

39 pre-LayerNorm blocks of width 1408 (16 heads of 88, MLP 6144, exact GELU,
LayerNorm eps 1e-6). Attention uses one fused `qkv` projection without bias
plus separate `q_bias` / `v_bias`; the k bias is zero. A CLS token and a
learned absolute position embedding are added; there is no final norm. The
output is the last block's output for all 1 + grid*grid tokens (CLS first).

The blocks reuse the shared ViT layer structure (`layer_norm1`, `mlp.fc1/fc2`,
`layer_norm2`); only the attention differs. The released `eva_vit_g.pth` holds
one block more than the model runs: the depth comes from the config and
extra stored blocks are dropped (`sanitize`). A position embedding stored
for another grid (224 weights used by the 336 models) is resized bicubically,
exactly as LAVIS' `interpolate_pos_embed` does at load time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu_kernels
from .blocks import ViTEncoderLayer


@dataclass
class EVAConfig:
    # EVA-ViT-G as built by LLaMA-VID's EVAVisionTowerLavis (LAVIS create_eva_vit_g arguments).
    hidden_size: int = 1408
    intermediate_size: int = 6144  # int(1408 * 4.3637)
    num_hidden_layers: int = 39
    num_attention_heads: int = 16  # 1408 // 88
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + 1


class EVAAttention(nn.Module):
    """Fused qkv without bias + (q_bias, 0, v_bias), scale head_dim**-0.5, then `proj`."""

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.qkv = nn.Linear(dims, 3 * dims, bias=False)
        self.q_bias = mx.zeros((dims,))
        self.v_bias = mx.zeros((dims,))
        self.proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        bias = mx.concatenate([self.q_bias, mx.zeros_like(self.v_bias), self.v_bias])
        qkv = (self.qkv(x) + bias).reshape(B, L, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        out = cpu_kernels.attention(qkv[0], qkv[1], qkv[2], self.scale)  # the fused kernel on Metal
        return self.proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class EVALayer(ViTEncoderLayer):
    """The shared pre-LN block (layer_norm1 -> attention, layer_norm2 -> MLP) with EVA's attention."""

    def __init__(self, cfg: EVAConfig):
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
                         cfg.layer_norm_eps)
        self.self_attn = EVAAttention(cfg.hidden_size, cfg.num_attention_heads)


class EVAVisionModel(nn.Module):
    """pixels (N, S, S, 3) channels-last -> last block output (N, 1 + grid*grid, D), CLS first."""

    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                     stride=cfg.patch_size)
        self.cls_token = mx.zeros((1, 1, cfg.hidden_size))
        self.pos_embed = mx.zeros((1, cfg.num_tokens, cfg.hidden_size))
        self.layers = [EVALayer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch_embedding(pixels.astype(self.patch_embedding.weight.dtype))  # (N, g, g, D)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        cls = mx.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = mx.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return x

    def sanitize(self, weights: dict, prefix: str = "vision_tower.") -> dict:
        """Drop stored blocks past the configured depth and LAVIS' unused heads; conv layout; pos-embed grid."""
        cfg = self.config
        out = {}
        layer_re = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
        unused = re.compile(re.escape(prefix) + r"(norm|fc_norm|head|mask_token)\b")
        for key, value in weights.items():
            if key.startswith(prefix):
                m = layer_re.match(key)
                if m and int(m.group(1)) >= cfg.num_hidden_layers:
                    continue  # eva_vit_g.pth stores 40 blocks, the model runs 39
                if unused.match(key):
                    continue  # defined (and commented out) in LAVIS: never used
                if key == f"{prefix}patch_embedding.weight" and value.ndim == 4 and value.shape[1] == cfg.num_channels \
                        and value.shape[-1] != cfg.num_channels:
                    value = value.transpose(0, 2, 3, 1)  # PyTorch (O, I, kh, kw) -> MLX (O, kh, kw, I)
                if key == f"{prefix}pos_embed" and value.shape[1] != cfg.num_tokens:
                    value = interpolate_pos_embed(value, cfg.grid)
            out[key] = value
        return out


# --------------------------------------------------------------------------- bicubic (PyTorch semantics)

_A = -0.75  # PyTorch's cubic convolution coefficient


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """The 4 tap weights of torch's upsample_bicubic2d for fractional offsets t: (n,) -> (n, 4)."""
    def conv1(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def conv2(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return np.stack([conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2(2.0 - t)], axis=-1)


def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of F.interpolate(mode="bicubic", align_corners=False) along one axis."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5  # not clamped for cubic
    base = np.floor(src)
    w = _cubic_weights(src - base)
    m = np.zeros((out_size, in_size), np.float64)
    for k in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), w[:, k])
    return m


def bicubic_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize (H, W, C) like torch.nn.functional.interpolate(mode="bicubic", align_corners=False), float64."""
    H, W, _ = x.shape
    x = np.einsum("oh,hwc->owc", _bicubic_matrix(H, out_h), x.astype(np.float64))
    return np.einsum("pw,owc->opc", _bicubic_matrix(W, out_w), x)


def interpolate_pos_embed(pos_embed, grid: int):
    """(1, 1 + g0*g0, D) -> (1, 1 + grid*grid, D): CLS kept, the patch grid resized bicubically."""
    arr = np.asarray(pos_embed.astype(mx.float32)) if isinstance(pos_embed, mx.array) else np.asarray(pos_embed)
    g0 = int(round((arr.shape[1] - 1) ** 0.5))
    if g0 * g0 != arr.shape[1] - 1:
        raise ValueError(f"pos_embed has {arr.shape[1]} positions, not 1 + a square grid")
    patches = bicubic_resize(arr[0, 1:].reshape(g0, g0, -1), grid, grid).reshape(grid * grid, -1)
    out = np.concatenate([arr[0, :1].astype(np.float64), patches])[None].astype(np.float32)
    dtype = pos_embed.dtype if isinstance(pos_embed, mx.array) else mx.float32
    return mx.array(out).astype(dtype)
