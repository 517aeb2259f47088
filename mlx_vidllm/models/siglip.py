"""SigLIP vision encoder (LLaVA-OneVision, LLaVA-Video).

No CLS token; the last 6 pixel rows/columns of a 384 input fall outside the
27x27 patch grid ("valid" convolution). Features are taken before
`post_layernorm`, which the checkpoints store but the LLaVA models never use.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .blocks import ViTEncoderLayer, layers_to_run


@dataclass
class SiglipConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Embedding(cfg.grid**2, cfg.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch_embedding(pixels)  # (N, g, g, D): MLX convs are channels-last
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x + self.position_embedding.weight


class SiglipVisionModel(nn.Module):
    """Returns `hidden_states[feature_layer]` for pixels (N, H, W, 3)."""

    def __init__(self, cfg: SiglipConfig, feature_layer: int = -1):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        # Only the layers that feed the selected hidden state are built and loaded.
        n = layers_to_run(cfg.num_hidden_layers, feature_layer)
        self.layers = [
            ViTEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                            cfg.hidden_act, cfg.layer_norm_eps)
            for _ in range(n)
        ]

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.embeddings(pixels.astype(self.embeddings.patch_embedding.weight.dtype))
        for layer in self.layers:
            x = layer(x)
        return x
