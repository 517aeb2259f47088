"""Building blocks shared by every family: ViT encoder layer, MLP projector,
bilinear resize (PyTorch semantics) and the placeholder merge."""

from __future__ import annotations

import math
from functools import partial
import re
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu_kernels

ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu": nn.gelu,  # exact erf
    # numpy on the CPU backend (see cpu_kernels.py), in place: every call site activates a fresh Linear output
    "gelu_pytorch_tanh": partial(cpu_kernels.gelu_tanh, inplace=True),
    "gelu_new": partial(cpu_kernels.gelu_tanh, inplace=True),
    "quick_gelu": partial(cpu_kernels.quick_gelu, inplace=True),
    "silu": nn.silu,
}


def activation(name: str) -> Callable[[mx.array], mx.array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (known: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with separate q/k/v/out projections (CLIP, SigLIP)."""

    def __init__(self, dims: int, num_heads: int, bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims, bias=bias)
        self.k_proj = nn.Linear(dims, dims, bias=bias)
        self.v_proj = nn.Linear(dims, dims, bias=bias)
        self.out_proj = nn.Linear(dims, dims, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = cpu_kernels.attention(q, k, v, self.scale)  # mx.fast.scaled_dot_product_attention on Metal
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class VisionMLP(nn.Module):
    def __init__(self, dims: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden)
        self.fc2 = nn.Linear(hidden, dims)
        self.act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm; large float32 inputs on the CPU backend are normalized in numpy on every core."""

    def __call__(self, x: mx.array) -> mx.array:
        if "weight" in self and "bias" in self and cpu_kernels.use_numpy(x):
            return cpu_kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return super().__call__(x)


class ViTEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block, key names as in transformers' CLIP/SigLIP."""

    def __init__(self, dims: int, num_heads: int, mlp_dims: int, act: str, eps: float):
        super().__init__()
        self.self_attn = VisionAttention(dims, num_heads)
        self.layer_norm1 = LayerNorm(dims, eps=eps)
        self.mlp = VisionMLP(dims, mlp_dims, act)
        self.layer_norm2 = LayerNorm(dims, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def layers_to_run(num_layers: int, feature_layer: int) -> int:
    """How many encoder layers produce `hidden_states[feature_layer]`.

    transformers' hidden_states has num_layers+1 entries (entry 0 is the input
    to layer 0), so layer -1 needs all layers and -2 all but the last."""
    n = num_layers + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 0 <= n <= num_layers:
        raise ValueError(f"vision_feature_layer {feature_layer} is out of range for {num_layers} layers")
    return n


class MLPProjector(nn.Module):
    """`mlp2x_gelu`: Linear -> exact GELU -> Linear (all four families)."""

    def __init__(self, in_dims: int, out_dims: int, act: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_dims, out_dims)
        self.linear_2 = nn.Linear(out_dims, out_dims)
        self.act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(self.act(self.linear_1(x)))


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's bilinear interpolate (align_corners=False, no antialias)."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def bilinear_resize(x: mx.array, out_h: int, out_w: int) -> mx.array:
    """Resize (N, H, W, C) to (N, out_h, out_w, C) like F.interpolate(mode="bilinear")."""
    _, H, W, _ = x.shape
    if (H, W) == (out_h, out_w):
        return x
    i0, i1, w = _bilinear_taps(H, out_h)
    w = mx.array(w, dtype=x.dtype)[None, :, None, None]
    x = x[:, mx.array(i0)] * (1 - w) + x[:, mx.array(i1)] * w
    j0, j1, w = _bilinear_taps(W, out_w)
    w = mx.array(w, dtype=x.dtype)[None, None, :, None]
    return x[:, :, mx.array(j0)] * (1 - w) + x[:, :, mx.array(j1)] * w


def pooled_size(grid: int) -> int:
    """Side of a frame's grid after the stride-2 bilinear pool (ceil, as in LLaVA-NeXT's get_2dPool)."""
    return math.ceil(grid / 2)


def merge_placeholders(
    embeds: mx.array, input_ids: mx.array, token_id: int, features: mx.array, what: str
) -> mx.array:
    """Write `features` (N, D) in order over the positions of `token_id` in `input_ids` (L,)."""
    positions = np.flatnonzero(np.asarray(input_ids) == token_id)
    if len(positions) != features.shape[0]:
        raise ValueError(
            f"{what} features and {what} tokens do not match: {len(positions)} placeholder tokens "
            f"in the prompt, {features.shape[0]} features"
        )
    if len(positions) == 0:
        return embeds
    embeds[mx.array(positions)] = features.astype(embeds.dtype)
    return embeds


def sanitize_llava(model: nn.Module, weights: dict) -> dict:
    """Shared by the LLaVA-style families: conv layout, unused vision-tower layers, tied lm_head.

    Every child module with `layers` other than the decoder is a vision tower (OneVision's `vision_tower`,
    Video-LLaVA's `image_tower` and `video_tower`); its stored layers past the built ones are dropped."""
    out = {}
    built = {name: len(tower.layers) for name, tower in model.children().items() if hasattr(tower, "layers")
             and name != "language_model"}
    layer_re = re.compile(r"^(\w+)\.layers\.(\d+)\.")
    for key, value in weights.items():
        m = layer_re.match(key)
        if m and m.group(1) in built and int(m.group(2)) >= built[m.group(1)]:
            continue  # layers past the selected feature layer are never run
        if key.endswith("patch_embedding.weight") and value.ndim == 4 and value.shape[1] == 3:
            value = value.transpose(0, 2, 3, 1)  # PyTorch (O, I, kh, kw) -> MLX (O, kh, kw, I)
        out[key] = value
    lm = model.language_model
    if "lm_head" in lm and "language_model.lm_head.weight" not in out:
        # Tied checkpoints (Qwen2-0.5B) may omit lm_head: it is the embedding matrix.
        out["language_model.lm_head.weight"] = out["language_model.model.embed_tokens.weight"]
    lm_weights = {k[len("language_model."):]: v for k, v in out.items() if k.startswith("language_model.")}
    lm_weights = lm.sanitize(lm_weights) if hasattr(lm, "sanitize") else lm_weights
    out = {k: v for k, v in out.items() if not k.startswith("language_model.")}
    out.update({f"language_model.{k}": v for k, v in lm_weights.items()})
    return out


def _cpu_quantized_product(x: mx.array, layer) -> mx.array | None:
    """x @ Wᵀ for a quantized layer's W on MLX's CPU backend; None where MLX's own kernel serves (Metal,
    kernels off). Many rows: a float product over W dequantized block by block. A few: MLX's
    quantized kernel, split across one stream per core."""
    if mx.default_device() != mx.cpu:
        return None
    quantized = (layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits, layer.mode)
    if x.size // x.shape[-1] >= PrefillQuantizedLinear.ROWS:
        return cpu_kernels.dequantized_matmul(x, *quantized)
    if cpu_kernels.quantized_gemv_applies(x):
        return cpu_kernels.quantized_gemv(x, *quantized)
    return None


class PrefillQuantizedLinear(nn.QuantizedLinear):
    """A quantized Linear for MLX's CPU backend: inputs of many rows (prefill, vision) take a float
    matmul over the dequantized matrix, decoding steps the quantized kernel on every core.

    MLX's quantized matmul is fast for a few rows but, on the CPU backend, far slower than
    dequantize-then-matmul for thousands of rows: a 4-bit decoder must never make the time to first
    token worse than float. Metal keeps the quantized kernel everywhere."""

    # From this many rows on, dequantizing the matrix (numpy, all cores; the same cost for any number of
    # rows) beats MLX's CPU quantized kernel, whose cost grows with every row (a short follow-up question).
    ROWS = 4

    def __call__(self, x: mx.array) -> mx.array:
        y = _cpu_quantized_product(x, self)
        if y is None:
            return super().__call__(x)
        return y + self.bias if "bias" in self else y


class SplitQuantizedEmbedding(nn.QuantizedEmbedding):
    """A quantized tied LM head (Qwen2-0.5B: 151936 rows), on the CPU backend as PrefillQuantizedLinear."""

    def as_linear(self, x: mx.array) -> mx.array:
        y = _cpu_quantized_product(x, self)
        return super().as_linear(x) if y is None else y


def use_prefill_friendly_quantization(model: nn.Module) -> None:
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = PrefillQuantizedLinear
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = SplitQuantizedEmbedding


class LlavaModel(nn.Module):
    """What the LLaVA-style families share once they can embed a processed prompt:
    logits for it, the decoder's layers (for mlx-lm's caches), and weight sanitizing.
    Subclasses define `get_input_embeddings(input_ids, **media) -> (L, D)` and `language_model`."""

    def __call__(self, input_ids, cache=None, **media) -> mx.array:
        """Logits (1, L, vocab) for a processed prompt (the processor's output dict)."""
        ids = np.asarray(input_ids).reshape(1, -1)
        embeds = self.get_input_embeddings(ids, **media)
        return self.language_model(mx.array(ids), cache=cache, input_embeddings=embeds[None])

    @property
    def layers(self):
        return self.language_model.layers

    def sanitize(self, weights: dict) -> dict:
        """Weights already under our names -> exactly this module's parameters."""
        return sanitize_llava(self, weights)
