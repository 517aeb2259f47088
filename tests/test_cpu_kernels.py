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
