"""Kernels for MLX's CPU backend (Linux; a Mac runs Metal and never takes these paths).

MLX's CPU backend runs each op on one thread, evaluates tanh/exp one element at a time, has no fused
attention, hands one-row products to sgemm and runs its quantized kernels as plain loops. Where that
costs most, large float32 work goes to numpy on every core instead, reading and writing MLX's buffers
in place (zero-copy views; results in buffers from MLX's allocator):

- vision: GELU / quick GELU, LayerNorm, bidirectional attention per (frame, head, query block) in cache;
- decoder prefill: causal attention per (key/value head, query block), swiglu;
- decoder steps: OpenBLAS gemv for float layers and the tied LM head, one-query attention over the cache;
- 4-bit layers: numpy unpacking + float products for 4 rows and more (block by block in cache for short
  inputs), MLX's quantized kernel split across one stream per core for fewer.

Same formulas as MLX's ops (float32 rounding differences only; tests/test_cpu_kernels.py compares each
with MLX, the parity suite compares the models with PyTorch). On Metal, for small inputs and other dtypes
MLX's own ops run unchanged; MLX_VIDLLM_CPU_KERNELS=0 turns them all off.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .._blas import numpy_blas_single_thread

MIN_ELEMENTS = 1 << 18  # below this the hand-off costs more than it saves
_THREADS = max(1, os.cpu_count() or 1)
_POOL = ThreadPoolExecutor(_THREADS) if _THREADS > 1 else None
_ENABLED = os.environ.get("MLX_VIDLLM_CPU_KERNELS", "1") != "0"


def use_numpy(x: mx.array) -> bool:
    return _ENABLED and x.dtype == mx.float32 and x.size >= MIN_ELEMENTS and mx.default_device() == mx.cpu


def _parallel(run: Callable, tasks, chunksize: int = 1) -> None:
    """run(task) for every task on the thread pool (numpy releases the GIL in its loops)."""
    if _POOL is None or len(tasks) == 1:
        for task in tasks:
            run(task)
    else:
        list(_POOL.map(run, tasks, chunksize=chunksize))


def _views(*arrays: mx.array) -> list[np.ndarray]:
    """Evaluate MLX arrays and return zero-copy numpy views of them (strided where the arrays are)."""
    mx.eval(*arrays)
    return [np.array(a, copy=False) for a in arrays]


def _output(shape: tuple) -> tuple[mx.array, np.ndarray]:
    """A float32 array from MLX's allocator and a writable numpy view of it: kernels write their result
    in place, with no copy into MLX afterwards, in buffers MLX reuses (no fresh pages to fault in)."""
    result = mx.zeros(shape, mx.float32)
    mx.eval(result)
    return result, np.array(result, copy=False)


BLOCK_ELEMENTS = 1 << 16  # ~256 KB of float32 per task: every pass of a kernel stays in cache


def _rows_in_parallel(fn: Callable[[np.ndarray, np.ndarray], None], x: mx.array, inplace: bool = False) -> mx.array:
    """Apply fn(src, dst) to cache-sized row blocks of x on every core (numpy releases the GIL in its loops).

    inplace=True writes the result over x's own (already evaluated) buffer and returns x: no 100+ MB copy
    back into MLX. Only for arrays the caller just computed and nothing else refers to (a matmul output)."""
    src = np.array(x, copy=False).reshape(-1, x.shape[-1])
    result, dst = (x, src) if inplace else _output(x.shape)
    dst = dst.reshape(src.shape)
    rows = max(1, BLOCK_ELEMENTS // src.shape[-1])
    spans = [(i, min(i + rows, src.shape[0])) for i in range(0, src.shape[0], rows)]

    def run(span):
        a, b = span
        # in place: the kernel reads a cache-resident copy of its block while writing the block itself
        fn(src[a:b].copy() if inplace else src[a:b], dst[a:b])

    _parallel(run, spans, chunksize=max(1, len(spans) // (4 * _THREADS)))
    return result


def _gelu_tanh(src: np.ndarray, dst: np.ndarray) -> None:
    # 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), written as x / (1 + exp(-2u)):
    # the same function with one exp instead of tanh (numpy's float32 tanh costs 1.8x its exp here)
    np.multiply(src, src, out=dst)
    dst *= np.float32(-2 * math.sqrt(2 / math.pi) * 0.044715)
    dst -= np.float32(2 * math.sqrt(2 / math.pi))
    dst *= src
    with np.errstate(over="ignore"):  # exp -> inf for very negative x: x / inf = -0, GELU's limit
        np.exp(dst, out=dst)
    dst += 1
    np.divide(src, dst, out=dst)


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


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """LayerNorm over the last axis. MLX's CPU kernel is one thread: ~95 ms for SigLIP's (8x729, 1152)
    activations, twice per layer."""
    w, b = np.array(weight, copy=False), np.array(bias, copy=False)

    def fn(src: np.ndarray, dst: np.ndarray) -> None:
        np.subtract(src, src.mean(axis=-1, keepdims=True), out=dst)
        inv = np.square(dst).mean(axis=-1, keepdims=True)
        inv += np.float32(eps)
        np.sqrt(inv, out=inv)
        dst /= inv
        dst *= w
        dst += b

    return _rows_in_parallel(fn, x)


ATTENTION_QUERY_BLOCK = 256  # query rows per task: a (256, 729) score block stays in a core's cache


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Bidirectional attention (B, H, L, d). On Metal (and for small inputs) this is MLX's fused kernel.

    On the CPU backend, whose attention is unfused, each (batch, head, block of queries) is one task on
    the thread pool: its scores are computed, softmaxed and multiplied by v while in cache, with
    single-threaded BLAS calls. Batched MLX matmuls + a softmax over the whole (8, 16, 729, 729) tensor
    took 845 ms per SigLIP layer for 8 frames; one task per (frame, head) 358 ms; query blocks 304 ms."""
    if not use_numpy(q) or q.shape[-2] * k.shape[-2] * q.shape[0] * q.shape[1] < MIN_ELEMENTS:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    B, H, L, d = q.shape
    qn, kn, vn = _views(q, k, v)  # often strided views of (B, L, H, d)
    result, out = _output((B, L, H, d))  # the layout the output projection reads
    blocks = [slice(a, a + ATTENTION_QUERY_BLOCK) for a in range(0, L, ATTENTION_QUERY_BLOCK)]

    def run(task: int) -> None:
        (b, h), rows = divmod(task // len(blocks), H), blocks[task % len(blocks)]
        scores = (qn[b, h, rows] * np.float32(scale)) @ kn[b, h].T
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out[b, rows, h] = scores @ vn[b, h]

    with numpy_blas_single_thread():
        _parallel(run, range(B * H * len(blocks)))
    return result.transpose(0, 2, 1, 3)


# --- the decoder's causal attention (prefill) ---------------------------------------------------------

QUERY_BLOCK = 64  # query rows per head and task; with grouped-query heads, a task takes every head of a group


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q kᵀ · scale + causal mask) v for q (B, H, L, d) and k, v (B, Hkv, S, d), S >= L: query i
    sees keys up to S - L + i (the prompt continues a cached prefix).

    Each (batch, key/value head, block of queries) is one task on the thread pool: the block's queries of
    every head sharing that k/v are stacked into one product, computed in cache with single-threaded
    BLAS. One Qwen2-0.5B layer, 1,603-token prefill: 380 ms (MLX matmuls + numpy softmax) -> 92 ms;
    6,300 tokens: 1.0 s."""
    B, H, L, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep, offset = H // Hkv, S - L
    qn, kn, vn = _views(q, k, v)
    result, out = _output((B, L, H, d))  # the layout the output projection reads
    blocks = [(a, min(a + QUERY_BLOCK, L)) for a in range(0, L, QUERY_BLOCK)]
    future = np.triu(np.ones((QUERY_BLOCK, QUERY_BLOCK), bool), 1)  # row i must not see column > i

    def run(task: int) -> None:
        (b, g), (start, stop) = divmod(task // len(blocks), Hkv), blocks[task % len(blocks)]
        first, width, rows = offset + start, offset + stop, stop - start  # queries see keys [0, first + i]
        heads = slice(g * rep, (g + 1) * rep)
        queries = (qn[b, heads, start:stop] * np.float32(scale)).reshape(rep * rows, d)
        scores = (queries @ kn[b, g, :width].T).reshape(rep, rows, width)
        scores[:, :, first:width][:, future[:rows, :rows]] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        values = scores.reshape(rep * rows, width) @ vn[b, g, :width]
        out[b, start:stop, heads] = values.reshape(rep, rows, d).transpose(1, 0, 2)

    with numpy_blas_single_thread():
        _parallel(run, range(B * Hkv * len(blocks)))
    return result.transpose(0, 2, 1, 3)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the decoder MLP's activation: on the CPU backend MLX evaluates the sigmoid one
    element at a time on one thread (184 ms for a 1,603-token Qwen2-0.5B prefill, per layer)."""
    g, u = (a.reshape(-1, gate.shape[-1]) for a in _views(gate, up))
    result, out = _output(gate.shape)
    out = out.reshape(g.shape)
    rows = max(1, BLOCK_ELEMENTS // g.shape[-1])

    def run(a: int) -> None:
        dst = out[a:a + rows]
        np.negative(g[a:a + rows], out=dst)
        np.exp(dst, out=dst)
        dst += 1
        np.divide(g[a:a + rows], dst, out=dst)
        dst *= u[a:a + rows]

    _parallel(run, range(0, len(g), rows))
    return result


DECODE_KEY_BLOCK = 256  # keys per product: small enough that OpenBLAS runs it on the calling thread


def decode_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Attention of one new query (B, H, 1, d) over the whole cache k, v (B, Hkv, S, d), in numpy.

    MLX's CPU fallback took 1.8 ms per layer for one query over 1,600 cached keys (70 ms of a 170 ms
    decoding step for Qwen2-0.5B). The products go in blocks of keys small enough for OpenBLAS to
    keep them on one thread: its worker threads, once woken, spin and take the cores that MLX's own
    decoding streams need (a 4-bit decoding step: 625 -> 457 ms). The cache is read in place."""
    B, H, _, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qn, kn, vn = _views(q, k, v)  # k, v: strided views of the cache
    qn = qn.reshape(B, Hkv, H // Hkv, d) * np.float32(scale)
    blocks = [slice(a, a + DECODE_KEY_BLOCK) for a in range(0, S, DECODE_KEY_BLOCK)]
    scores = np.concatenate([qn @ kn[:, :, b].swapaxes(-1, -2) for b in blocks], axis=-1)  # (B, Hkv, rep, S)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = sum(scores[..., b] @ vn[:, :, b] for b in blocks)
    return mx.array(out.reshape(B, H, 1, d))


def _decoder_sdpa(original):
    def sdpa(queries, keys, values, cache, scale, mask, sinks=None):
        plain = sinks is None and not hasattr(cache, "bits") and _ENABLED and mx.default_device() == mx.cpu
        if (plain and isinstance(mask, str) and mask == "causal" and use_numpy(queries)
                and queries.shape[-2] * keys.shape[-2] * queries.shape[1] >= MIN_ELEMENTS):
            return causal_attention(queries, keys, values, scale)
        if plain and mask is None and queries.shape[-2] == 1 and queries.dtype == keys.dtype == mx.float32:
            return decode_attention(queries, keys, values, scale)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    sdpa.cpu_kernels = True
    return sdpa


def _decoder_swiglu(original):
    def fn(gate, up):
        if use_numpy(gate) and up.dtype == gate.dtype:
            return swiglu(gate, up)
        return original(gate, up)

    fn.cpu_kernels = True
    return fn


# --- decoding: matrix-vector products ------------------------------------------------------------------

GEMV_ROWS = 8  # inputs with at most this many rows (decoding steps) take numpy's gemv


def _gemv_applies(x: mx.array, weight: mx.array) -> bool:
    return (_ENABLED and x.dtype == weight.dtype == mx.float32 and x.size // x.shape[-1] <= GEMV_ROWS
            and mx.default_device() == mx.cpu)


def gemv(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weight.T (+ bias) for a few rows of x, by OpenBLAS's matrix-vector product.

    Decoding reads every weight once per token: it is bound by memory bandwidth. MLX's CPU backend
    hands a one-row product to sgemm, which streams the weights at ~8-11 GB/s here; numpy's
    row-major gemv over the same (zero-copy) buffer reads them at ~21 GB/s (measured, 2 cores)."""
    rows, w = _views(x, weight)
    rows = rows.reshape(-1, x.shape[-1])
    y = (w @ rows[0])[None] if len(rows) == 1 else (w @ rows.T).T
    if bias is not None:
        y += np.array(bias, copy=False)
    return mx.array(y.reshape(*x.shape[:-1], w.shape[0]))


