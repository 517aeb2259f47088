"""Video-LLaVA: MLX vs the PyTorch reference (transformers) on tiny random checkpoints.

Both sides get identical inputs (our processor's output); float32 logits must agree to 1e-4 and
greedy decoding must produce the same tokens. The processor is checked against transformers'
VideoLlavaProcessor (image path; its video processor needs torchvision), and the frame sampling
against an independent PyAV decode of the real clips.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mlx_vidllm import generate, load, stream_generate
from mlx_vidllm.models.video_llava import VideoLlavaConfig, VideoLlavaProcessor
from tests.fixtures.video_llava import CLIP_MEAN, CLIP_STD, load_hf_processor, load_reference
from tests.fixtures.media import rgb, video

ATOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_VIDEO = ROOT / "examples/videollava_sample_demo_1.mp4"
EXAMPLE_IMAGE = ROOT / "examples/videollava_extreme_ironing.jpg"
REAL_CLIPS = [
    ROOT / "tests/data/llavanext_xU25MMA2N4aVtYay.mp4",
    ROOT / "tests/data/videollava_sample_demo_3.mp4",
    EXAMPLE_VIDEO,
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny reference runs faster on one thread, and does not slow to a crawl when the cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def to_torch(inputs: dict) -> dict:
    """Our processor's arrays (channels-last) -> transformers' tensors (channels-first)."""
    out = {"input_ids": torch.tensor(np.asarray(inputs["input_ids"]), dtype=torch.long)}
    if "pixel_values" in inputs:
        out["pixel_values"] = torch.tensor(inputs["pixel_values"]).permute(0, 3, 1, 2)
    if "pixel_values_videos" in inputs:
        out["pixel_values_videos"] = torch.tensor(np.stack(inputs["pixel_values_videos"])).permute(0, 1, 4, 2, 3)
    return out


def reference_logits(ref, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return ref(**to_torch(inputs)).logits.numpy()


def reference_greedy(ref, inputs: dict, eos: set[int], n: int) -> list[int]:
    """Greedy decoding without a cache: each step recomputes the whole sequence."""
    t = to_torch(inputs)
    ids, out = t.pop("input_ids"), []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(ref(input_ids=ids, **t).logits[0, -1].argmax())
        if nxt in eos:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def assert_logits_match(model, ref, inputs, case: str) -> float:
    ours = np.array(model(**inputs))
    theirs = reference_logits(ref, inputs)
    assert ours.shape == theirs.shape
    delta = float(np.abs(ours - theirs).max())
    print(f"\n[parity] {case}: max |Δ logits| = {delta:.2e} (max |logit| {np.abs(theirs).max():.2f})")
    assert delta <= ATOL, f"max |Δ logits| = {delta:.2e}"
    assert float(np.abs(theirs).max()) > 1.0  # decisive enough for the comparison to mean something
    return delta


@pytest.fixture(scope="module", params=["video_llava_default", "video_llava_default_v5"])
def pair(request):
    path = request.getfixturevalue(request.param)
    model, processor = load(path, dtype="float32")
    return request.param, path, model, processor, load_reference(path)


def n_tokens(inputs: dict, token_id: int) -> int:
    return int((inputs["input_ids"] == token_id).sum())


# ---------------------------------------------------------------------------------------------- logits parity


@pytest.mark.parametrize("size", [(80, 120), (130, 56)])
def test_image_logits(pair, size):
    name, _, model, processor, ref = pair
    inputs = processor(processor.format_prompt("Describe the image.", num_images=1), images=[rgb(*size, seed=1)])
    assert n_tokens(inputs, processor.image_token_id) == model.config.vision.grid**2  # CLS dropped
    assert_logits_match(model, ref, inputs, f"{name} image {size}")


def test_video_logits(pair):
    name, _, model, processor, ref = pair
    inputs = processor(processor.format_prompt("Why is this funny?", num_videos=1), videos=[video(8, seed=2)])
    assert n_tokens(inputs, processor.video_token_id) == 8 * (model.config.vision.grid**2 + 1)  # CLS kept
    assert_logits_match(model, ref, inputs, f"{name} video 8 frames")


def test_image_and_video_logits(pair):
    name, _, model, processor, ref = pair
    text = processor.format_prompt("Is the image one of the frames?", num_images=1, num_videos=1)
    assert text.index("<image>") < text.index("<video>")
    inputs = processor(text, images=[rgb(90, 70, seed=3)], videos=[video(8, seed=4)])
    assert_logits_match(model, ref, inputs, f"{name} image + video")


@pytest.mark.parametrize("template", [True, False], ids=["chat_template", "fallback"])
def test_text_only_multi_turn_logits(pair, template):
    name, _, model, processor, ref = pair
    history = [("What is a video?", "A video is many frames."), ("And an image?", "One frame.")]
    chat_template, processor.chat_template = processor.chat_template, processor.chat_template if template else None
    try:
        text = processor.format_prompt("How many frames does a video have?", history=history)
    finally:
        processor.chat_template = chat_template
    assert text.count("USER:") == 3 and text.endswith("ASSISTANT:")
    case = f"{name} text-only multi-turn ({'template' if template else 'fallback'})"
    assert_logits_match(model, ref, processor(text), case)


@pytest.mark.parametrize("kind", ["video", "image"])
def test_greedy_tokens_match(pair, kind):
    _, _, model, processor, ref = pair
    media = {"video": video(8, seed=7)} if kind == "video" else {"images": [rgb(100, 150, 3)]}
    text = processor.format_prompt("Describe it.", num_images=int(kind == "image"), num_videos=int(kind == "video"))
    inputs = processor(text, images=media.get("images"), videos=[media["video"]] if "video" in media else None)
    expected = reference_greedy(ref, inputs, processor.eos_token_ids, 20)
    ours = [r.token for r in stream_generate(model, processor, "Describe it.", max_tokens=20, **media)
            if r.token not in processor.eos_token_ids]
    assert len(expected) >= 5, "reference stopped almost at once: the comparison would be weak"
    assert ours == expected


def test_key_formats_load_identically(video_llava_default, video_llava_default_v5, video_llava_default_reverted):
    """Hub legacy names + Hub-style config, v5 names + v5 config, 5.23's plain save_pretrained: same model."""
    m1, p = load(video_llava_default, dtype="float32")
    inputs = p(p.format_prompt("Describe.", num_images=1, num_videos=1), images=[rgb(60, 60, 5)],
               videos=[video(3, seed=6)])
    expected = np.array(m1(**inputs))
    for path in (video_llava_default_v5, video_llava_default_reverted):
        m2, _ = load(path, dtype="float32")
        np.testing.assert_array_equal(np.array(m2(**inputs)), expected)


