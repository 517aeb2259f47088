"""LLaMA-VID: MLX vs PyTorch on tiny random checkpoints in the released layout (issue #9).

* EVA-ViT-G against transformers' InstructBlipVisionModel (same architecture), loaded from LAVIS names;
* the QFormer against InstructBlipQFormerModel (query embeddings + question ids + encoder states);
* context / content tokens and end-to-end logits against a torch composition of those modules with
  LLaMA-VID's formulas (written below from `llamavid_arch.py::vlm_attention / token_generation`);
* the long-video path (streamed decoding, on-disk EVA feature cache, flat memory);
* `mlx-vidllm convert` on the .bin + eva_vit_g.pth layout, then `mlx-vidllm generate` on the result.

Measured numbers are printed with a "[llama-vid]" prefix (pytest -s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mlx_vidllm import generate, load, stream_generate
from mlx_vidllm.errors import ModelError
from mlx_vidllm.models import llama_vid
from mlx_vidllm.models.eva import EVAVisionModel, bicubic_resize, interpolate_pos_embed
from mlx_vidllm.models.llama_vid import IMAGE_TOKEN_INDEX, LlamaVidConfig
from tests.fixtures.llama_vid import load_reference, synthetic_video
from tests.fixtures.media import rgb

ATOL = 1e-4
ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the dog doing in the video?"


def frames(t: int, seed: int) -> np.ndarray:
    return np.stack([rgb(60, 80, seed + i) for i in range(t)])


def report(what: str, delta: float, scale: float | None = None) -> None:
    extra = f" (max |value| {scale:.2f})" if scale is not None else ""
    print(f"\n[llama-vid] {what}: max |Δ| = {delta:.2e}{extra}")


@pytest.fixture(scope="module")
def default(llama_vid_default):
    model, processor = load(llama_vid_default, dtype="float32")
    return model, processor, load_reference(llama_vid_default)


@pytest.fixture(scope="module")
def long(llama_vid_long, tmp_path_factory):
    model, processor = load(llama_vid_long, dtype="float32")
    processor.cache_dir = tmp_path_factory.mktemp("feature_cache")
    return model, processor, load_reference(llama_vid_long)


# --- torch side: the reference formulas ----------------------------------------------------------------------------


def torch_eva(ref, pixels_nhwc: np.ndarray) -> torch.Tensor:
    """EVA output after the configured depth (the stored extra block never runs)."""
    with torch.no_grad():
        out = ref.eva(torch.tensor(pixels_nhwc).permute(0, 3, 1, 2), output_hidden_states=True)
    return out.hidden_states[ref.eva_depth]


def torch_tokens(ref, feats: torch.Tensor, qids, compress: str | None) -> torch.Tensor:
    """LLaMA-VID's vlm_attention + token_generation for one prompt: (F, N, Dv) EVA features -> (F, 1 + c, D)."""
    with torch.no_grad():
        n, N, _ = feats.shape
        Q = ref.query_tokens.shape[1]
        ids = torch.as_tensor(np.asarray(qids), dtype=torch.long)[None].expand(n, -1)
        # QFormer: queries + question, cross-attention to vlm_att_ln(features incl. CLS)
        out = ref.qformer(input_ids=ids, attention_mask=torch.ones(n, Q + ids.shape[1], dtype=torch.long),
                          query_embeds=ref.query_tokens.expand(n, -1, -1),
                          encoder_hidden_states=ref.ln_vision(feats)).last_hidden_state[:, :Q]
        text_q = ref.text_proj(out)
        vis = feats[:, 1:] if N % 2 == 1 else feats  # mm_vision_select_feature "patch": odd count -> drop CLS
        ctx = text_q @ ref.key_proj(vis).transpose(-1, -2) / vis.shape[-1] ** 0.5
        ctx = (ctx.softmax(-1) @ vis).mean(1)  # raw features as values, mean over the queries
        ctx = ref.value_proj(ctx[:, None])
        if compress and "grid" in compress:
            side = int(vis.shape[1] ** 0.5)
            k = side // int(compress.split("grid:")[-1])
            vis = F.avg_pool2d(vis.reshape(n, side, side, -1).permute(0, 3, 1, 2), padding=0, kernel_size=k,
                               stride=k).permute(0, 2, 3, 1).flatten(1, 2)
        elif compress and "mean" in compress:
            vis = vis.mean(dim=1, keepdim=True)
        return torch.cat([ctx, ref.mm_projector(vis)], dim=1)