class GemvLinear(nn.Linear):
    """nn.Linear whose decoding steps on the CPU backend go through `gemv`."""

    def __call__(self, x: mx.array) -> mx.array:
        if _gemv_applies(x, self.weight):
            return gemv(x, self.weight, self.get("bias"))
        return super().__call__(x)


class GemvEmbedding(nn.Embedding):
    """nn.Embedding used as a tied LM head: the largest matrix of a small decoder (Qwen2-0.5B: 544 MB)."""

    def as_linear(self, x: mx.array) -> mx.array:
        if _gemv_applies(x, self.weight):
            return gemv(x, self.weight)
        return super().as_linear(x)


def install_decoder_kernels(decoder: nn.Module) -> None:
    """Give an mlx-lm decoder the CPU paths: its module's attention (large causal prefills, one-query
    decoding steps) and swiglu are wrapped, its float Linear and Embedding layers take gemv for decoding
    steps. mlx-lm's own functions still serve Metal, masks given as arrays, quantized caches and small
    inputs; quantizing afterwards replaces the layers as usual (to_quantized is inherited)."""
    module = sys.modules[type(decoder).__module__]
    for name, wrap in (("scaled_dot_product_attention", _decoder_sdpa), ("swiglu", _decoder_swiglu)):
        current = getattr(module, name, None)
        if current is not None and not getattr(current, "cpu_kernels", False):
            setattr(module, name, wrap(current))
    for _, layer in decoder.named_modules():
        if type(layer) is nn.Linear:
            layer.__class__ = GemvLinear
        elif type(layer) is nn.Embedding:
            layer.__class__ = GemvEmbedding


