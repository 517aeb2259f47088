"""Recorded PyTorch references (tests/parity/*.npz) against the MLX models (issue #7).

tests/parity/manifest.json says, for each family, how its tiny random checkpoint is rebuilt (builder,
variant, seed) and how its reference was recorded. Here:

1. every stored reference is complete and small (no torch needed);
2. the rebuilt checkpoint passes `mlx-vidllm verify` against it (MLX only at run time; the builders in
   tests/fixtures use torch + transformers, so without torch this is skipped);
3. with torch, re-recording gives the stored file again: the fixtures are current;
4. a perturbed reference fails verify (exit 7); an 8-bit converted folder is reported, not failed (exit 0).

Also a script, for the machine that records (a CUDA one included):

    python tests/test_parity_fixtures.py record [--device cuda] [--dtype bfloat16] [--out DIR] [--only NAME]
    python tests/test_parity_fixtures.py full-size --out DIR [--device cuda] [--dtype float32] [--num-frames 16]

`record` without --out rewrites tests/parity/ (after a deliberate change); with --out it writes
DIR/NAME.DEVICE.DTYPE.npz, to compare (`python -m mlx_vidllm.parity compare tests/parity/X.npz DIR/X...npz`)
or verify. `full-size` builds a random-weight OneVision with the real 0.5B geometry and records it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tests/test_parity_fixtures.py ...`
    sys.path.insert(0, str(ROOT))

import mlx_vidllm  # noqa: E402,F401  (OpenBLAS before mlx.core)
from mlx_vidllm.parity import FORMAT, PARITY_EXIT_CODE, load_reference  # noqa: E402

PARITY = ROOT / "tests" / "parity"
MANIFEST = json.loads((PARITY / "manifest.json").read_text())
FIXTURES = MANIFEST["fixtures"]
MAX_BYTES = 300_000


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules
        return False


HAVE_TORCH = all(_installed(m) for m in ("torch", "transformers"))
NEEDS_TORCH = "the tiny checkpoint builders (tests/fixtures) and the recorder need torch " \
              "(pip install -e '.[test]'); the stored references are still checked by test_reference_file"


# ------------------------------------------------------------------------------------------------- building


def build_checkpoint(entry: dict, root: Path) -> dict[str, Path]:
    """Run the manifest's builder steps into `root`; returns {step name: folder} ("model" is the one recorded)."""
    built: dict[str, Path] = {}
    for step in entry["checkpoint"]:
        fn = getattr(importlib.import_module(step["module"]), step["function"])
        names = {"root": str(root), **{k: str(v) for k, v in built.items()}}
        kwargs = {k: v.format(**names) if isinstance(v, str) else v for k, v in step.get("kwargs", {}).items()}
        built[step["name"]] = Path(fn(root / step["name"], **kwargs))
    return built