def torch_embeddings(ref, inputs: dict, compress: str | None) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(inputs["input_ids"])[0], dtype=torch.long)
    blocks = []
    if "pixel_values" in inputs:
        blocks.append(torch_tokens(ref, torch_eva(ref, inputs["pixel_values"]), inputs["qformer_input_ids"],
                                   compress).flatten(0, 1))
    for video in inputs.get("pixel_values_videos", []):
        blocks.append(torch_tokens(ref, torch_eva(ref, video), inputs["qformer_input_ids"], compress).flatten(0, 1))
    with torch.no_grad():
        emb = ref.llm.model.embed_tokens(ids.clamp(min=0))
        if blocks:
            emb[ids == IMAGE_TOKEN_INDEX] = torch.cat(blocks)
    return emb


def torch_logits(ref, inputs: dict, compress: str | None) -> np.ndarray:
    with torch.no_grad():
        return ref.llm(inputs_embeds=torch_embeddings(ref, inputs, compress)[None]).logits.numpy()


# --- EVA ------------------------------------------------------------------------------------------------------------


def test_eva_matches_instructblip_vision(default):
    """LAVIS-named eva_vit_g.pth (one block more than the config) -> our EVA == InstructBlipVisionModel."""
    model, processor, ref = default
    assert len(model.vision_tower.layers) == ref.eva_depth == 3  # the 4th stored block is dropped
    assert len(ref.eva.encoder.layers) == 4
    pixels = np.stack([processor.preprocess_image(rgb(70, 90, s)) for s in range(3)])
    ours = np.array(model.vision_tower(mx.array(pixels)))
    theirs = torch_eva(ref, pixels).numpy()
    assert ours.shape == theirs.shape == (3, 17, 32)
    delta = float(np.abs(ours - theirs).max())
    report("EVA-ViT-G vs InstructBlipVisionModel hidden_states[depth]", delta, float(np.abs(theirs).max()))
    assert delta <= ATOL


def test_pos_embed_bicubic_interpolation_matches_torch():
    """336 models: the 224 position grid (16x16) is resized to 24x24 like LAVIS' interpolate_pos_embed."""
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1, 1 + 16 * 16, 8)).astype(np.float32)
    ours = np.array(interpolate_pos_embed(mx.array(pos), 24))
    t = torch.tensor(pos)
    grid = t[:, 1:].reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    theirs = torch.cat([t[:, :1], grid], dim=1).numpy()
    assert ours.shape == (1, 577, 8)
    delta = float(np.abs(ours - theirs).max())
    report("pos-embed bicubic 16->24 vs torch", delta)
    assert delta <= 1e-5
    small = rng.standard_normal((5, 7, 3))
    down = F.interpolate(torch.tensor(small).permute(2, 0, 1)[None], size=(3, 4), mode="bicubic",
                         align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(bicubic_resize(small, 3, 4) - down).max() <= 1e-6


def test_eva_resizes_a_stored_pos_embed_for_a_larger_input(default):
    model, _, _ = default
    from dataclasses import replace

    cfg = replace(model.config.vision, image_size=84)  # 6x6 patches, weights stored for 4x4
    tower = EVAVisionModel(cfg)
    stored = {f"vision_tower.{k}": v for k, v in _flat(model.vision_tower).items()}
    weights = tower.sanitize(stored)
    assert weights["vision_tower.pos_embed"].shape == (1, 37, 32)
    np.testing.assert_allclose(np.array(weights["vision_tower.pos_embed"][0, 0]),
                               np.array(model.vision_tower.pos_embed[0, 0]), atol=1e-7)  # CLS kept


def _flat(module) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(module.parameters()))


