"""Sanity tests of the offline fixtures themselves (tokenizer + tiny OneVision checkpoints)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.fixtures.onevision import (  # noqa: E402
    build_onevision,
    load_hf_processor,
    load_reference,
    read_checkpoint_keys,
    read_checkpoint_tensors,
)
from tests.fixtures.tokenizer import ONEVISION_CHAT_TEMPLATE, TRAINED_VOCAB_SIZE, build_qwen2_tokenizer  # noqa: E402

N = TRAINED_VOCAB_SIZE
ENDOFTEXT, IM_START, IM_END, IMAGE, VIDEO = N, N + 1, N + 2, N + 3, N + 4


# ---------------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(qwen2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen2_tokenizer_dir))


def test_tokenizer_files(qwen2_tokenizer_dir):
    names = {p.name for p in qwen2_tokenizer_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja"} <= names
    cfg = json.loads((qwen2_tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["bos_token"] is None


@pytest.mark.parametrize(
    "text",
    [
        "Describe what is happening in the video, frame by frame!",
        "  A person   walks.\nThen 2024 people run; café naïve 日本 🙂 \r\n\tend",
        "",
    ],
)
def test_tokenizer_roundtrip(tok, text):
    ids = tok(text)["input_ids"]
    assert all(0 <= i < N for i in ids)  # no BOS, no specials
    assert tok.decode(ids) == text


def test_tokenizer_matches_raw_tokenizers_library(tok, qwen2_tokenizer_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(qwen2_tokenizer_dir / "tokenizer.json"))
    s = "<|im_start|>user\n<image>\n<video>\nWhat is the person doing?<|im_end|>\n"
    assert raw.encode(s).ids == tok(s)["input_ids"]


def test_special_token_ids(tok):
    assert 400 <= N <= 600
    assert len(tok) == N + 5
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]) == [
        ENDOFTEXT,
        IM_START,
        IM_END,
        IMAGE,
        VIDEO,
    ]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == IM_END
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == ENDOFTEXT
    assert tok.bos_token is None
    # special tokens are atomic, also next to text
    assert tok("x<image>\n<video>y")["input_ids"][1:4] == [IMAGE, tok("\n")["input_ids"][0], VIDEO]


def test_tokenizer_deterministic(tmp_path, qwen2_tokenizer_dir):
    build_qwen2_tokenizer(tmp_path)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (qwen2_tokenizer_dir / name).read_bytes(), name


def test_chat_template(tok):
    assert tok.chat_template == ONEVISION_CHAT_TEMPLATE
    image_msg = [
        {"role": "user", "content": [{"type": "text", "text": "What is shown?"}, {"type": "image"}]},
    ]
    assert (
        tok.apply_chat_template(image_msg, add_generation_prompt=True, tokenize=False)
        == "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
    )
    video_msg = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is happening?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A person cooks."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "And here?"}]},
    ]
    assert tok.apply_chat_template(video_msg, add_generation_prompt=False, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<video>\nWhat is happening?<|im_end|>\n"
        "<|im_start|>assistant\nA person cooks.<|im_end|>\n"
        "<|im_start|>user\n<image>\n<image>\nAnd here?<|im_end|>\n"
    )
    ids = tok.apply_chat_template(video_msg[:2], add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == IM_START and ids.count(VIDEO) == 1 and ids.count(IM_END) == 2


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
}

LEGACY_PREFIXES = {
    "language_model.model.",
    "language_model.lm_head.",
    "vision_tower.vision_model.",
    "multi_modal_projector.",
    "image_newline",
}
V5_PREFIXES = {"model.language_model.", "lm_head.", "model.vision_tower.", "model.multi_modal_projector.", "model.image_newline"}


def _prefixes(keys, candidates):
    found = set()
    for k in keys:
        match = [p for p in candidates if k.startswith(p)]
        assert len(match) == 1, k
        found.add(match[0])
    return found


def test_checkpoint_files(onevision_default, onevision_tied, onevision_default_v5):
    for d in (onevision_default, onevision_tied, onevision_default_v5):
        assert EXPECTED_FILES <= {p.name for p in d.iterdir()}, d


def test_legacy_key_names(onevision_default):
    keys = read_checkpoint_keys(onevision_default)
    assert _prefixes(keys, LEGACY_PREFIXES) == LEGACY_PREFIXES
    assert "language_model.lm_head.weight" in keys
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert "vision_tower.vision_model.post_layernorm.weight" in keys
    assert "image_newline" in keys


def test_v5_key_names(onevision_default_v5):
    keys = read_checkpoint_keys(onevision_default_v5)
    assert _prefixes(keys, V5_PREFIXES) == V5_PREFIXES
    assert "lm_head.weight" in keys and "model.image_newline" in keys
    assert "model.vision_tower.embeddings.patch_embedding.weight" in keys  # no "vision_model." level in 5.x
    assert not any(".vision_model." in k for k in keys)


def test_tied_has_no_lm_head(onevision_tied):
    keys = read_checkpoint_keys(onevision_tied)
    assert not any("lm_head" in k for k in keys)
    cfg = json.loads((onevision_tied / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["text_config"]["tie_word_embeddings"] is True
    model = load_reference(onevision_tied)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_configs(onevision_default, onevision_tied, qwen2_tokenizer_dir):
    d = json.loads((onevision_default / "config.json").read_text())
    t = json.loads((onevision_tied / "config.json").read_text())
    assert d["text_config"]["rope_parameters"]["rope_theta"] == 10000.0
    assert t["text_config"]["rope_parameters"]["rope_theta"] == 1_000_000.0
    assert d["text_config"]["vocab_size"] == t["text_config"]["vocab_size"] == 512  # 485 rounded up to 64
    assert d["image_token_index"] == IMAGE and d["video_token_index"] == VIDEO
    assert d["vision_config"]["image_size"] == 70 and t["vision_config"]["image_size"] == 56
    assert d["image_grid_pinpoints"][:2] == [[70, 70], [70, 140]] and len(d["image_grid_pinpoints"]) == 36
    assert t["image_grid_pinpoints"][-1] == [336, 336]
    assert d["vision_feature_select_strategy"] == "full" and d["vision_feature_layer"] == -1
    assert t["text_config"]["num_hidden_layers"] == 3
    # checkpoints carry the same tokenizer as the standalone fixture
    assert (onevision_default / "tokenizer.json").read_bytes() == (qwen2_tokenizer_dir / "tokenizer.json").read_bytes()


def test_processor_files(onevision_default, onevision_tied):
    for d, s, n in ((onevision_default, 70, 25), (onevision_tied, 56, 16)):
        pp = json.loads((d / "preprocessor_config.json").read_text())
        assert pp["image_processor_type"] == "LlavaOnevisionImageProcessor"
        assert pp["size"] == {"height": s, "width": s}
        assert pp["image_mean"] == [0.5, 0.5, 0.5] and pp["image_std"] == [0.5, 0.5, 0.5]
        assert pp["resample"] == 3 and pp["do_pad"] and pp["do_convert_rgb"]
        assert pp["image_grid_pinpoints"][0] == [s, s]
        vp = json.loads((d / "video_preprocessor_config.json").read_text())
        assert vp["video_processor_type"] == "LlavaOnevisionVideoProcessor" and vp["size"] == {"height": s, "width": s}
        pc = json.loads((d / "processor_config.json").read_text())
        assert pc["num_image_tokens"] == n and pc["vision_feature_select_strategy"] == "full"
        assert json.loads((d / "chat_template.json").read_text())["chat_template"] == ONEVISION_CHAT_TEMPLATE


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_legacy_and_v5_load_identically(onevision_default, onevision_default_v5):
    from transformers import LlavaOnevisionForConditionalGeneration

    for d in (onevision_default, onevision_default_v5):
        _, info = LlavaOnevisionForConditionalGeneration.from_pretrained(str(d), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    a, b = load_reference(onevision_default), load_reference(onevision_default_v5)
    _assert_same_state(a, b)
    # and the loaded values are exactly the stored ones (the v5 file's names are the module names)
    stored = read_checkpoint_tensors(onevision_default_v5)
    sd = b.state_dict()
    assert stored.keys() == sd.keys()
    for k, v in stored.items():
        np.testing.assert_array_equal(sd[k].numpy(), v, err_msg=k)


def test_other_layouts_load_identically(tmp_path, onevision_default, onevision_default_hub_config):
    ref = load_reference(onevision_default)
    for fmt, kw in (("v4", {}), ("v5_reverted", {}), ("legacy", {"max_shard_size": "200KB"})):
        d = build_onevision(tmp_path / fmt, "default", key_format=fmt, **kw)
        _assert_same_state(ref, load_reference(d))
    assert (tmp_path / "legacy" / "model.safetensors.index.json").exists()
    cfg = json.loads((onevision_default_hub_config / "config.json").read_text())
    assert cfg["text_config"]["rope_theta"] == 10000.0 and "rope_parameters" not in cfg["text_config"]
    hub = load_reference(onevision_default_hub_config)
    assert hub.config.text_config.rope_parameters["rope_theta"] == 10000.0
    _assert_same_state(ref, hub)


def test_weights_deterministic(tmp_path, onevision_default):
    d = build_onevision(tmp_path / "again", "default", key_format="legacy")
    a, b = read_checkpoint_tensors(onevision_default), read_checkpoint_tensors(d)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("which", ["onevision_default", "onevision_tied"])
def test_logits_not_uniform(which, request):
    d = request.getfixturevalue(which)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    model = load_reference(d)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Describe the video."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        logits = model(**ids).logits[0]
    probs = logits.softmax(-1)
    # uniform would be 1/512 ~ 0.002; the embedding scale keeps float32 noise below 1e-4 at ~0.03-0.05
    assert probs.max(-1).values.min().item() > 0.03
    assert probs[-1].max().item() > 0.03
    # padded vocab rows (>= len(tokenizer)) are essentially never the argmax
    assert (logits.argmax(-1) < len(tok)).all()


# ---------------------------------------------------------------------------------------------------------------
# transformers processor (no torchvision)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["onevision_default", "onevision_tied"])
def test_hf_processor_image_path_and_forward(which, request):
    from PIL import Image

    d = request.getfixturevalue(which)
    proc = load_hf_processor(d)
    assert type(proc.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"
    assert proc.video_processor is None
    s = json.loads((d / "config.json").read_text())["vision_config"]["image_size"]
    assert proc.image_processor.size["height"] == s and list(proc.image_processor.image_mean) == [0.5, 0.5, 0.5]

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))  # H=90, W=130
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
        add_generation_prompt=True,
    )
    assert text.count("<image>") == 1
    inputs = proc(images=image, text=text, return_tensors="pt")
    assert inputs["pixel_values"].shape[-3:] == (3, s, s)
    assert inputs["image_sizes"].tolist() == [[90, 130]]
    n_image_tokens = int((inputs["input_ids"] == IMAGE).sum())
    assert n_image_tokens > (s // 14) ** 2  # base features + anyres features + newlines

    model = load_reference(d)
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = feats[0] if isinstance(feats, (list, tuple)) else feats
        out = model(**inputs)
    assert feats.shape[0] == n_image_tokens
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], 512)
    assert torch.isfinite(out.logits).all()