# --- quantized weights ---------------------------------------------------------------------------------

_NIBBLES = np.stack([np.arange(256) & 15, np.arange(256) >> 4], axis=-1).astype(np.float32)  # byte -> 2 values
DEQUANTIZE_BLOCK_ROWS = 256  # weight rows per task (balanced across the cores)
# From this many rows of x on, one multi-threaded product over the whole dequantized matrix is 10-15% faster
# (a 2,048-row prefill block: 151 vs 172 ms for 4864x896); below it, unpacking block by block in cache wins
# (a 25-row follow-up question: 8.5 vs 13 ms; 4 rows: 7 vs 19 ms).
DEQUANTIZE_WHOLE_ROWS = 512
_SCRATCH = threading.local()


def _dequantize_applies(x: mx.array, biases: mx.array | None, bits: int, mode: str) -> bool:
    return (_ENABLED and mode == "affine" and biases is not None and bits in (4, 8) and x.dtype == mx.float32
            and mx.default_device() == mx.cpu)


def _scratch(shape: tuple) -> np.ndarray:
    """This thread's reusable float32 buffer: written and read again while it is in cache."""
    size = math.prod(shape)
    if getattr(_SCRATCH, "buffer", None) is None or _SCRATCH.buffer.size < size:
        _SCRATCH.buffer = np.empty(size, np.float32)
    return _SCRATCH.buffer[:size].reshape(shape)