# --- QFormer --------------------------------------------------------------------------------------------------------


def test_qformer_matches_instructblip_qformer(default):
    model, processor, ref = default
    ids = processor.question_ids(QUESTION)
    rng = np.random.default_rng(1)
    enc = rng.standard_normal((3, 17, 32)).astype(np.float32)
    ours = np.array(model.qformer(mx.array(ids), mx.array(enc)))
    Q = model.config.qformer.num_query_tokens
    with torch.no_grad():
        theirs = ref.qformer(input_ids=torch.tensor(ids, dtype=torch.long)[None].expand(3, -1),
                             attention_mask=torch.ones(3, Q + len(ids), dtype=torch.long),
                             query_embeds=ref.query_tokens.expand(3, -1, -1),
                             encoder_hidden_states=torch.tensor(enc)).last_hidden_state.numpy()
    assert ours.shape == theirs.shape == (3, Q + len(ids), 32)
    delta = float(np.abs(ours - theirs).max())
    report("QFormer vs InstructBlipQFormerModel last_hidden_state", delta, float(np.abs(theirs).max()))
    assert delta <= ATOL


# --- context / content tokens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [None, "grid:2", "mean", "mean_concat"])
def test_visual_tokens_match_reference_formulas(default, compress):
    model, processor, ref = default
    saved = model.config.compress_type
    model.config.compress_type = compress
    try:
        pixels = np.stack([processor.preprocess_image(rgb(70, 90, s)) for s in range(4)])
        ids = processor.question_ids(QUESTION)
        ours = np.array(model.visual_tokens(model.vision_tower(mx.array(pixels)), mx.array(ids)))
        theirs = torch_tokens(ref, torch_eva(ref, pixels), ids, compress)
        per = {None: 17, "grid:2": 5, "mean": 2, "mean_concat": 2}[compress]
        assert model.config.tokens_per_visual == per
        assert theirs.shape == (4, per, 64)
        theirs = theirs.flatten(0, 1).numpy()
        delta = float(np.abs(ours - theirs).max())
        report(f"context+content tokens ({compress})", delta, float(np.abs(theirs).max()))
        assert delta <= ATOL
    finally:
        model.config.compress_type = saved


def test_context_token_depends_on_the_question_content_does_not(default):
    model, processor, _ = default
    pixels = mx.array(np.stack([processor.preprocess_image(rgb(70, 90, 9))]))
    feats = model.vision_tower(pixels)
    a = np.array(model.visual_tokens(feats, mx.array(processor.question_ids("what color is the ball?"))))
    b = np.array(model.visual_tokens(feats, mx.array(processor.question_ids("how many people are there?"))))
    assert np.abs(a[0] - b[0]).max() > 1e-3  # context token
    np.testing.assert_array_equal(a[1], b[1])  # content token


# --- end to end ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("media", ["video", "image", "image+video"])
def test_logits_match_torch_composition(default, media):
    model, processor, ref = default
    kwargs = {}
    if "video" in media:
        kwargs["videos"] = [frames(5, seed=3)]
    if "image" in media:
        kwargs["images"] = [rgb(90, 70, seed=4)]
    inputs = processor(QUESTION, **kwargs)
    ids = inputs["input_ids"][0]
    visual = 2 * (5 * ("video" in media) + ("image" in media))
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == visual  # [ctx, mean] per frame / image
    ours = np.array(model(**inputs))
    theirs = torch_logits(ref, inputs, "mean")
    assert ours.shape == theirs.shape
    delta = float(np.abs(ours - theirs).max())
    report(f"end-to-end logits ({media})", delta, float(np.abs(theirs).max()))
    assert delta <= ATOL
    assert float(np.abs(theirs).max()) > 1.0


