"""LLaVA-Video: both checkpoint formats, the grid / one_token layouts, pooling, frame sampling and the time
instruction, against PyTorch references on tiny random checkpoints (float32; logits within 1e-4, greedy tokens
identical).

References: the `one_token` layout is transformers' LlavaOnevisionForConditionalGeneration; the `grid`/`frame`/
`no_token` layouts and average/max pooling exist in no library, so `torch_reference_embeds` composes them from the
reference model's own modules exactly as LLaVA-NeXT's llava_arch.py does (get_2dPool, add_token_per_grid,
add_token_per_frame, masked scatter into the decoder's inputs_embeds).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from fractions import Fraction
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlx_vidllm import load, stream_generate
from mlx_vidllm.errors import ModelError
from mlx_vidllm.models.blocks import layers_to_run
from mlx_vidllm.models.families import detect_family, key_format
from mlx_vidllm.models.llava_video import (KNOWN_TOWERS, LlavaVideoConfig, VideoSampling, resolve_vision_tower,
                                           sample_indices, time_instruction)
from mlx_vidllm.models.onevision import video_token_count
from tests.fixtures.llava_video import build_siglip_tower
from tests.fixtures.onevision import load_reference, preset, read_checkpoint_keys
from tests.fixtures.media import rgb, video

# Frames given as arrays carry no sampling metadata, so those prompts have no time instruction (by design).
pytestmark = pytest.mark.filterwarnings("ignore:the video's sampling is unknown")

ATOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]
REAL_CLIP = ROOT / "tests/data/llavanext_xU25MMA2N4aVtYay.mp4"  # 96 frames, 30 fps
REAL_CLIP_NTSC = ROOT / "tests/data/videollava_sample_demo_3.mp4"  # 146 frames, 24000/1001 fps
QUESTION = "What happens in this video?"

# Independent golden text for REAL_CLIP (linspace(0, 95, 64, dtype=int) / 30 fps, 96 / 30 s).
GOLDEN_REAL = (
    "The video lasts for 3.20 seconds, and 64 frames are uniformly sampled from it. These frames are located at "
    "0.00s,0.03s,0.10s,0.13s,0.20s,0.23s,0.30s,0.33s,0.40s,0.43s,0.50s,0.53s,0.60s,0.63s,0.70s,0.73s,0.80s,0.83s,"
    "0.90s,0.93s,1.00s,1.03s,1.10s,1.13s,1.20s,1.23s,1.30s,1.33s,1.40s,1.43s,1.50s,1.53s,1.60s,1.63s,1.70s,1.73s,"
    "1.80s,1.83s,1.90s,1.93s,2.00s,2.03s,2.10s,2.13s,2.20s,2.23s,2.30s,2.33s,2.40s,2.43s,2.50s,2.53s,2.60s,2.63s,"
    "2.70s,2.73s,2.80s,2.83s,2.90s,2.93s,3.00s,3.03s,3.10s,3.17s.Please answer the following questions related to "
    "this video."
)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def quiet_prompt(processor, question=QUESTION, **kw) -> str:
    return processor.format_prompt(question, **kw)


def load_quiet(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' rope_scaling deprecation when it reads an original config
        return load(path, dtype="float32", **kw)


def torch_reference_embeds(ref, inputs: dict, layout: str, pool: str) -> torch.Tensor:
    """LLaVA-NeXT's video path, from the reference model's modules: (1, L, D) inputs_embeds."""
    ids = torch.tensor(np.asarray(inputs["input_ids"]), dtype=torch.long)
    (frames,) = inputs["pixel_values_videos"]
    with torch.no_grad():
        px = torch.tensor(frames).permute(0, 3, 1, 2)
        hidden = ref.model.vision_tower(px, output_hidden_states=True).hidden_states[-1]  # before post_layernorm
        feat = ref.model.multi_modal_projector(hidden)  # encode_images: tower -> mm_projector
        T, N, D = feat.shape
        g = int(round(math.sqrt(N)))
        # get_2dPool (stride 2)
        x = feat.view(T, g, g, D).permute(0, 3, 1, 2)
        if pool == "average":
            x = F.avg_pool2d(x, 2)
        elif pool == "max":
            x = F.max_pool2d(x, 2)
        else:
            x = F.interpolate(x, size=[math.ceil(g / 2), math.ceil(g / 2)], mode="bilinear")
        x = x.permute(0, 2, 3, 1).reshape(T, -1, D)
        newline = ref.model.image_newline
        if layout == "grid":  # add_token_per_grid
            h = int(math.sqrt(x.shape[1]))
            y = x.view(T, 1, h, h, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
            y = torch.cat((y, newline[:, None, None].expand(*y.shape[:-1], 1)), dim=-1)
            video_feats = y.flatten(1, 2).transpose(0, 1)
        elif layout == "frame":  # add_token_per_frame
            y = x.permute(2, 0, 1).contiguous()
            y = torch.cat((y, newline[:, None, None].expand(*y.shape[:-1], 1)), dim=-1)
            video_feats = y.permute(1, 2, 0).contiguous().flatten(0, 1)
        elif layout == "one_token":
            video_feats = torch.cat((x.flatten(0, 1), newline[None]), dim=0)
        else:
            video_feats = x.flatten(0, 1)
        embeds = ref.get_input_embeddings()(ids)
        mask = (ids == ref.config.video_token_id)[..., None].expand_as(embeds)
        assert int(mask[..., 0].sum()) == video_feats.shape[0]
        return embeds.masked_scatter(mask, video_feats)


def torch_logits(ref, embeds: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        hidden = ref.model.language_model(inputs_embeds=embeds).last_hidden_state
        return ref.lm_head(hidden).numpy()


def torch_greedy(ref, embeds: torch.Tensor, eos: set[int], n: int) -> list[int]:
    """Greedy decoding with the reference decoder and its KV cache (media enter at prefill only)."""
    tokens = []
    with torch.no_grad():
        out = ref.model.language_model(inputs_embeds=embeds, use_cache=True)
        for _ in range(n):
            tok = int(ref.lm_head(out.last_hidden_state[:, -1])[0].argmax())
            if tok in eos:
                break
            tokens.append(tok)
            out = ref.model.language_model(inputs_embeds=ref.get_input_embeddings()(torch.tensor([[tok]])),
                                           past_key_values=out.past_key_values, use_cache=True)
    return tokens


def hf_inputs(inputs: dict) -> dict:
    out = {"input_ids": torch.tensor(np.asarray(inputs["input_ids"]), dtype=torch.long)}
    if "pixel_values_videos" in inputs:
        (v,) = inputs["pixel_values_videos"]
        out["pixel_values_videos"] = torch.tensor(v).permute(0, 3, 1, 2)[None]
    if "pixel_values" in inputs:
        out["pixel_values"] = torch.tensor(inputs["pixel_values"]).permute(0, 3, 1, 2)[None]
        out["image_sizes"] = torch.tensor(inputs["image_sizes"])
        out["batch_num_images"] = torch.tensor(inputs["batch_num_images"])
    return out


def check_logits(ours, theirs) -> float:
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    assert float(np.abs(theirs).max()) > 1.0  # decisive logits: the comparison means something
    delta = float(np.abs(ours - theirs).max())
    assert delta <= ATOL, f"max |Δ logits| = {delta:.2e}"
    return delta


def write_clip(path: Path, n: int, rate: Fraction, size=(64, 48)) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n):
            img = np.full((size[1], size[0], 3), 8 * i, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(onevision_default):
    """transformers' OneVision model holding the same weights as every LLaVA-Video fixture."""
    return load_reference(onevision_default)


