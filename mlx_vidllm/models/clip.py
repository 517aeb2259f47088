"""CLIP ViT vision encoder (Video-LLaVA's image and video towers).

A CLS token is prepended to the patch grid, and the learned position embedding
covers it too. `pre_layrnorm` runs before the first layer. Features are taken
from `hidden_states[feature_layer]`, before `post_layernorm`, which only serves
CLIP's pooled output and is never used by LLaVA-style models.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .blocks import ViTEncoderLayer, layers_to_run


@dataclass
class CLIPVisionConfig:
    # ViT-L/14@224, the tower of every Video-LLaVA checkpoint (transformers' VideoLlavaConfig
    # sub-config defaults). Missing keys of a config.json are filled in by `from_hf`.
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = mx.zeros((cfg.hidden_size,))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.grid**2 + 1, cfg.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch_embedding(pixels)  # (N, g, g, D): MLX convs are channels-last
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        return mx.concatenate([cls, x], axis=1) + self.position_embedding.weight


class CLIPVisionModel(nn.Module):
    """Returns `hidden_states[feature_layer]` (N, 1 + grid*grid, D) for pixels (N, H, W, 3); CLS first."""

    def __init__(self, cfg: CLIPVisionConfig, feature_layer: int = -2):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, transformers' name
        # Only the layers that feed the selected hidden state are built and loaded.
        n = layers_to_run(cfg.num_hidden_layers, feature_layer)
        self.layers = [
            ViTEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                            cfg.hidden_act, cfg.layer_norm_eps)
            for _ in range(n)
        ]

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.embeddings(pixels.astype(self.embeddings.patch_embedding.weight.dtype))
        x = self.pre_layrnorm(x)  # hidden_states[0] is already normalized
        for layer in self.layers:
            x = layer(x)
        return x