def test_long_video_checkpoint_logits_with_linear_rope(long):
    """compress "mean_concat", rope linear x16, EVA read from the shards, 32 queries (num_qformer)."""
    model, processor, ref = long
    assert model.config.text_config["rope_scaling"] == {"type": "linear", "factor": 16.0}
    assert model.config.text_config["max_position_embeddings"] == 4096 * 16
    assert model.config.qformer.num_query_tokens == 32
    inputs = processor(QUESTION, videos=[frames(6, seed=5)])
    ours = np.array(model(**inputs))
    theirs = torch_logits(ref, inputs, "mean_concat")
    delta = float(np.abs(ours - theirs).max())
    report("end-to-end logits (long-video checkpoint, rope linear x16)", delta, float(np.abs(theirs).max()))
    assert delta <= ATOL


def test_greedy_matches_torch(default):
    model, processor, ref = default
    video = frames(4, seed=6)
    ours = [r.token for r in stream_generate(model, processor, QUESTION, video=video, max_tokens=12)]
    inputs = processor(QUESTION, videos=[video])
    emb = torch_embeddings(ref, inputs, "mean")
    with torch.no_grad():
        out = ref.llm.generate(inputs_embeds=emb[None], attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long),
                               max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
    theirs = [t for t in out[0].tolist() if t != 2]
    print(f"\n[llama-vid] greedy: ours {ours} / torch {theirs}")
    assert ours[:len(theirs)] == theirs and len(ours) == len(theirs)
    assert len(set(ours)) > 1


# --- processor -------------------------------------------------------------------------------------------------------


def test_vicuna_prompt_and_question(default):
    _, processor, _ = default
    text = processor.format_prompt(QUESTION, num_videos=1)
    assert text == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
                    f"{QUESTION} ASSISTANT:")
    video = frames(3, seed=1)
    bare = processor(QUESTION, videos=[video])
    formatted = processor(text, videos=[video])  # question taken from the last user turn
    explicit = processor(text, videos=[video], question=QUESTION)
    for other in (formatted, explicit):
        np.testing.assert_array_equal(bare["input_ids"], other["input_ids"])
        np.testing.assert_array_equal(bare["qformer_input_ids"], other["qformer_input_ids"])
    # BERT: lower-cased, [CLS] ... [SEP]; [DEC] is the last QFormer id
    tok = processor.qformer_tokenizer
    assert tok.convert_ids_to_tokens(bare["qformer_input_ids"].tolist()) == \
        ["[CLS]", "what", "is", "the", "dog", "doing", "in", "the", "video", "?", "[SEP]"]
    assert tok.convert_tokens_to_ids("[DEC]") == processor.config.qformer.vocab_size - 1
    # truncated from the left: the end of a long question survives
    long_q = "describe " * 300 + "the ball"
    ids = processor.question_ids(long_q)
    assert len(ids) == 256 and tok.convert_ids_to_tokens(ids[-3:].tolist()) == ["the", "ball", "[SEP]"]


def test_tokenizer_keeps_the_slow_llama_semantics(default):
    """tokenizer_image_token: chunks tokenized on their own, BOS once; "\\n" after <image> keeps its "▁"."""
    _, processor, _ = default
    tok = processor.tokenizer
    assert tok.tokenize("\nWhat")[:2] == ["▁", "<0x0A>"]  # the piece AutoTokenizer (5.23) drops
    inputs = processor("Hi", images=[rgb(40, 40, 0)])
    ids = inputs["input_ids"][0].tolist()
    k = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.convert_ids_to_tokens(ids[k - 1]) == "▁"  # "USER: " ends with a lone "▁"
    after = ids[k + 2:]
    assert tok.convert_ids_to_tokens(after[:2]) == ["▁", "<0x0A>"]
    # round trip and special tokens inside the text (multi-turn prompts hold "</s>")
    assert tok.decode(tok.encode("A dog runs.", add_special_tokens=False)) == "A dog runs."
    enc = tok.encode("a dog</s>USER: hi", add_special_tokens=False)
    assert tok.eos_token_id in enc and tok.convert_ids_to_tokens(enc[enc.index(tok.eos_token_id) + 1])[0] != "▁"
    # cross-check every chunk of a multi-turn prompt against transformers' own LlamaTokenizer(legacy=False)
    # built from the same tokenizer.model; AutoTokenizer on the folder (model_type llava) drops the "▁"
    from transformers import AutoTokenizer, LlamaTokenizer

    folder = Path(tok.model_file).parent
    reference = LlamaTokenizer.from_pretrained(str(folder), legacy=False)
    prompt = processor.format_prompt("What is it?", num_images=1, history=[("Hi there.", "It is a dog.")])
    for chunk in prompt.split("<image>"):
        assert tok.encode(chunk) == reference(chunk)["input_ids"], chunk
    auto = AutoTokenizer.from_pretrained(str(folder))
    assert auto("\nWhat")["input_ids"] != tok.encode("\nWhat")