@pytest.fixture(scope="module")
def original(llava_video_original):
    return load_quiet(llava_video_original)


@pytest.fixture(scope="module")
def hf(llava_video_hf):
    return load_quiet(llava_video_hf)


# ----------------------------------------------------------------------------------------------------------------
# formats and detection
# ----------------------------------------------------------------------------------------------------------------


def test_family_and_format_detected_from_files(onevision_default, llava_video_original, llava_video_hf, original, hf):
    def family(path):
        return detect_family(json.loads((path / "config.json").read_text())).name

    assert family(onevision_default) == "llava_onevision"
    assert family(llava_video_original) == "llava_video"
    assert family(llava_video_hf) == "llava_video"
    assert key_format(set(read_checkpoint_keys(llava_video_original))) == "llava-next-original"
    assert key_format(set(read_checkpoint_keys(llava_video_hf))) == "transformers"
    assert original[0].config.checkpoint_format == "llava-next-original"
    assert hf[0].config.checkpoint_format == "transformers"
    # an original LLaVA-NeXT config without the LLaVA-Video fields (e.g. a OneVision original) is not LLaVA-Video
    cfg = json.loads((llava_video_original / "config.json").read_text())
    for k in ("add_time_instruction", "force_sample", "mm_newline_position"):
        cfg.pop(k)
    with pytest.raises(ValueError, match="unsupported model"):
        detect_family(cfg)