def _unpack(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int,
            out: np.ndarray) -> None:
    """Affine dequantization of packed rows (uint8 view) into out, through a byte -> values table for
    4 bits: bit-identical to mx.dequantize."""
    if bits == 4:
        np.take(_NIBBLES, packed, axis=0, out=out.reshape(len(out), -1, 2))
    else:
        out[:] = packed
    groups = out.reshape(len(out), -1, group_size)
    groups *= scales[:, :, None]
    groups += biases[:, :, None]


def dequantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
                       bits: int, mode: str = "affine") -> mx.array:
    """x @ dequantize(w).T for many rows of x (a prefill, a follow-up question), as a float product.

    MLX's CPU quantized kernel costs grow with every row of x (a 1,600-token prefill: 17x slower than
    float). Here the 4- or 8-bit weights are unpacked in numpy on every core, then multiplied as floats:
    for short inputs each task unpacks a block of W's rows into a per-thread buffer that stays in cache
    and multiplies it at once, so no float copy of W is written to memory (a 25-token follow-up question
    with a 4-bit Qwen2-0.5B wrote and zero-filled 1.4 GB of them); long inputs take one product over the
    whole unpacked matrix."""
    if not _dequantize_applies(x, biases, bits, mode):
        return x @ mx.dequantize(w, scales, biases, group_size, bits, mode=mode).astype(x.dtype).T
    xn, packed = _views(x, w)
    xn, packed = xn.reshape(-1, x.shape[-1]), packed.view(np.uint8)  # little-endian: element 0 in the low bits
    s, b = _views(scales.astype(mx.float32), biases.astype(mx.float32))
    N, K = packed.shape[0], x.shape[-1]
    tasks = -(-max(1, N // DEQUANTIZE_BLOCK_ROWS) // _THREADS) * _THREADS  # a multiple of the cores
    spans = [(N * i // tasks, N * (i + 1) // tasks) for i in range(tasks)]

    def unpack(rows: slice, into: np.ndarray) -> None:
        _unpack(packed[rows], s[rows], b[rows], group_size, bits, into)

    if len(xn) >= DEQUANTIZE_WHOLE_ROWS:
        weights, out = _output((N, K))
        _parallel(lambda span: unpack(slice(*span), out[slice(*span)]), spans)
        return x @ weights.T

    result, out = _output((len(xn), N))

    def run(span: tuple[int, int]) -> None:
        weights = _scratch((span[1] - span[0], K))
        unpack(slice(*span), weights)
        np.matmul(xn, weights.T, out=out[:, slice(*span)])

    with numpy_blas_single_thread():
        _parallel(run, spans)
    return result.reshape(*x.shape[:-1], N)


_STREAMS: list = []


def quantized_gemv_applies(x: mx.array) -> bool:
    return _ENABLED and _THREADS > 1 and x.size // x.shape[-1] <= GEMV_ROWS and mx.default_device() == mx.cpu


def quantized_gemv(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
                   bits: int, mode: str = "affine") -> mx.array:
    """x @ dequantize(w).T for a few rows of x: MLX's quantized kernel, with the output rows split across
    one CPU stream per core. MLX runs each stream's work on its own thread; one stream leaves the other
    cores idle while decoding with a quantized decoder (measured 1.3-1.5x faster over 48 decoder
    matrices, 2.3x for Qwen2-0.5B's 151936-row LM head)."""
    if not _STREAMS:
        _STREAMS.extend(mx.new_stream(mx.cpu) for _ in range(min(_THREADS, 8)))
    n = len(_STREAMS)
    cuts = [len(w) * i // n for i in range(n + 1)]
    parts = [
        mx.quantized_matmul(x, w[a:b], scales[a:b], None if biases is None else biases[a:b], transpose=True,
                            group_size=group_size, bits=bits, mode=mode, stream=stream)
        for a, b, stream in zip(cuts, cuts[1:], _STREAMS)
    ]
    return mx.concatenate(parts, axis=-1)