def test_multi_turn_recomputes_the_context_from_the_latest_question(default):
    model, processor, _ = default
    video = frames(3, seed=2)
    first = "What color is the ball?"
    second = "How many people are there?"
    inputs = processor(second, videos=[video], history=[(first, "It is yellow.")])
    text = processor.format_prompt(second, num_videos=1, history=[(first, "It is yellow.")])
    assert text.endswith(f"USER: {first} ASSISTANT: It is yellow.</s>USER: <image>\n{second} ASSISTANT:")
    np.testing.assert_array_equal(inputs["qformer_input_ids"], processor.question_ids(second))
    emb_2 = np.array(model.get_input_embeddings(**inputs))
    emb_1 = np.array(model.get_input_embeddings(**dict(inputs, qformer_input_ids=processor.question_ids(first))))
    pos = np.flatnonzero(inputs["input_ids"][0] == IMAGE_TOKEN_INDEX)
    assert np.abs(emb_2[pos[0::2]] - emb_1[pos[0::2]]).max() > 1e-3  # context tokens follow the question
    np.testing.assert_array_equal(emb_2[pos[1::2]], emb_1[pos[1::2]])  # content tokens do not


def test_config_defaults_are_the_released_geometry():
    """The released configs store neither EVA's nor the QFormer's sizes."""
    released = {
        "model_type": "llava", "architectures": ["LlavaLlamaAttForCausalLM"], "bert_type": "qformer_pretrain_freeze",
        "compress_type": "mean_concat", "num_qformer": 32, "mm_hidden_size": 1408, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "./model_zoo/LAVIS/eva_vit_g.pth",
        "image_processor": "./model_zoo/OpenAI/clip-vit-large-patch14", "max_token": 65536, "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "rms_norm_eps": 1e-5, "vocab_size": 32000, "max_position_embeddings": 4096, "hidden_act": "silu",
        "rope_scaling": {"type": "linear", "factor": 16.0}, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
    }
    cfg = LlamaVidConfig.from_hf(released)
    v, q = cfg.vision, cfg.qformer
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.image_size,
            v.layer_norm_eps) == (1408, 39, 16, 6144, 224, 1e-6)
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.intermediate_size, q.vocab_size,
            q.encoder_hidden_size, q.num_query_tokens, q.layer_norm_eps, q.vision_layer_norm_eps) == \
        (768, 12, 12, 3072, 30523, 1408, 32, 1e-12, 1e-5)
    assert cfg.tokens_per_visual == 2 and cfg.text_config["max_position_embeddings"] == 65536
    assert LlamaVidConfig.from_hf(dict(released, compress_type=None, rope_scaling=None,
                                       image_processor="./llamavid/processor/clip-patch14-336")).tokens_per_visual \
        == 1 + 576
    with pytest.raises(ValueError, match="bert_type"):
        LlamaVidConfig.from_hf(dict(released, bert_type="raw_bert"))


# --- long videos: streaming, cache, memory -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_videos")
    return {"1min": synthetic_video(root / "one_minute.mp4", 60, fps=2, size=(320, 240), seed=1),
            "10min": synthetic_video(root / "ten_minutes.mp4", 600, fps=2, size=(320, 240), seed=2)}


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    from mlx_vidllm import generate, load
    model, processor = load(sys.argv[1])
    processor.cache_dir = sys.argv[3]
    entry = processor.load_video(sys.argv[2])
    answer = generate(model, processor, "What happens in the video?", video=sys.argv[2], max_tokens=3)
    status = open("/proc/self/status").read()
    hwm = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1])
    print(json.dumps({"vmhwm_kb": hwm, "frames": entry.num_frames, "answer": answer}))
