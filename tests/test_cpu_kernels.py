"""The CPU-backend kernels (numpy softmax / GELU) compute what MLX's own ops compute."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_vidllm.models import cpu_kernels


@pytest.fixture
def forced(monkeypatch):
    """Take the numpy path for any size (the tiny test models are below the size threshold)."""
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS", 0)
    if mx.default_device() != mx.cpu:
        pytest.skip("the numpy kernels are used on the CPU backend only")


def test_activations_match_mlx(forced):
    x = mx.random.normal((3, 257, 1031), key=mx.random.key(0)) * 4
    assert cpu_kernels.use_numpy(x)
    np.testing.assert_allclose(np.array(cpu_kernels.gelu_tanh(x)), np.array(nn.gelu_approx(x)), atol=2e-6)
    np.testing.assert_allclose(np.array(cpu_kernels.quick_gelu(x)), np.array(x * mx.sigmoid(1.702 * x)), atol=2e-6)


def test_attention_matches_fused_kernel(forced):
    q, k, v = (mx.random.normal((2, 4, 197, 72), key=mx.random.key(i)) for i in range(3))
    ours = cpu_kernels.attention(q, k, v, scale=72**-0.5)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=72**-0.5)
    np.testing.assert_allclose(np.array(ours), np.array(fused), atol=1e-5)


def test_small_or_half_inputs_stay_in_mlx(monkeypatch):
    x = mx.ones((4, 4))
    assert not cpu_kernels.use_numpy(x)
    assert not cpu_kernels.use_numpy(mx.ones((1024, 1024), dtype=mx.float16))


def test_onevision_parity_through_the_numpy_path(forced, onevision_default):
    """The whole model with every activation and attention on the numpy path: still within 1e-4 of PyTorch."""
    from mlx_vidllm import load
    from tests.fixtures.onevision import load_reference
    from tests.fixtures.media import rgb, video
    from tests.test_onevision import reference_logits

    model, processor = load(onevision_default, dtype="float32")
    ref = load_reference(onevision_default)
    for inputs in (processor(processor.format_prompt("What?", num_videos=1), videos=[video(4, seed=1)]),
                   processor(processor.format_prompt("What?", num_images=1), images=[rgb(200, 90, seed=2)])):
        delta = np.abs(np.array(model(**inputs)) - reference_logits(ref, inputs)).max()
        assert delta <= 1e-4, delta


@pytest.mark.parametrize("L,S,H,Hkv", [(37, 37, 4, 2), (700, 700, 14, 2), (300, 1100, 8, 8), (1, 50, 4, 1)])
def test_causal_attention_matches_fused_kernel(forced, monkeypatch, L, S, H, Hkv):
    """Prompt continuing a cached prefix (S > L), grouped-query heads, several query blocks."""
    monkeypatch.setattr(cpu_kernels, "QUERY_BLOCK", 256)
    q = mx.random.normal((1, H, L, 64), key=mx.random.key(1))
    k, v = (mx.random.normal((1, Hkv, S, 64), key=mx.random.key(i)) for i in (2, 3))
    ours = cpu_kernels.causal_attention(q, k, v, scale=0.125)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    np.testing.assert_allclose(np.array(ours), np.array(fused), atol=1e-5)


def test_decoder_attention_is_installed_in_mlx_lm(onevision_default):
    import mlx_lm.models.qwen2 as qwen2

    from mlx_vidllm import load

    load(onevision_default)
    assert getattr(qwen2.scaled_dot_product_attention, "cpu_kernels", False)


def test_generation_through_the_numpy_path_matches_transformers(forced, onevision_default):
    """Greedy tokens with prefill and every attention on the numpy path (decode steps use mlx-lm's)."""
    from mlx_vidllm import load, stream_generate
    from tests.fixtures.onevision import load_reference
    from tests.fixtures.media import video
    from tests.test_onevision import reference_greedy

    model, processor = load(onevision_default, dtype="float32")
    frames = video(3, seed=5)
    inputs = processor(processor.format_prompt("Describe it.", num_videos=1), videos=[frames])
    expected = reference_greedy(load_reference(onevision_default), inputs, processor.eos_token_ids, 20)
    ours = [r.token for r in stream_generate(model, processor, "Describe it.", video=frames, max_tokens=20)
            if r.token not in processor.eos_token_ids]
    assert ours == expected and len(expected) >= 5


def test_in_place_activations_overwrite_a_fresh_linear_output(forced):
    """The vision MLPs activate fc1's output in place (no copy back into MLX); the values are the same."""
    from mlx_vidllm.models.blocks import activation

    h = mx.random.normal((2, 300, 700), key=mx.random.key(4)) * 3
    mx.eval(h)
    expected = np.array(nn.gelu_approx(h))
    out = activation("gelu_pytorch_tanh")(h)
    np.testing.assert_allclose(np.array(out), expected, atol=2e-6)


# --- decoding: gemv, one-query attention, quantized weights ---------------------------------------------


@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_matches_mlx_matmul(forced, rows):
    x = mx.random.normal((1, rows, 300), key=mx.random.key(5))
    w, b = mx.random.normal((517, 300), key=mx.random.key(6)), mx.random.normal((517,), key=mx.random.key(7))
    np.testing.assert_allclose(np.array(cpu_kernels.gemv(x, w, b)), np.array(x @ w.T + b), rtol=1e-5, atol=1e-5)


def test_decoder_layers_take_the_gemv_path(onevision_default, monkeypatch):
    """Decoding steps of a float decoder go through gemv (Linear and the tied LM head); prefill does not."""
    from mlx_vidllm import load

    model, _ = load(onevision_default, dtype="float32")
    calls = []
    real = cpu_kernels.gemv
    monkeypatch.setattr(cpu_kernels, "gemv", lambda x, w, b=None: calls.append(x.shape) or real(x, w, b))
    lm = model.language_model
    lm(mx.array([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]))
    assert calls == []  # 10 rows: MLX's matmul
    lm(mx.array([[3]]))
    linears = sum(isinstance(m, nn.Linear) for _, m in lm.named_modules())
    assert len(calls) == linears + (1 if lm.args.tie_word_embeddings else 0)


@pytest.mark.parametrize("S,H,Hkv", [(1, 4, 2), (700, 14, 2), (300, 8, 8)])
def test_decode_attention_matches_fused_kernel(S, H, Hkv):
    """One query over a cache read through a strided slice (as mlx-lm's KVCache returns it)."""
    q = mx.random.normal((1, H, 1, 64), key=mx.random.key(1))
    k_buf, v_buf = (mx.random.normal((1, Hkv, S + 40, 64), key=mx.random.key(i)) for i in (2, 3))
    k, v = k_buf[:, :, :S], v_buf[:, :, :S]
    ours = cpu_kernels.decode_attention(q, k, v, scale=0.125)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)
    np.testing.assert_allclose(np.array(ours), np.array(fused), atol=1e-5)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 32), (8, 64)])