def test_original_config_loads_without_warnings(llava_video_original):
    """Every field of the original config.json is understood (an unknown one would be a warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(llava_video_original, dtype="float32")
    assert [str(w.message) for w in caught] == []


def test_defaults_per_family(original, hf, onevision_default):
    for model, processor in (original, hf):
        cfg = model.config
        assert (cfg.video_layout, cfg.pool_mode, cfg.add_time_instruction, cfg.force_sample) == \
            ("grid", "bilinear", True, True)
        assert processor.default_num_frames == 64 and cfg.max_frames == 64
    ov, _ = load_quiet(onevision_default)
    assert (ov.config.video_layout, ov.config.pool_mode) == ("one_token", "bilinear")
    assert original[0].config.vision_tower_source == "local"


def test_original_tokenizer_has_no_placeholder_tokens(original, hf):
    _, p = original
    vocab = p.tokenizer.get_vocab()
    assert "<image>" not in vocab and "<video>" not in vocab and len(p.tokenizer) == 483
    # placeholders: the first ids past the tokenizer = the -hf conversion's <image>/<video> ids
    assert (p.image_token_id, p.video_token_id) == (483, 484) == (hf[1].image_token_id, hf[1].video_token_id)


# ----------------------------------------------------------------------------------------------------------------
# vision tower geometry and stored depth
# ----------------------------------------------------------------------------------------------------------------


def test_tower_from_local_flat_and_google_configs(tmp_path):
    vision = preset("default")["vision"]
    flat = resolve_vision_tower(str(build_siglip_tower(tmp_path / "flat", vision, 3, "flat")))
    google = resolve_vision_tower(str(build_siglip_tower(tmp_path / "google", vision, 3, "google")))
    for cfg, source in (flat, google):
        assert source == "local"
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                cfg.image_size, cfg.patch_size, cfg.layer_norm_eps, cfg.hidden_act) == \
            (32, 64, 3, 4, 70, 14, 1e-6, "gelu_pytorch_tanh")
    # Google style leaves defaults out: they are transformers' SiglipVisionConfig defaults, not so400m's
    (tmp_path / "sparse").mkdir()
    (tmp_path / "sparse/config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": {}}))
    sparse, _ = resolve_vision_tower(str(tmp_path / "sparse"))
    assert (sparse.hidden_size, sparse.num_hidden_layers, sparse.image_size, sparse.patch_size) == (768, 12, 224, 16)


def test_tower_table_gives_the_real_geometry():
    cfg, source = resolve_vision_tower("google/siglip-so400m-patch14-384")
    assert source == "table" and "google/siglip-so400m-patch14-384" in KNOWN_TOWERS
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.layer_norm_eps, cfg.hidden_act, cfg.num_hidden_layers) == \
        (384, 14, 1152, 16, 4304, 1e-6, "gelu_pytorch_tanh", 27)
    assert cfg.grid == 27
    # an original 7B config with that tower: 26 layers run (select_layer -2), 210 tokens per frame
    config = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", "hidden_size": 3584,
              "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
              "rms_norm_eps": 1e-6, "rope_theta": 1e6, "vocab_size": 152064, "max_position_embeddings": 32768,
              "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": 1152,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_patch_merge_type": "spatial_unpad",
              "mm_newline_position": "grid", "mm_spatial_pool_mode": "bilinear", "image_aspect_ratio": "anyres_max_9",
              "image_grid_pinpoints": "(1x1),...,(6x6)", "add_time_instruction": True, "force_sample": True}
    cfg7 = LlavaVideoConfig.from_original(config)
    assert layers_to_run(cfg7.vision.num_hidden_layers, cfg7.vision_feature_layer) == 26
    assert len(cfg7.image_grid_pinpoints) == 36 and [384, 768] in cfg7.image_grid_pinpoints
    assert cfg7.text_config["model_type"] == "qwen2" and cfg7.text_config["tie_word_embeddings"] is False
    assert video_token_count(27, 64, "grid", "bilinear") == 13440  # 210 per frame
    assert video_token_count(27, 64, "grid", "average") == 11648  # 13 * 14 = 182 per frame
    assert video_token_count(27, 16, "one_token", "bilinear") == 196 * 16 + 1


def test_tower_resolution_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="cannot be downloaded"):
        resolve_vision_tower("some-org/some-unreleased-tower")
    with pytest.raises(ModelError, match="no such folder"):
        resolve_vision_tower(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_vision_tower(str(tmp_path / "empty"))
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip/config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ModelError, match="not a SigLIP"):
        resolve_vision_tower(str(tmp_path / "clip"))


def _variant(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def test_stored_layer_count_rule(llava_video_original, original, tmp_path):
    """As many tower layers as stored (the tower config may say more), never past the one before the last."""
    model, processor = original
    assert len(model.vision_tower.layers) == 2
    inputs = processor(quiet_prompt(processor, num_videos=1), videos=[video(2, seed=5)])
    base = np.array(model(**inputs))
    vision = preset("default")["vision"]
    # the tower config says 6 layers: still the 2 stored ones
    deep = build_siglip_tower(tmp_path / "deep-tower", vision, 6, "google")
    m6, _ = load_quiet(_variant(llava_video_original, tmp_path / "c6", mm_vision_tower=str(deep)))
    assert len(m6.vision_tower.layers) == 2
    np.testing.assert_array_equal(np.array(m6(**inputs)), base)
    # all 3 tower layers stored: the last one is dropped, as LLaVA-NeXT deletes it
    from safetensors.numpy import save_file

    full = _variant(llava_video_original, tmp_path / "c3")
    rng = np.random.default_rng(0)
    extra = {f"model.vision_tower.vision_tower.vision_model.encoder.layers.2.{n}":
             rng.standard_normal(s).astype(np.float32)
             for n, s in (("self_attn.q_proj.weight", (32, 32)), ("mlp.fc1.weight", (64, 32)))}
    save_file(extra, str(full / "model-extra.safetensors"))
    m3, _ = load_quiet(full)
    assert len(m3.vision_tower.layers) == 2
    np.testing.assert_array_equal(np.array(m3(**inputs)), base)


def test_vocab_from_stored_embedding_rows(llava_video_original, original, tmp_path):
    model, processor = original
    inputs = processor(quiet_prompt(processor, num_videos=1), videos=[video(1, seed=9)])
    m, _ = load_quiet(_variant(llava_video_original, tmp_path / "v", vocab_size=700))
    assert m.language_model.model.embed_tokens.weight.shape[0] == 512 and m.config.config_vocab_size == 700
    np.testing.assert_array_equal(np.array(m(**inputs)), np.array(model(**inputs)))


# ----------------------------------------------------------------------------------------------------------------
# token layouts
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,pool,per_frame,extra", [
    ("grid", "bilinear", 3 * 4, 0), ("grid", "average", 2 * 3, 0), ("grid", "max", 2 * 3, 0),
    ("one_token", "bilinear", 9, 1), ("frame", "bilinear", 10, 0), ("no_token", "average", 4, 0),
])
def test_token_counts(original, layout, pool, per_frame, extra):
    model, processor = original
    processor.configure(video_layout=layout, pool_mode=pool)
    try:
        for t in (1, 3):
            inputs = processor(quiet_prompt(processor, num_videos=1), videos=[video(t, seed=t)])
            n = int((inputs["input_ids"] == processor.video_token_id).sum())
            assert n == per_frame * t + extra == video_token_count(5, t, layout, pool)
            assert processor.tokens_per_frame == per_frame
            assert model.video_features(mx.array(processor.preprocess_video(video(t, seed=t)))).shape[0] == n
    finally:
        processor.configure(video_layout="grid", pool_mode="bilinear")


# ----------------------------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 4])
def test_one_token_matches_transformers(original, reference, frames):
    """The one_token layout of the ORIGINAL-format checkpoint is transformers' OneVision."""
    model, processor = original
    processor.configure(video_layout="one_token")
    try:
        inputs = processor(quiet_prompt(processor, num_videos=1), videos=[video(frames, seed=frames)])
        with torch.no_grad():
            theirs = reference(**hf_inputs(inputs)).logits.numpy()
        check_logits(model(**inputs), theirs)
        # the torch composition reproduces transformers here, which validates it for the other layouts
        # (two float32 torch paths with different op order: ~1e-5 apart, so the parity bar applies)
        np.testing.assert_allclose(torch_logits(reference, torch_reference_embeds(reference, inputs, "one_token",
                                                                                  "bilinear")), theirs, atol=1e-4)
    finally:
        processor.configure(video_layout="grid")


