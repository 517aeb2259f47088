"""Build (once, cached) the random-weight OneVision-0.5B benchmark checkpoints.

    python benchmarks/build.py [--preset full|small]

Under `benchmarks/.cache/<preset>-<hash>/` (the hash covers the preset, the seed and BUILD_VERSION):

    hf/             transformers format, Hub layout (legacy key names, Hub-style config.json), float16 like the Hub
    mlx-vidllm-4bit/  mlx_vidllm.convert(..., quantize=True): decoder 4-bit, group 64; the rest float32
    mlx-vlm-4bit/   mlx_vlm.convert(..., quantize=True): decoder 4-bit, group 64 (vision skipped); the rest float32
    mlx-vlm-float32/  mlx_vlm.convert(..., dtype="float32"): mlx-vlm has no load-time dtype, this is its way to f32

The tokenizer, chat template and processor files come from the test fixtures (tests/fixtures/), the
model is transformers' own LlavaOnevisionForConditionalGeneration with its default (seeded) random init.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
BUILD_VERSION = 1  # bump when the build changes in a way the preset does not capture

VOCAB = 152_000  # "real vocab": the embedding / lm_head size of the benchmark model

# Shapes in the layout of tests/fixtures/onevision.py presets.
FULL = {
    "seed": 0,
    "vision": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                   num_attention_heads=16, patch_size=14, image_size=384, num_channels=3, layer_norm_eps=1e-6,
                   hidden_act="gelu_pytorch_tanh", vision_use_head=False, attention_dropout=0.0),
    "text": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                 hidden_act="silu", max_position_embeddings=32768, tie_word_embeddings=True,
                 use_sliding_window=False, attention_dropout=0.0),
    "top": dict(vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=True),
    "grid_max": 6,
    "vocab_multiple": 64,
    "vocab_size": VOCAB,
}

# Same image size (27x27 patches: the same 196 tokens per frame, the same prompt lengths) and vocab,
# a few narrow layers: for checking the benchmark itself, not for timing.
SMALL = copy.deepcopy(FULL)
SMALL["vision"].update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
SMALL["text"].update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)

PRESETS = {"full": FULL, "small": SMALL}
Q_BITS, Q_GROUP = 4, 64


def key(preset: str) -> str:
    blob = json.dumps({"preset": PRESETS[preset], "version": BUILD_VERSION, "q": [Q_BITS, Q_GROUP]}, sort_keys=True)
    return f"{preset}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def paths(preset: str) -> dict[str, Path]:
    base = CACHE / key(preset)
    return {"base": base, "hf": base / "hf", "mlx-vidllm-4bit": base / "mlx-vidllm-4bit",
            "mlx-vlm-4bit": base / "mlx-vlm-4bit", "mlx-vlm-float32": base / "mlx-vlm-float32"}


def _log(msg: str) -> None:
    print(f"[build] {msg}", file=sys.stderr, flush=True)


def build_hf(out: Path, p: dict) -> None:
    """The transformers checkpoint: fixture tokenizer + processor files, seeded default init, float16."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    sys.path.insert(0, str(ROOT))
    from tests.fixtures.onevision import (_legacy_config_json, _make_config, _write_processor_files,
                                          convert_checkpoint_keys)
    from tests.fixtures.tokenizer import ONEVISION_CHAT_TEMPLATE, build_qwen2_tokenizer

    out.mkdir(parents=True)
    tokenizer = build_qwen2_tokenizer(out)
    config = _make_config(p, tokenizer)
    config.text_config.vocab_size = p["vocab_size"]
    torch.manual_seed(p["seed"])
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(torch.float16)
    model.save_pretrained(str(out), safe_serialization=True, save_original_format=False)
    del model
    convert_checkpoint_keys(out, "legacy")  # the Hub's key names
    _legacy_config_json(out / "config.json")  # and its config.json style (rope_theta, torch_dtype)
    _write_processor_files(out, config, tokenizer, ONEVISION_CHAT_TEMPLATE)


def build_ours_4bit(src: Path, out: Path) -> str:
    import mlx_vidllm

    mlx_vidllm.convert(str(src), str(out), quantize=True, q_bits=Q_BITS, q_group_size=Q_GROUP, dtype="float32",
                       quiet=True)
    return "mlx_vidllm.convert(quantize=True, q_bits=4, q_group_size=64, dtype='float32')"


def build_mlx_vlm(src: Path, out: Path, quantize: bool) -> str:
    from mlx_vlm import convert

    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(src), str(out), quantize=quantize, q_bits=Q_BITS, q_group_size=Q_GROUP, dtype="float32")
    return ("mlx_vlm.convert(quantize=True, q_bits=4, q_group_size=64, dtype='float32')" if quantize
            else "mlx_vlm.convert(dtype='float32')")


def _atomic(target: Path, make) -> str:
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        note = make(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return note


def build(preset: str = "full") -> dict[str, Path]:
    """Build what is missing; returns the paths. Safe to call every run (cheap when cached)."""
    ps = paths(preset)
    ps["base"].mkdir(parents=True, exist_ok=True)
    info_file = ps["base"] / "build.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {"preset": preset, "spec": PRESETS[preset]}
    steps = [("hf", lambda d: build_hf(d, PRESETS[preset]) or "transformers save_pretrained, float16"),
             ("mlx-vidllm-4bit", lambda d: build_ours_4bit(ps["hf"], d)),
             ("mlx-vlm-4bit", lambda d: build_mlx_vlm(ps["hf"], d, quantize=True)),
             ("mlx-vlm-float32", lambda d: build_mlx_vlm(ps["hf"], d, quantize=False))]
    for name, make in steps:
        if ps[name].exists():
            continue
        import mlx_vidllm  # noqa: F401 - OpenBLAS before anything imports mlx.core
        start = time.perf_counter()
        _log(f"{preset}: building {name} -> {ps[name]}")
        note = _atomic(ps[name], make)
        info[name] = {"how": note, "seconds": round(time.perf_counter() - start, 1)}
        info_file.write_text(json.dumps(info, indent=2) + "\n")
        _log(f"{preset}: {name} done in {info[name]['seconds']} s")
    return ps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    args = ap.parse_args()
    for name, path in build(args.preset).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