def test_towers_are_distinct(video_llava_default):
    """The fixture's towers differ, so a swapped tower (or a shared one) could not pass the parity tests."""
    model, processor = load(video_llava_default, dtype="float32")
    inputs = processor(processor.format_prompt("Describe.", num_images=1), images=[rgb(70, 90, 8)])
    before = np.array(model(**inputs))
    model.image_tower.update(model.video_tower.parameters())
    assert float(np.abs(np.array(model(**inputs)) - before).max()) > 0.1


# ---------------------------------------------------------------------------------------------- config


def test_hub_config_fills_transformers_defaults():
    """The Hub's Video-LLaVA-7B-hf config.json leaves out every default; ours must be transformers'."""
    hub = {
        "architectures": ["VideoLlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
        "model_type": "video_llava", "pad_token_id": 32002, "projector_hidden_act": "gelu",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                        "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0,
                        "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
        "torch_dtype": "bfloat16", "transformers_version": "4.41.0.dev0", "video_token_index": 32001,
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "model_type": "clip_vision_model",
                          "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
                          "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no key of the real config is unknown to us
        cfg = VideoLlavaConfig.from_hf(hub)
    from transformers import VideoLlavaConfig as HFConfig

    hf = HFConfig(**{k: v for k, v in hub.items() if k not in ("architectures", "transformers_version")})
    t, v = cfg.text_config, cfg.vision
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings"):
        assert t[key] == getattr(hf.text_config, key), key
    assert t["rope_theta"] == hf.text_config.rope_parameters["rope_theta"] == 10000.0
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "layer_norm_eps", "hidden_act"):
        assert getattr(v, key) == getattr(hf.vision_config, key), key
    assert (v.hidden_act, v.image_size, v.grid) == ("quick_gelu", 224, 16)
    assert cfg.tie_word_embeddings is False
    assert (cfg.image_tokens, cfg.frame_tokens, 8 * cfg.frame_tokens) == (256, 257, 2056)
    assert (cfg.image_tokens, 8 * cfg.frame_tokens) == (hf.image_seq_length, hf.video_seq_length)


def test_unknown_config_key_warns():
    with pytest.warns(UserWarning, match="config.json: config.some_new_option"):
        VideoLlavaConfig.from_hf({"some_new_option": 1})
    with pytest.raises(ValueError, match="single layer"):
        VideoLlavaConfig.from_hf({"vision_feature_layer": [-2, -1]})


# ---------------------------------------------------------------------------------------------- processor


def test_processor_matches_transformers(video_llava_default):
    """input_ids identical and pixels within 1e-5 of transformers' VideoLlavaProcessor (image path)."""
    _, processor = load(video_llava_default, dtype="float32")
    hf = load_hf_processor(video_llava_default)
    assert processor.norm.mean == tuple(CLIP_MEAN) and processor.norm.std == tuple(CLIP_STD)
    cases = [[rgb(90, 130, 1)], [rgb(200, 60, 2)], [rgb(56, 56, 3)], [rgb(40, 30, 4)],
             [Image.open(EXAMPLE_IMAGE)], [rgb(90, 130, 5), rgb(70, 70, 6)]]
    for images in cases:
        text = processor.format_prompt("What is unusual here?", num_images=len(images))
        ours = processor(text, images=images)
        theirs = hf(text=text, images=images, return_tensors="np")
        np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
        assert ours["input_ids"][0, 0] == processor.tokenizer.bos_token_id  # the tokenizer's BOS, once
        pix = theirs.get("pixel_values", theirs.get("pixel_values_images"))
        np.testing.assert_allclose(ours["pixel_values"], pix.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
        assert ours["pixel_values"].dtype == np.float32 and ours["input_ids"].dtype == np.int32


def test_video_placeholder_expansion_matches_transformers(video_llava_default):
    """257·T per video (here 17·T), counted by transformers' own replace_video_token."""
    _, processor = load(video_llava_default, dtype="float32")
    hf = load_hf_processor(video_llava_default)
    S = processor.config.vision.image_size
    for t in (8, 3):
        expected = hf.replace_video_token({"pixel_values_videos": [np.zeros((t, 3, S, S), np.float32)]}, 0)
        inputs = processor(processor.format_prompt("Q?", num_videos=1), videos=[video(t, seed=t)])
        assert n_tokens(inputs, processor.video_token_id) == expected.count("<video>") == t * 17
        (pix,) = inputs["pixel_values_videos"]
        assert pix.shape == (t, S, S, 3) and pix.dtype == np.float32


def test_video_frames_preprocessed_like_images(video_llava_default):
    """Frames get the image transform (shortest edge, center crop, CLIP stats), as VideoLlavaVideoProcessor."""
    _, processor = load(video_llava_default, dtype="float32")
    hf = load_hf_processor(video_llava_default)
    frames = video(3, seed=11, h=90, w=160)
    ours = processor(processor.format_prompt("Q?", num_videos=1), videos=[frames])["pixel_values_videos"][0]
    theirs = hf.image_processor(list(frames), return_tensors="np", return_legacy_image_output=False)
    np.testing.assert_allclose(ours, theirs["pixel_values"].transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_normalization_read_from_preprocessor_config(video_llava_default, tmp_path):
    """mean/std come from preprocessor_config.json; without them loading fails (no silent class defaults)."""
    import json
    import shutil

    from mlx_vidllm.errors import ModelError

    model, _ = load(video_llava_default, dtype="float32")
    folder = Path(shutil.copytree(video_llava_default, tmp_path / "ckpt"))
    pp_file = folder / "preprocessor_config.json"
    pp = json.loads(pp_file.read_text())
    pp_file.write_text(json.dumps({**pp, "image_mean": [0.5, 0.25, 0.125], "image_std": [0.5, 0.5, 0.25]}))
    processor = VideoLlavaProcessor.from_pretrained(folder, model.config)
    image = np.full((56, 56, 3), 255, np.uint8)
    inputs = processor(processor.format_prompt("Q?", num_images=1), images=[image])
    np.testing.assert_allclose(inputs["pixel_values"][0, 0, 0], [1.0, 1.5, 3.5], rtol=1e-6)
    pp_file.write_text(json.dumps({k: v for k, v in pp.items() if k != "image_mean"}))
    with pytest.raises(ModelError, match="image_mean"):
        VideoLlavaProcessor.from_pretrained(folder, model.config)


def test_prompt_format(video_llava_default):
    _, processor = load(video_llava_default, dtype="float32")
    expected = "USER: <video>\nWhy is this funny? ASSISTANT:"  # the model card's format
    assert processor.format_prompt("Why is this funny?", num_videos=1) == expected
    template, processor.chat_template = processor.chat_template, None
    try:  # no chat template: Video-LLaVA's own training format
        assert processor.format_prompt("Why is this funny?", num_videos=1) == expected
        assert processor.format_prompt("Q?", num_images=1, num_videos=1) == "USER: <image>\n<video>\nQ? ASSISTANT:"
        assert processor.format_prompt("Q2?", num_videos=1, history=[("Q1?", "A1.")]) == \
            "USER: <video>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT:"
    finally:
        processor.chat_template = template


# ---------------------------------------------------------------------------------------------- frames


def independent_frames(path: Path) -> tuple[int, dict[int, Image.Image]]:
    """Frame count N by a plain PyAV decode, and the frames at np.arange(0, N, N/8).astype(int)."""
    with av.open(str(path)) as c:
        images = [f.to_image() for f in c.decode(video=0)]
    wanted = np.arange(0, len(images), len(images) / 8).astype(int)
    return len(images), {int(i): images[i] for i in wanted}


@pytest.mark.parametrize("path", REAL_CLIPS, ids=lambda p: p.name)
def test_sampling_rule_on_real_clips(video_llava_default, path):
    from mlx_vidllm.media.video import load_video

    _, processor = load(video_llava_default, dtype="float32")
    n, expected = independent_frames(path)
    assert len(expected) == 8
    _, info, indices = load_video(path, num_frames=8, rule=processor.frame_rule)
    assert info.num_frames == n
    np.testing.assert_array_equal(indices, np.arange(0, n, n / 8).astype(int))
    frames = processor.load_video(path)  # default: 8 frames by the arange rule, resized while decoding
    want = np.stack([np.asarray(processor.frame_transform(img)) for img in expected.values()])
    np.testing.assert_array_equal(frames, want)
    assert min(frames.shape[1:3]) == processor.config.vision.image_size


def test_warns_when_not_8_frames(video_llava_default):
    _, processor = load(video_llava_default, dtype="float32")
    with pytest.warns(UserWarning, match="trained on exactly 8 frames"):
        assert len(processor.load_video(EXAMPLE_VIDEO, num_frames=4)) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(processor.load_video(EXAMPLE_VIDEO, num_frames=8)) == 8


# ---------------------------------------------------------------------------------------------- end to end


def test_cli_end_to_end(video_llava_default):
    from click.testing import CliRunner

    from mlx_vidllm.cli import main

    args = ["--model", str(video_llava_default), "--video", str(EXAMPLE_VIDEO), "--prompt", "Why is this funny?",
            "--max-tokens", "12"]
    result = CliRunner().invoke(main, ["generate", *args])
    assert result.exit_code == 0, result.output
    model, processor = load(video_llava_default)
    expected = generate(model, processor, "Why is this funny?", video=EXAMPLE_VIDEO, max_tokens=12)
    assert expected.strip()
    assert result.stdout == expected + "\n"
    assert isinstance(processor, VideoLlavaProcessor)