@pytest.mark.parametrize("layout,pool", [("grid", "bilinear"), ("grid", "average"), ("grid", "max"),
                                         ("frame", "bilinear"), ("no_token", "bilinear"),
                                         ("one_token", "average")])
@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_layouts_match_torch_reference(request, reference, fmt, layout, pool):
    model, processor = request.getfixturevalue(fmt)
    processor.configure(video_layout=layout, pool_mode=pool)
    try:
        inputs = processor(quiet_prompt(processor, num_videos=1), videos=[video(3, seed=11)])
        check_logits(model(**inputs), torch_logits(reference, torch_reference_embeds(reference, inputs, layout, pool)))
    finally:
        processor.configure(video_layout="grid", pool_mode="bilinear")


def test_greedy_real_clip_default_pipeline(original, reference):
    """The default pipeline end to end: 64 frames of a real clip, time instruction, grid layout, 20 greedy tokens."""
    model, processor = original
    frames = processor.load_video(REAL_CLIP)
    text = processor.format_prompt(QUESTION, num_videos=1)
    inputs = processor(text, videos=[frames])  # the frames carry their sampling: the time instruction goes in
    assert int((inputs["input_ids"] == processor.video_token_id).sum()) == 64 * 12
    written = processor.format_prompt(QUESTION, num_videos=1, sampling=frames.sampling)
    assert f"<video>\n{GOLDEN_REAL}\n{QUESTION}<|im_end|>" in written
    np.testing.assert_array_equal(processor(written, videos=[np.asarray(frames)])["input_ids"], inputs["input_ids"])
    embeds = torch_reference_embeds(reference, inputs, "grid", "bilinear")
    np.testing.assert_allclose(np.array(model.get_input_embeddings(**inputs)), embeds[0].numpy(), atol=2e-5, rtol=0)
    # 1280 positions: float32 RoPE/attention noise of the two decoders alone reaches ~9e-5 at the far end
    check_logits(model(**inputs), torch_logits(reference, embeds))
    expected = torch_greedy(reference, embeds, processor.eos_token_ids, 20)
    ours = [r.token for r in stream_generate(model, processor, QUESTION, video=str(REAL_CLIP), max_tokens=20)
            if r.token not in processor.eos_token_ids]
    assert len(expected) >= 5
    assert ours == expected