""")


def test_long_video_memory_stays_flat(llama_vid_long, long_videos, tmp_path):
    """10 minutes at 1 fps (600 frames, 1200 visual tokens) vs 1 minute: peak RSS ratio <= 1.3."""
    results = {}
    for name, video in long_videos.items():
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(llama_vid_long), str(video), str(tmp_path / name)],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["1min"]["frames"] == 60 and results["10min"]["frames"] == 600
    one, ten = results["1min"]["vmhwm_kb"], results["10min"]["vmhwm_kb"]
    ratio = ten / one
    print(f"\n[llama-vid] peak RSS: 1 min {one / 1024:.0f} MiB, 10 min {ten / 1024:.0f} MiB, ratio {ratio:.3f}, "
          f"growth {(ten - one) / 1024:.1f} MiB")
    assert ratio <= 1.3
    assert ten - one < 100 * 1024  # holding the decoded 320x240 frames alone would add ~130 MiB


def test_second_question_reuses_cached_features(long, long_videos, monkeypatch):
    model, processor, ref = long
    calls = {"n": 0}
    original = EVAVisionModel.__call__

    def counting(self, pixels):
        calls["n"] += pixels.shape[0]
        return original(self, pixels)

    monkeypatch.setattr(EVAVisionModel, "__call__", counting)
    video = long_videos["1min"]
    a1 = generate(model, processor, "What happens in the video?", video=video, max_tokens=4)
    assert calls["n"] == 60  # every sampled frame encoded once
    cached = processor.load_video(video)
    assert calls["n"] == 60 and cached.num_frames == 60 and cached.indices == list(range(0, 120, 2))
    a2 = generate(model, processor, "How many people are there?", video=video, max_tokens=4)
    assert calls["n"] == 60  # the second question runs only the QFormer / token step and the decoder
    # the cached features are EVA's output, and tokens from them match the in-memory path
    from mlx_vidllm.media.video import load_video

    raw, _, idx = load_video(video, fps=1, transform=processor.frame_transform)
    assert idx.tolist() == cached.indices
    direct = processor("How many people are there?", videos=[raw])
    via_cache = processor("How many people are there?", videos=[video])
    np.testing.assert_array_equal(direct["input_ids"], via_cache["input_ids"])
    e1 = np.array(model.get_input_embeddings(**direct))
    e2 = np.array(model.get_input_embeddings(**via_cache))
    assert np.abs(e1 - e2).max() <= 1e-5
    print(f"\n[llama-vid] cached answers: {a1!r} / {a2!r}")


# --- checkpoint files, convert, CLI --------------------------------------------------------------------------------


def test_eva_weights_sources(llama_vid_default, tmp_path):
    """Shards, else eva_vit_g.pth beside config.json, else --vision-weights; a clear error when none."""
    src = tmp_path / "no_eva"
    shutil.copytree(llama_vid_default, src)
    (src / "eva_vit_g.pth").rename(tmp_path / "eva.pth")
    with pytest.raises(ModelError, match="--vision-weights"):
        load(src)
    weights = llama_vid.read_weights(src, {}, vision_weights=tmp_path / "eva.pth")
    assert "model.vision_tower.vision_tower.blocks.3.attn.qkv.weight" in weights  # all 4 stored blocks read


def test_convert_then_generate_with_the_cli(llama_vid_default, tmp_path):
    """`mlx-vidllm convert` on .bin shards + eva_vit_g.pth (and on a folder without it, via --vision-weights),
    then `mlx-vidllm generate --video` on the MLX folder: same answer as the source checkpoint."""
    out = tmp_path / "mlx"
    cli = [sys.executable, "-m", "mlx_vidllm.cli"]
    proc = subprocess.run(cli + ["convert", "--hf-path", str(llama_vid_default), "--mlx-path", str(out),
                                 "--dtype", "float32"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llama_vid" in proc.stdout and "llama-vid-original" in proc.stdout
    for name in ("tokenizer.model", "tokenizer_config.json", "preprocessor_config.json", "bert/vocab.txt",
                 "model.safetensors", "README.md"):
        assert (out / name).exists(), name
    assert not list(out.glob("*.bin")) and not (out / "eva_vit_g.pth").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlx_vidllm"]["family"] == "llama_vid" and cfg["mlx_vidllm"]["dtype"] == "float32"
    tensors = mx.load(str(out / "model.safetensors"))
    assert "vision_tower.layers.2.self_attn.q_bias" in tensors and "vision_tower.layers.3.mlp.fc1.weight" not in tensors

    m_src, p_src = load(llama_vid_default, dtype="float32")
    m_out, p_out = load(out)
    video = frames(4, seed=8)
    a, b = p_src(QUESTION, videos=[video]), p_out(QUESTION, videos=[video])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["qformer_input_ids"], b["qformer_input_ids"])
    delta = float(np.abs(np.array(m_src(**a)) - np.array(m_out(**b))).max())
    report("converted vs source logits", delta)
    assert delta <= 1e-6

    # --vision-weights: a folder with the shards only
    bare = tmp_path / "shards_only"
    shutil.copytree(llama_vid_default, bare)
    (bare / "eva_vit_g.pth").rename(tmp_path / "eva_vit_g.pth")
    out2 = tmp_path / "mlx2"
    proc = subprocess.run(cli + ["convert", "--hf-path", str(bare), "--mlx-path", str(out2), "--dtype", "float32",
                                 "--vision-weights", str(tmp_path / "eva_vit_g.pth")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t2 = mx.load(str(out2 / "model.safetensors"))
    assert set(t2) == set(tensors) and all(mx.array_equal(t2[k], tensors[k]).item() for k in tensors)

    clip = synthetic_video(tmp_path / "clip.mp4", 5, fps=4, size=(96, 64), seed=3)
    env = dict(os.environ, MLX_VIDLLM_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cli + ["generate", "--model", str(out), "--video", str(clip), "--prompt", QUESTION,
                                 "--max-tokens", "8"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    p_src.cache_dir = tmp_path / "cache_src"
    expected = generate(m_src, p_src, QUESTION, video=clip, max_tokens=8)
    print(f"\n[llama-vid] CLI answer from the converted folder: {proc.stdout.strip()!r}")
    assert expected.strip() and proc.stdout == expected + "\n"


def test_chat_session_recomputes_context_tokens_each_turn(long, long_videos, monkeypatch):
    """mlx-vidllm chat: the second turn moves <image> to the latest question, recomputes the context tokens
    from it (EVA features come from the disk cache) and answers exactly like a fresh prompt would."""
    from mlx_lm.generate import stream_generate as lm_stream_generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from mlx_vidllm.chat import ChatSession

    model, processor, _ = long
    video = long_videos["1min"]
    processor.load_video(video)  # cached: the session never runs EVA
    calls = {"n": 0}
    original = EVAVisionModel.__call__
    monkeypatch.setattr(EVAVisionModel, "__call__", lambda self, x: (calls.__setitem__("n", calls["n"] + 1),
                                                                      original(self, x))[1])
    session = ChatSession(model, processor, video=video)
    q1, q2 = "What happens in the video?", "How many people are there?"
    a1 = "".join(r.text for r in session.ask(q1, max_tokens=5))
    got = [r.token for r in session.ask(q2, max_tokens=5)]
    assert calls["n"] == 0
    inputs = processor(q2, videos=[video], history=[(q1, a1)])
    np.testing.assert_array_equal(inputs["qformer_input_ids"], processor.question_ids(q2))
    embeds = model.get_input_embeddings(**inputs)
    tok = TokenizerWrapper(processor.tokenizer, eos_token_ids=processor.eos_token_ids)
    fresh = [r.token for r in lm_stream_generate(model.language_model, tok, mx.array(inputs["input_ids"][0]),
                                                 max_tokens=5, sampler=make_sampler(temp=0.0),
                                                 input_embeddings=embeds)]
    assert got == fresh
