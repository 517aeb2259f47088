"""LLaVA-OneVision: MLX vs the PyTorch reference (transformers) on tiny random checkpoints.

Both sides get identical inputs (our processor's output); logits must agree to
1e-4 in float32 and greedy decoding must produce the same tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlx_vidllm import load, stream_generate
from tests.fixtures.onevision import load_hf_processor, load_reference
from tests.fixtures.media import rgb, video

ATOL = 1e-4
EXAMPLE_VIDEO = "examples/videollava_sample_demo_1.mp4"


def to_torch(inputs: dict) -> dict:
    """Our processor's arrays (channels-last) -> transformers' tensors (channels-first, batched)."""
    out = {"input_ids": torch.tensor(np.asarray(inputs["input_ids"]), dtype=torch.long)}
    if "pixel_values" in inputs:
        pix = torch.tensor(inputs["pixel_values"]).permute(0, 3, 1, 2)
        # one image: (1, views, C, S, S); several: one view each, (images, 1, C, S, S)
        out["pixel_values"] = pix[:, None] if inputs["batch_num_images"][0] > 1 else pix[None]
        out["image_sizes"] = torch.tensor(inputs["image_sizes"])
        out["batch_num_images"] = torch.tensor(inputs["batch_num_images"])
    if "pixel_values_videos" in inputs:
        (video,) = inputs["pixel_values_videos"]  # one video per prompt
        out["pixel_values_videos"] = torch.tensor(video).permute(0, 3, 1, 2)[None]
    return out


def reference_logits(ref, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return ref(**to_torch(inputs)).logits.numpy()


def reference_greedy(ref, inputs: dict, eos: set[int], n: int) -> list[int]:
    """transformers' own greedy decoding (media enter at prefill only, KV cache after)."""
    t = to_torch(inputs)
    with torch.no_grad():
        out = ref.generate(**t, max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos), pad_token_id=0)
    tokens = out[0, t["input_ids"].shape[1]:].tolist()
    return [tok for tok in tokens if tok not in eos]


@pytest.fixture(scope="module", params=["onevision_default", "onevision_tied", "onevision_default_v5"])
def pair(request):
    path = request.getfixturevalue(request.param)
    model, processor = load(path, dtype="float32")
    return request.param, path, model, processor, load_reference(path)


def assert_logits_match(model, ref, inputs) -> float:
    ours = np.array(model(**inputs))
    theirs = reference_logits(ref, inputs)
    assert ours.shape == theirs.shape
    delta = float(np.abs(ours - theirs).max())
    assert delta <= ATOL, f"max |Δ logits| = {delta:.2e}"
    # the logits are decisive enough for the comparison to mean something
    assert float(np.abs(theirs).max()) > 1.0
    return delta