@pytest.mark.parametrize("layout,pool", [("grid", "average"), ("one_token", "bilinear")])
def test_greedy_tokens_match(original, reference, layout, pool):
    model, processor = original
    processor.configure(video_layout=layout, pool_mode=pool)
    try:
        frames = video(3, seed=7)
        inputs = processor(quiet_prompt(processor, "Describe it.", num_videos=1), videos=[frames])
        if layout == "one_token":  # transformers' own generate
            t = hf_inputs(inputs)
            with torch.no_grad():
                out = reference.generate(**t, max_new_tokens=20, do_sample=False,
                                         eos_token_id=sorted(processor.eos_token_ids), pad_token_id=0)
            expected = [x for x in out[0, t["input_ids"].shape[1]:].tolist() if x not in processor.eos_token_ids]
        else:
            expected = torch_greedy(reference, torch_reference_embeds(reference, inputs, layout, pool),
                                    processor.eos_token_ids, 20)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = [r.token for r in stream_generate(model, processor, "Describe it.", video=frames, max_tokens=20)
                    if r.token not in processor.eos_token_ids]
        assert len(expected) >= 5
        assert ours == expected
    finally:
        processor.configure(video_layout="grid", pool_mode="bilinear")


def test_image_matches_transformers(original, reference):
    """Images take OneVision's anyres_max_9 path in both formats."""
    model, processor = original
    inputs = processor(quiet_prompt(processor, "Describe the image.", num_images=1), images=[rgb(90, 130, seed=3)])
    with torch.no_grad():
        theirs = reference(**hf_inputs(inputs)).logits.numpy()
    check_logits(model(**inputs), theirs)