def record_fixture(name: str, model_dir: Path, out: Path, device: str | None = None, dtype: str | None = None) -> Path:
    """Record `name`'s reference from the checkpoint in `model_dir` as the manifest says."""
    from mlx_vidllm.parity.references import record

    entry = FIXTURES[name]
    r = entry["record"]
    return record(model_dir, out, r["prompt"], video=ROOT / r["video"] if r.get("video") else None,
                  images=[ROOT / i for i in r.get("images", [])], device=device or r["device"],
                  dtype=dtype or r["dtype"], steps=r["steps"], last=r["last"], num_frames=r.get("num_frames"),
                  threads=r.get("threads"), fixture={"manifest": name, "checkpoint": entry["checkpoint"]})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoint folder per fixture name (and builder step), built once per distinct builder recipe."""
    cache: dict[str, dict[str, Path]] = {}

    def get(name: str, step: str = "model") -> Path:
        if not HAVE_TORCH:
            pytest.skip(NEEDS_TORCH)
        key = json.dumps(FIXTURES[name]["checkpoint"], sort_keys=True)
        if key not in cache:
            cache[key] = build_checkpoint(FIXTURES[name], tmp_path_factory.mktemp(name))
        return cache[key][step]

    return get


def run_verify(*args: str):
    from click.testing import CliRunner

    from mlx_vidllm.cli import main

    result = CliRunner().invoke(main, ["verify", *args])
    print(f"\n$ mlx-vidllm verify {' '.join(args)}\n{result.output}")
    return result


def rewrite(src: Path, dst: Path, **changes) -> Path:
    """A copy of the reference `src` with some arrays replaced (by key)."""
    with np.load(src, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data.update(changes)
    np.savez(dst, **data)
    return dst


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_reference_file(name):
    """Stored, small, complete, and describing the checkpoint the manifest rebuilds (no torch needed)."""
    entry = FIXTURES[name]
    path = PARITY / entry["reference"]
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    ref = load_reference(path)
    meta, rec = ref.meta, entry["record"]
    assert meta["format"] == FORMAT
    assert (meta["family"], meta["dtype"], meta["device"]) == (entry["family"], rec["dtype"], rec["device"])
    assert meta["model"]["fixture"] == {"manifest": name, "checkpoint": entry["checkpoint"]}
    assert meta["model"]["config"]["model_type"]  # the config that rebuilds it is stored too
    assert meta["prompt"] == rec["prompt"] and meta["steps"] == rec["steps"] == len(ref.tokens)
    assert {"torch", "transformers", "mlx_vidllm"} <= set(meta["versions"])
    assert ref.logits.shape == (len(ref.positions), ref.logits.shape[1]) and ref.logits.dtype == np.float32
    assert ref.embeds.shape[0] == np.asarray(ref.inputs["input_ids"]).shape[-1]
    assert ref.vision and all(v.ndim == 3 for v in ref.vision.values())
    assert "video.0" in ref.vision and (("image" in ref.vision) == bool(rec.get("images")))
    assert len(set(ref.tokens.tolist())) > 1  # a decisive, non-degenerate greedy run
    assert float(np.abs(ref.logits).max()) > 1.0


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_verify_passes(checkpoints, name):
    """The rebuilt checkpoint is within the recorded dtype's tolerance (mlx-vidllm verify, exit 0)."""
    result = run_verify("--model", str(checkpoints(name)), "--reference", str(PARITY / FIXTURES[name]["reference"]))
    assert result.exit_code == 0, result.output
    assert "PASS: within tolerance" in result.output
    for stage in ("embeds", "logits", "greedy.teacher_forced", "greedy.free_running"):
        assert f"\n{stage} " in result.output


@pytest.mark.parametrize("name,step", [(n, s) for n in sorted(FIXTURES) for s in FIXTURES[n].get("also_verify", [])])
def test_verify_passes_on_other_formats(checkpoints, name, step):
    """The same weights in another checkpoint format (LLaVA-Video's original LLaVA-NeXT folder, which
    transformers cannot load) pass against the same reference."""
    result = run_verify("--model", str(checkpoints(name, step)),
                        "--reference", str(PARITY / FIXTURES[name]["reference"]))
    assert result.exit_code == 0, result.output
    assert "PASS: within tolerance" in result.output


def record_in_fresh_process(name: str, model_dir: Path, out: Path) -> Path:
    """Record in a new interpreter, as the stored references were: torch's float32 results can move by ~1e-6
    with what ran before in the same process (kernel choices), which the 1e-6 comparison must not see."""
    import subprocess

    code = ("import sys; from pathlib import Path; from tests.test_parity_fixtures import record_fixture; "
            "record_fixture(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", code, name, str(model_dir), str(out)], cwd=ROOT, check=True, timeout=600)
    return out


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_is_current(checkpoints, name, tmp_path):
    """Re-recording with torch gives the stored reference: inputs and tokens identical, arrays within 1e-6
    (float32; half-precision arrays within a float16 ulp or two, rtol 2e-3)."""
    model_dir = checkpoints(name)
    new = load_reference(record_in_fresh_process(name, model_dir, tmp_path / "new.npz"))
    old = load_reference(PARITY / FIXTURES[name]["reference"])
    assert new.inputs.keys() == old.inputs.keys()
    for k, v in old.inputs.items():
        for a, b in zip(v if isinstance(v, list) else [v], new.inputs[k] if isinstance(v, list) else [new.inputs[k]]):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=f"input {k}")
    np.testing.assert_array_equal(new.positions, old.positions)
    assert new.tokens.tolist() == old.tokens.tolist()
    rtol = 1e-6 if old.dtype == "float32" else 2e-3
    assert new.vision.keys() == old.vision.keys()
    pairs = [(f"vision.{k}", new.vision[k], v) for k, v in old.vision.items()]
    pairs += [("embeds", new.embeds, old.embeds), ("logits", new.logits, old.logits),
              ("margins", new.margins, old.margins)]
    for what, a, b in pairs:
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=rtol, err_msg=what)
    print(f"\n[parity] {name}: re-recorded, max |Δ| vs stored: " + ", ".join(
        f"{w} {float(np.abs(a - b).max()):.1e}" for w, a, b in pairs))