@pytest.mark.parametrize("frames", [1, 4, 9])
def test_video_logits(pair, frames):
    _, _, model, processor, ref = pair
    text = processor.format_prompt("What happens in this video?", num_videos=1)
    inputs = processor(text, videos=[video(frames, seed=frames)])
    n_video = int((inputs["input_ids"] == processor.video_token_id).sum())
    p = -(-model.config.vision.grid // 2)
    assert n_video == frames * p * p + 1
    assert_logits_match(model, ref, inputs)


@pytest.mark.parametrize("size", [(90, 130), (200, 60), (70, 70), (700, 1200)])
def test_single_image_logits(pair, size):
    """Wide, tall, exactly one tile, and one large enough for the anyres_max_9 downscale."""
    _, _, model, processor, ref = pair
    text = processor.format_prompt("Describe the image.", num_images=1)
    inputs = processor(text, images=[rgb(*size, seed=sum(size))])
    assert_logits_match(model, ref, inputs)


def test_max9_downscale_is_exercised(pair):
    _, _, model, processor, _ = pair
    from mlx_vidllm.media.image import anyres_grid, anyres_max_shape, unpadded_shape

    cfg, g = model.config, model.config.vision.grid
    rows, cols = anyres_grid((700, 1200), cfg.image_grid_pinpoints, cfg.vision.image_size)
    t, b, l, r = unpadded_shape((700, 1200), (rows * g, cols * g))
    assert anyres_max_shape(b - t, r - l, g, cfg.max_tiles) != (b - t, r - l)


def test_multi_image_logits(pair):
    _, _, model, processor, ref = pair
    text = processor.format_prompt("Compare the images.", num_images=2)
    inputs = processor(text, images=[rgb(90, 130, 1), rgb(120, 50, 2)])
    g = model.config.vision.grid
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 2 * (g * g + 1)
    assert_logits_match(model, ref, inputs)


def test_text_only_logits(pair):
    _, _, model, processor, ref = pair
    inputs = processor(processor.format_prompt("Hello, what is a video?"))
    assert_logits_match(model, ref, inputs)


@pytest.mark.parametrize("kind", ["video", "image"])
def test_greedy_tokens_match(pair, kind):
    _, _, model, processor, ref = pair
    media = {"video": video(3, seed=7)} if kind == "video" else {"images": [rgb(100, 150, 3)]}
    n_img, n_vid = (0, 1) if kind == "video" else (1, 0)
    text = processor.format_prompt("Describe it.", num_images=n_img, num_videos=n_vid)
    inputs = processor(text, images=media.get("images"), videos=[media["video"]] if "video" in media else None)
    expected = reference_greedy(ref, inputs, processor.eos_token_ids, 20)
    ours = [r.token for r in stream_generate(model, processor, "Describe it.", max_tokens=20, **media)
            if r.token not in processor.eos_token_ids]
    assert len(expected) >= 5, "reference stopped almost at once: the comparison would be weak"
    assert ours == expected


def test_processor_matches_transformers(onevision_default):
    """input_ids identical and pixels within 1e-5 of transformers' PIL image processor."""
    _, processor = load(onevision_default, dtype="float32")
    hf = load_hf_processor(onevision_default)
    for images in ([rgb(90, 130, 1)], [rgb(200, 60, 2)], [rgb(700, 1200, 3)], [rgb(90, 130, 4), rgb(60, 60, 5)]):
        text = processor.format_prompt("Describe.", num_images=len(images))
        ours = processor(text, images=images)
        # transformers reads a flat list as one image per sample; a nested list is one multi-image prompt
        theirs = hf(text=text, images=[images], return_tensors="np")
        np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
        pix = theirs["pixel_values"][0][: len(ours["pixel_values"])] if len(images) == 1 else \
            theirs["pixel_values"].reshape(-1, *theirs["pixel_values"].shape[-3:])
        np.testing.assert_allclose(ours["pixel_values"], pix.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(ours["image_sizes"], theirs["image_sizes"])


def test_video_frames_preprocessed_like_siglip(onevision_default):
    """Video frames: squash-resize to the tower size, bicubic, SigLIP 0.5 stats."""
    _, processor = load(onevision_default, dtype="float32")
    hf = load_hf_processor(onevision_default)
    frames = video(3, seed=11)
    ours = processor.preprocess_video(frames)
    theirs = hf.image_processor.resize(frames[0].transpose(2, 0, 1), size=_size(processor.size), resample=3)
    expected = (theirs.transpose(1, 2, 0).astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(ours[0], expected, atol=1e-5)


def _size(s):
    from transformers.image_processing_utils import SizeDict

    return SizeDict(height=s, width=s)


def test_key_formats_load_identically(onevision_default, onevision_default_v5):
    m1, p = load(onevision_default, dtype="float32")
    m2, _ = load(onevision_default_v5, dtype="float32")
    inputs = p(p.format_prompt("Describe.", num_videos=1), videos=[video(2, seed=3)])
    np.testing.assert_array_equal(np.array(m1(**inputs)), np.array(m2(**inputs)))


def test_real_clip_end_to_end(onevision_default):
    """The real example clip through the whole pipeline, 16 frames by the OneVision rule."""
    model, processor = load(onevision_default, dtype="float32")
    frames = processor.load_video(EXAMPLE_VIDEO)
    assert frames.shape == (16, processor.size, processor.size, 3)
    text = "".join(r.text for r in stream_generate(model, processor, "What happens?", video=EXAMPLE_VIDEO,
                                                   max_tokens=8))
    assert isinstance(text, str) and len(text) > 0