def test_both_formats_give_identical_inputs_and_logits(original, hf):
    (m1, p1), (m2, p2) = original, hf
    frames = p1.load_video(REAL_CLIP, num_frames=5)
    t1 = p1.format_prompt(QUESTION, num_videos=1)
    p2.load_video(REAL_CLIP, num_frames=5)
    t2 = p2.format_prompt(QUESTION, num_videos=1)
    assert t1 == t2
    i1, i2 = p1(t1, videos=[frames]), p2(t2, videos=[frames])
    np.testing.assert_array_equal(i1["input_ids"], i2["input_ids"])
    np.testing.assert_array_equal(np.array(m1(**i1)), np.array(m2(**i2)))


# ----------------------------------------------------------------------------------------------------------------
# frame sampling, time instruction, prompt
# ----------------------------------------------------------------------------------------------------------------


def test_default_sampling_on_a_real_clip(original):
    _, processor = original
    frames, s = processor.sample_video(REAL_CLIP)
    assert frames.shape == (64, processor.size, processor.size, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(s.indices, np.linspace(0, 95, 64, dtype=int))
    assert (s.total_frames, s.avg_fps, s.num_frames) == (96, 30.0, 64)
    assert time_instruction(s) == GOLDEN_REAL
    # processor.load_video keeps returning the uint8 frames; they also carry their sampling
    again = processor.load_video(REAL_CLIP)
    assert isinstance(again, np.ndarray) and again.dtype == np.uint8
    np.testing.assert_array_equal(again, frames)
    np.testing.assert_array_equal(again.sampling.indices, s.indices)
    text = processor.format_prompt(QUESTION, num_videos=1)
    ids = processor(text, videos=[again])["input_ids"][0]
    assert f"\n{GOLDEN_REAL}\n" in processor.tokenizer.decode(ids[ids < len(processor.tokenizer)])
    with pytest.warns(UserWarning, match="no time instruction"):  # a slice is no longer what was sampled
        processor(text, videos=[again[:3]])


def test_one_fps_rule_without_force_sample(original):
    """force_sample off: every round(avg_fps)-th frame, times index / stride (the original's formula), cap 64."""
    _, processor = original
    processor.configure(force_sample=False)
    try:
        _, s = processor.sample_video(REAL_CLIP_NTSC)  # 146 frames at 23.976 fps: stride 24
        assert s.indices.tolist() == [0, 24, 48, 72, 96, 120, 144]
        assert time_instruction(s) == (
            "The video lasts for 6.09 seconds, and 7 frames are uniformly sampled from it. These frames are located "
            "at 0.00s,1.00s,2.00s,3.00s,4.00s,5.00s,6.00s.Please answer the following questions related to this "
            "video.")
    finally:
        processor.configure(force_sample=True)
    # more candidates than the cap: linspace over the whole video instead, at index / avg_fps
    idx, times = sample_indices(3000, 30.0, max_frames=64, force_sample=False)
    np.testing.assert_array_equal(idx, np.linspace(0, 2999, 64, dtype=int))
    assert times[1] == idx[1] / 30.0


def test_time_instruction_on_a_synthetic_clip(original, tmp_path):
    _, processor = original
    clip = write_clip(tmp_path / "ten.mp4", 10, Fraction(5))
    _, s = processor.sample_video(clip, num_frames=4)
    assert s.indices.tolist() == [0, 3, 6, 9]
    assert time_instruction(s) == (
        "The video lasts for 2.00 seconds, and 4 frames are uniformly sampled from it. These frames are located at "
        "0.00s,0.60s,1.20s,1.80s.Please answer the following questions related to this video.")
    # the default 64 on a 10-frame clip repeats frames, like linspace(0, N-1, 64, dtype=int) in the original
    frames, s = processor.sample_video(clip)
    assert len(frames) == 64 and s.indices.tolist() == np.linspace(0, 9, 64, dtype=int).tolist()
    synthetic = VideoSampling("x", np.array([0, 12, 25]), [0.0, 0.5, 1.0], 50, 25.0)
    assert time_instruction(synthetic) == (
        "The video lasts for 2.00 seconds, and 3 frames are uniformly sampled from it. These frames are located at "
        "0.00s,0.50s,1.00s.Please answer the following questions related to this video.")


def test_prompt_text_and_placements(original, hf):
    s = VideoSampling("x", np.array([0, 12, 25]), [0.0, 0.5, 1.0], 50, 25.0)
    instr = time_instruction(s)
    training = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<video>\n{instr}\n"
                f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    for _, p in (original, hf):
        assert p.format_prompt(QUESTION, num_videos=1, sampling=s) == training
        p.configure(instruction_placement="model_card")
        try:
            assert p.format_prompt(QUESTION, num_videos=1, sampling=s) == training.replace(
                f"<video>\n{instr}", f"<video>{instr}")
        finally:
            p.configure(instruction_placement="training")
    # no chat template in the tokenizer files: the qwen_1_5 text is built directly, identical
    _, p = original
    template, p.chat_template = p.chat_template, None
    try:
        assert p.format_prompt(QUESTION, num_videos=1, sampling=s) == training
        assert p.format_prompt("Hi", num_images=1) == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nHi<|im_end|>\n"
            "<|im_start|>assistant\n")
    finally:
        p.chat_template = template
    assert instr not in p.format_prompt(QUESTION, num_videos=1)  # written by the processor, from the frames
    with pytest.warns(UserWarning, match="no time instruction"):
        p(p.format_prompt(QUESTION, num_videos=1), videos=[video(2, seed=2)])
    # history: earlier turns, the media in the first user turn
    two = p.format_prompt("And then?", num_videos=1, history=[(QUESTION, "A dog runs.")], sampling=s)
    assert two == training[: -len("<|im_start|>assistant\n")] + (
        "<|im_start|>assistant\nA dog runs.<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert hf[1].format_prompt("And then?", num_videos=1, history=[(QUESTION, "A dog runs.")], sampling=s) == two


def test_tokenization_is_llava_nexts_tokenizer_image_token(original, hf):
    """Split at the placeholder, tokenize each piece alone (LLaVA-NeXT mm_utils.tokenizer_image_token)."""
    _, p = original
    text = quiet_prompt(p, num_videos=1)

    def tokenizer_image_token(prompt, tokenizer, image_token_index=-200):
        chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
        ids, offset = [], 0
        if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
            offset = 1
            ids.append(chunks[0][0])
        sep = [image_token_index] * (offset + 1)
        for x in [e for sub in zip(chunks, [sep] * len(chunks)) for e in sub][:-1]:
            ids.extend(x[offset:])
        return ids

    expected = [p.video_token_id if i == -200 else i
                for i in tokenizer_image_token(text.replace("<video>", "<image>"), p.tokenizer)]
    assert p.tokenize(text)[0].tolist() == expected
    assert hf[1].tokenize(text)[0].tolist() == expected  # the -hf tokenizer's special <video> token: same ids


def test_chat_session_keeps_the_time_instruction(original, monkeypatch):
    """Every turn of a chat has the same first user turn (media + time instruction): its KV prefix is reused."""
    from mlx_vidllm import generate
    from mlx_vidllm.chat import ChatSession

    model, processor = original
    instr = ("The video lasts for 3.20 seconds, and 4 frames are uniformly sampled from it. These frames are located "
             "at 0.00s,1.03s,2.10s,3.17s.Please answer the following questions related to this video.")
    prompts = []
    call = type(processor).__call__

    def spy(self, text, images=None, videos=None):
        out = call(self, text, images=images, videos=videos)
        ids = out["input_ids"][0]
        prompts.append(self.tokenizer.decode(ids[ids < len(self.tokenizer)]))
        return out

    monkeypatch.setattr(type(processor), "__call__", spy)
    session = ChatSession(model, processor, video=str(REAL_CLIP), num_frames=4)
    first = "".join(r.text for r in session.ask(QUESTION, max_tokens=5))
    "".join(r.text for r in session.ask("And then?", max_tokens=5))
    assert len(prompts) == 2 and all(f"<|im_start|>user\n\n{instr}\n{QUESTION}<|im_end|>" in t for t in prompts)  # the
    # placeholder tokens are left out of the decoded text: "<video>\n" reads "\n"
    assert first == generate(model, processor, QUESTION, video=str(REAL_CLIP), num_frames=4, max_tokens=5)
    # the chat media cache keys on the layout / pooling: same token count, other features, no stale reuse
    monkeypatch.undo()
    answers = {}
    try:
        for pool in ("average", "max"):
            processor.configure(pool_mode=pool)
            chat = "".join(r.text for r in ChatSession(model, processor, video=str(REAL_CLIP), num_frames=4)
                           .ask(QUESTION, max_tokens=8))
            answers[pool] = generate(model, processor, QUESTION, video=str(REAL_CLIP), num_frames=4, max_tokens=8)
            assert chat == answers[pool]
    finally:
        processor.configure(pool_mode="bilinear")
    assert answers["average"] != answers["max"]


# ----------------------------------------------------------------------------------------------------------------
# options: load(), processor, CLI
# ----------------------------------------------------------------------------------------------------------------


def test_layout_is_an_option_for_any_onevision_checkpoint(onevision_default):
    """A -hf LLaVA-Video without the LLaVA-Video config fields loads as OneVision: the layout is an option."""
    model, processor = load_quiet(onevision_default, video_layout="grid", pool_mode="average")
    inputs = processor(processor.format_prompt(QUESTION, num_videos=1), videos=[video(2, seed=1)])
    assert int((inputs["input_ids"] == processor.video_token_id).sum()) == 2 * 6
    with pytest.raises(ModelError, match="video_layout"):
        load_quiet(onevision_default, video_layout="diagonal")
    with pytest.raises(ModelError, match="llava_onevision"):
        load_quiet(onevision_default, time_instruction=False)


def test_cli_layout_and_pool_flags(llava_video_original):
    from click.testing import CliRunner

    from mlx_vidllm import generate
    from mlx_vidllm.cli import main

    help_text = CliRunner().invoke(main, ["generate", "--help"]).output
    assert "--video-layout" in help_text and "--pool-mode" in help_text
    args = ["generate", "--model", str(llava_video_original), "--video", str(REAL_CLIP), "--prompt", QUESTION,
            "--num-frames", "4", "--max-tokens", "6", "--video-layout", "one_token", "--pool-mode", "average"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        model, processor = load(llava_video_original, video_layout="one_token", pool_mode="average")
        expected = generate(model, processor, QUESTION, video=str(REAL_CLIP), num_frames=4, max_tokens=6)
    assert result.stdout == expected + "\n"