def test_dequantized_matmul_unpacks_bit_identically_to_mlx(bits, group_size):
    """x = identity: the product is Wᵀ itself, so every dequantized value is compared exactly (384 rows of
    x: unpacked block by block in cache; 640: the whole matrix at once)."""
    for k in (384, 640):
        w = mx.random.normal((600, k), key=mx.random.key(8))
        q, scales, biases = mx.quantize(w, group_size, bits)
        ours = np.array(cpu_kernels.dequantized_matmul(mx.eye(k), q, scales, biases, group_size, bits))
        np.testing.assert_array_equal(ours, np.array(mx.dequantize(q, scales, biases, group_size, bits)).T)


@pytest.mark.parametrize("rows,n_out", [(4, 1001), (25, 300), (300, 4100), (600, 700)])  # 600: whole matrix
def test_dequantized_matmul_matches_mlx(rows, n_out):
    x = mx.random.normal((1, rows, 256), key=mx.random.key(14))
    q, scales, biases = mx.quantize(mx.random.normal((n_out, 256), key=mx.random.key(15)), 64, 4)
    ours = cpu_kernels.dequantized_matmul(x, q, scales, biases, 64, 4)
    ref = mx.quantized_matmul(x, q, scales, biases, transpose=True, group_size=64, bits=4)
    assert ours.shape == (1, rows, n_out)
    np.testing.assert_allclose(np.array(ours), np.array(ref), atol=1e-4)


@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_gemv_split_across_streams_matches_one_kernel(rows):
    x = mx.random.normal((1, rows, 256), key=mx.random.key(9))
    q, scales, biases = mx.quantize(mx.random.normal((1001, 256), key=mx.random.key(10)), 64, 4)
    ours = cpu_kernels.quantized_gemv(x, q, scales, biases, 64, 4)
    ref = mx.quantized_matmul(x, q, scales, biases, transpose=True, group_size=64, bits=4)
    np.testing.assert_allclose(np.array(ours), np.array(ref), atol=1e-5)


@pytest.mark.parametrize("checkpoint", ["onevision_default", "onevision_tied"])
def test_quantized_decoder_paths_agree(request, checkpoint):
    """A 4-bit decoder: prefill (dequantize + matmul) and decoding steps (split quantized kernel, tied LM head
    included) give the logits of MLX's own quantized layers."""
    from mlx_vidllm import load
    from mlx_vidllm.models.blocks import PrefillQuantizedLinear, SplitQuantizedEmbedding

    model, _ = load(request.getfixturevalue(checkpoint), dtype="float32")
    lm = model.language_model
    nn.quantize(lm, group_size=32, bits=4)  # plain MLX layers: the reference
    ids = mx.array([list(range(3, 40))])
    ref_prefill, ref_step = lm(ids), lm(mx.array([[7]]))
    from mlx_vidllm.models.blocks import use_prefill_friendly_quantization

    use_prefill_friendly_quantization(lm)
    assert any(isinstance(m, PrefillQuantizedLinear) for _, m in lm.named_modules())
    assert isinstance(lm.model.embed_tokens, SplitQuantizedEmbedding)
    np.testing.assert_allclose(np.array(lm(ids)), np.array(ref_prefill), atol=1e-4)
    np.testing.assert_allclose(np.array(lm(mx.array([[7]]))), np.array(ref_step), atol=1e-4)


def test_layer_norm_matches_mlx(forced):
    from mlx_vidllm.models.blocks import LayerNorm

    x = mx.random.normal((2, 300, 1152), key=mx.random.key(11)) * 3 + 1
    norm = LayerNorm(1152, eps=1e-6)
    norm.weight = mx.random.normal((1152,), key=mx.random.key(12))
    norm.bias = mx.random.normal((1152,), key=mx.random.key(13))
    expected = mx.fast.layer_norm(x, norm.weight, norm.bias, 1e-6)
    np.testing.assert_allclose(np.array(norm(x)), np.array(expected), atol=1e-5)