def test_perturbed_reference_fails(checkpoints, tmp_path):
    """Logits moved past the tolerance, or a greedy token changed, fail with exit code 7."""
    model_dir = checkpoints("onevision_f32")
    src = PARITY / FIXTURES["onevision_f32"]["reference"]
    ref = load_reference(src)
    logits = ref.logits.copy()
    logits[len(logits) // 2, 7] += 3e-4  # 3x the float32 tolerance, at one entry
    bad = rewrite(src, tmp_path / "logits.npz", **{"ref.logits": logits})
    result = run_verify("--model", str(model_dir), "--reference", str(bad))
    assert result.exit_code == PARITY_EXIT_CODE == 7
    assert "FAIL: logits max |Δ|" in result.output

    from mlx_vidllm.loading import load
    from mlx_vidllm.parity.verify import verify_reference

    loaded = load(model_dir, dtype="float32", **ref.meta["options"])
    tokens = ref.tokens.copy()
    step = int(np.argmax(ref.margins[:10]))  # a decisive step: no near-tie excuse
    tokens[step] = (tokens[step] + 1) % ref.logits.shape[1]
    report = verify_reference(model_dir, rewrite(src, tmp_path / "tokens.npz", **{"ref.greedy.tokens": tokens}),
                              loaded=loaded)
    assert report.exit_code == 7 and report.first_divergence == step
    assert any("greedy tokens diverge" in f for f in report.failures)
    # the same divergence at a recorded near-tie is reported, not failed
    margins = ref.margins.copy()
    margins[step] = 5e-5
    report = verify_reference(model_dir, rewrite(src, tmp_path / "tie.npz", **{"ref.greedy.tokens": tokens,
                                                                               "ref.greedy.margins": margins}),
                              loaded=loaded)
    assert report.exit_code == 0 and any("near-tie" in n for n in report.notes)


def test_perturbed_half_precision_reference_fails(checkpoints, tmp_path):
    """Half precision: one position's top-1 swapped drops the agreement below 0.99 (exit 7)."""
    src = PARITY / FIXTURES["onevision_f16"]["reference"]
    logits = load_reference(src).logits.copy()
    top2 = np.sort(logits, axis=-1)[:, -2:]
    row = logits[int(np.argmax(top2[:, 1] - top2[:, 0]))]  # the most decisive position: no near-tie excuse
    first, second = np.argsort(row)[-2:][::-1]
    row[first], row[second] = row[second], row[first]  # relative error barely moves, the argmax does
    result = run_verify("--model", str(checkpoints("onevision_f16")), "--reference",
                        str(rewrite(src, tmp_path / "top1.npz", **{"ref.logits": logits})))
    assert result.exit_code == 7
    assert "top-1 agreement" in result.output


def test_quantized_folder_is_reported_not_failed(checkpoints, tmp_path):
    """An 8-bit folder converted from the checkpoint: the quantization error is printed, exit 0."""
    from mlx_vidllm import convert

    q8 = convert(checkpoints("onevision_f32"), tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32, quiet=True)
    ref = PARITY / FIXTURES["onevision_f32"]["reference"]
    result = run_verify("--model", str(q8), "--reference", str(ref))
    assert result.exit_code == 0, result.output
    assert "quantized model: reporting quantization error, not failing" in result.output
    assert "(quantized 8-bit, group 32)" in result.output
    result = run_verify("--model", str(q8), "--reference", str(ref), "--json")
    report = json.loads(result.output[result.output.index("{"):])
    logits = next(s for s in report["stages"] if s["name"] == "logits")
    assert report["quantized"] and report["exit_code"] == 0
    assert 0 < logits["rel"] < 0.2  # a real, bounded quantization error
    vision = next(s for s in report["stages"] if s["name"] == "vision.image")
    assert vision["max_abs"] < 1e-4  # the vision tower stays float: it is not quantized by default


def test_verify_errors_are_one_line(checkpoints, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes((PARITY / FIXTURES["onevision_f32"]["reference"]).read_bytes()[:1000])
    result = run_verify("--model", str(checkpoints("video_llava_f32")), "--reference", str(bad))
    assert result.exit_code == 1 and "not a readable mlx-vidllm parity reference" in result.output
    result = run_verify("--model", str(checkpoints("video_llava_f32")),
                        "--reference", str(PARITY / FIXTURES["onevision_f32"]["reference"]))
    assert result.exit_code == 4 and "recorded from a llava_onevision model" in result.output


def test_compare_two_recordings(capsys):
    """`compare`: the same inputs recorded in float16 and float32 (as CUDA vs CPU would be); numpy only."""
    from mlx_vidllm.parity.__main__ import main

    f32, f16 = (str(PARITY / FIXTURES[n]["reference"]) for n in ("onevision_f32", "onevision_f16"))
    assert main(["compare", f32, f16]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "note: inputs identical" in out and "\nlogits " in out and "\ngreedy " in out


def test_recorder_says_which_extra_to_install(monkeypatch, capsys):
    """Without torch the recorder stops with one line naming the extra (torch is not a run-time dependency)."""
    from mlx_vidllm.parity.__main__ import main

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    code = main(["record", "--model", str(ROOT / "missing"), "--prompt", "Q?", "--out", "x.npz"])
    err = capsys.readouterr().err
    assert code == 1 and "needs torch" in err and 'pip install "mlx-vidllm[torch]"' in err


# ------------------------------------------------------------------------------------------------- script

# A random-weight OneVision with the geometry of llava-hf/llava-onevision-qwen2-0.5b-ov-hf (SigLIP so400m, 26
# layers, 384 px; Qwen2-0.5B), the offline test tokenizer, transformers' own initialisation (seeded).
FULL_SIZE_TEXT = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      vocab_size=152000, max_position_embeddings=32768, tie_word_embeddings=True,
                      use_sliding_window=False, hidden_act="silu")


def build_full_size_onevision(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from tests.fixtures.onevision import _write_processor_files
    from tests.fixtures.tokenizer import ONEVISION_CHAT_TEMPLATE, build_qwen2_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen2_tokenizer(out_dir)
    config = LlavaOnevisionConfig(
        text_config=dict(FULL_SIZE_TEXT, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>")),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():  # transformers leaves image_newline at zero: give it the scale of a trained one
        model.model.image_newline.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    _write_processor_files(out_dir, config, tokenizer, ONEVISION_CHAT_TEMPLATE)
    (out_dir / "fixture_info.json").write_text(json.dumps({"variant": "full-size-0.5b-random", "seed": seed}) + "\n")
    return out_dir


def _main(argv=None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python tests/test_parity_fixtures.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="rebuild the tiny checkpoints and record their references")
    rec.add_argument("--device")
    rec.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    rec.add_argument("--out", type=Path, help="write DIR/NAME.DEVICE.DTYPE.npz (default: rewrite tests/parity/)")
    rec.add_argument("--only", action="append", choices=sorted(FIXTURES))
    rec.add_argument("--keep", type=Path, help="build the checkpoints here and keep them (default: a temp dir)")
    full = sub.add_parser("full-size", help="random-weight OneVision-0.5B geometry: build, then record")
    full.add_argument("--out", type=Path, required=True, help="folder for the checkpoint and the references")
    full.add_argument("--device", default="cpu")
    full.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    full.add_argument("--num-frames", type=int, default=16)
    full.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.cmd == "full-size":
        model = args.out / "onevision-0.5b-random"
        if not (model / "config.json").exists():
            build_full_size_onevision(model, args.seed)
        from mlx_vidllm.parity.references import record

        for dtype in args.dtype or ["float32"]:
            out = record(model, args.out / f"onevision-0.5b-random.{args.device.replace(':', '')}.{dtype}.npz",
                         "What happens in this video?", video=ROOT / "tests/data/llavanext_xU25MMA2N4aVtYay.mp4",
                         device=args.device, dtype=dtype, num_frames=args.num_frames,
                         fixture={"builder": "tests/test_parity_fixtures.py::build_full_size_onevision",
                                  "seed": args.seed})
            print(f"wrote {out}; verify with: mlx-vidllm verify --model {model} --reference {out}"
                  + (" --rtol 1e-3" if dtype == "float32" else ""))
        return 0

    names = args.only or sorted(FIXTURES)
    work = Path(tempfile.mkdtemp(prefix="parity-")) if args.keep is None else args.keep
    try:
        built: dict[str, Path] = {}
        for name in names:
            key = json.dumps(FIXTURES[name]["checkpoint"], sort_keys=True)
            if key not in built:
                built[key] = build_checkpoint(FIXTURES[name], work / name)["model"]
            r = FIXTURES[name]["record"]
            device, dtype = args.device or r["device"], args.dtype or r["dtype"]
            out = PARITY / FIXTURES[name]["reference"] if args.out is None else \
                args.out / f"{name}.{device.replace(':', '')}.{dtype}.npz"
            record_fixture(name, built[key], out, device=device, dtype=dtype)
            print(f"{name}: wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
