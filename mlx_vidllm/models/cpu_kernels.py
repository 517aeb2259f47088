"""Activation and softmax kernels for MLX's CPU backend.

On Linux, MLX's CPU backend evaluates tanh/exp one element at a time on one
thread: the vision MLP's GELU alone took ~18% of a SigLIP layer here (1.07 s of
6 s for 8 frames), 4x slower than numpy's SIMD loops. On the CPU backend, for
large float32 inputs, these activations run in numpy across the machine's cores
instead (same formula, float32 rounding differences only). On Metal, and for
small inputs, MLX's own ops run unchanged.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import mlx.core as mx
import numpy as np

MIN_ELEMENTS = 1 << 18  # below this the hand-off costs more than it saves
_THREADS = max(1, os.cpu_count() or 1)
_POOL = ThreadPoolExecutor(_THREADS) if _THREADS > 1 else None
_ENABLED = os.environ.get("MLX_VIDLLM_CPU_KERNELS", "1") != "0"


def use_numpy(x: mx.array) -> bool:
    return _ENABLED and x.dtype == mx.float32 and x.size >= MIN_ELEMENTS and mx.default_device() == mx.cpu


BLOCK_ELEMENTS = 1 << 16  # ~256 KB of float32 per task: every pass of a kernel stays in cache


def _rows_in_parallel(fn: Callable[[np.ndarray, np.ndarray], None], x: mx.array, inplace: bool = False) -> mx.array:
    """Apply fn(src, dst) to cache-sized row blocks of x on every core (numpy releases the GIL in its loops).

    inplace=True writes the result over x's own (already evaluated) buffer and returns x: no 100+ MB copy
    back into MLX. Only for arrays the caller just computed and nothing else refers to (a matmul output)."""
    src = np.array(x, copy=False).reshape(-1, x.shape[-1])
    dst = src if inplace else np.empty_like(src)
    rows = max(1, BLOCK_ELEMENTS // src.shape[-1])
    spans = [(i, min(i + rows, src.shape[0])) for i in range(0, src.shape[0], rows)]

    def run(span):
        a, b = span
        # in place: the kernel reads a cache-resident copy of its block while writing the block itself
        fn(src[a:b].copy() if inplace else src[a:b], dst[a:b])

    if _POOL is None or len(spans) == 1:
        for span in spans:
            run(span)
    else:
        list(_POOL.map(run, spans, chunksize=max(1, len(spans) // (4 * _THREADS))))
    return x if inplace else mx.array(dst.reshape(x.shape))


def _gelu_tanh(src: np.ndarray, dst: np.ndarray) -> None:
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in place in dst
    np.multiply(src, src, out=dst)
    dst *= np.float32(0.044715)
    dst += 1
    dst *= src
    dst *= np.float32(math.sqrt(2 / math.pi))
    np.tanh(dst, out=dst)
    dst += 1
    dst *= src
    dst *= np.float32(0.5)


def _quick_gelu(src: np.ndarray, dst: np.ndarray) -> None:
    # x * sigmoid(1.702 x) = x / (1 + exp(-1.702 x))
    np.multiply(src, np.float32(-1.702), out=dst)
    np.exp(dst, out=dst)
    dst += 1
    np.divide(src, dst, out=dst)


def gelu_tanh(x: mx.array, inplace: bool = False) -> mx.array:
    if not use_numpy(x):
        return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return _rows_in_parallel(_gelu_tanh, x, inplace)


def quick_gelu(x: mx.array, inplace: bool = False) -> mx.array:
    if not use_numpy(x):
        return x * mx.sigmoid(1.702 * x)
    return _rows_in_parallel(_quick_gelu, x, inplace)


def _softmax(src: np.ndarray, dst: np.ndarray) -> None:
    np.subtract(src, src.max(axis=-1, keepdims=True), out=dst)
    np.exp(dst, out=dst)
    dst /= dst.sum(axis=-1, keepdims=True)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Bidirectional attention (B, H, L, d). On Metal (and for small inputs) this is MLX's fused
    kernel; on the CPU backend, whose attention is unfused anyway, the two matmuls stay in MLX
    (BLAS) and only the softmax runs in numpy on all cores."""
    if not use_numpy(q) or q.shape[-2] * k.shape[-2] * q.shape[0] * q.shape[1] < MIN_ELEMENTS:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    return _rows_in_parallel(_softmax, scores, inplace=True) @ v


# --- the decoder's causal attention (prefill) ---------------------------------------------------------

QUERY_BLOCK = 512  # query rows per block: bounds the score matrix for long prompts (13k-token videos)


def _causal_softmax(first: int, rows: int) -> Callable[[np.ndarray, np.ndarray], None]:
    """Softmax over blocks of `rows` query rows whose row i may see key columns [0, first + i]."""

    def fn(src: np.ndarray, dst: np.ndarray) -> None:
        width = src.shape[-1] // rows
        out = dst.reshape(-1, rows, width)
        np.copyto(out, src.reshape(-1, rows, width))
        hidden = np.arange(width)[None, :] > (first + np.arange(rows))[:, None]
        out[:, hidden] = -np.inf
        out -= out.max(axis=-1, keepdims=True)
        np.exp(out, out=out)
        out /= out.sum(axis=-1, keepdims=True)

    return fn


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q kᵀ · scale + causal mask) v for q (B, H, L, d) and k, v (B, Hkv, S, d), S >= L: query i
    sees keys up to S - L + i (the prompt continues a cached prefix). Grouped-query heads are matched by
    reshaping q, never by copying k/v. Blocks of queries keep memory bounded."""
    B, H, L, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep, offset = H // Hkv, S - L
    qg = (q * scale).reshape(B, Hkv, rep, L, d)
    kt = k.swapaxes(-1, -2)[:, :, None]
    vg = v[:, :, None]
    out = []
    for start in range(0, L, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, L)
        width = offset + stop  # keys any query of this block may see
        scores = qg[:, :, :, start:stop] @ kt[..., :width]
        first = offset + start  # the block's first query sees keys [0, first]
        rows = stop - start
        # one row per (batch, head): the block's (rows, width) scores flattened, split across cores by head
        probs = _rows_in_parallel(_causal_softmax(first, rows), scores.reshape(-1, rows * width), inplace=True)
        out.append(probs.reshape(scores.shape) @ vg[..., :width, :])
    return mx.concatenate(out, axis=3).reshape(B, H, L, d) if len(out) > 1 else out[0].reshape(B, H, L, d)


def _decoder_sdpa(original):
    def sdpa(queries, keys, values, cache, scale, mask, sinks=None):
        if (isinstance(mask, str) and mask == "causal" and sinks is None and not hasattr(cache, "bits")
                and use_numpy(queries) and queries.shape[-2] * keys.shape[-2] * queries.shape[1] >= MIN_ELEMENTS):
            return causal_attention(queries, keys, values, scale)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    sdpa.cpu_kernels = True
    return sdpa


def install_decoder_attention(model_module) -> None:
    """Route an mlx-lm model module's attention through `causal_attention` for large CPU prefills.
    mlx-lm's own function still serves decoding steps, masks given as arrays, quantized caches and Metal."""
    current = getattr(model_module, "scaled_dot_product_attention", None)
    if current is not None and not getattr(current, "cpu_kernels", False):
        model_module.scaled_dot_product_attention = _decoder_sdpa(current)
