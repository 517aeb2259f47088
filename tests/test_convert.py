"""`mlx-vidllm convert` (issue #4): round trips, quantization, atomic writes, CLI, model card, upload.

Everything is offline and tiny (float32); measured numbers are printed with a "[convert]" prefix (pytest -s).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_vidllm import convert, load, stream_generate
from mlx_vidllm.cli import main
from mlx_vidllm.errors import ConversionError, ModelError
from mlx_vidllm.models import families
from tests.fixtures.media import rgb, video

conv = importlib.import_module("mlx_vidllm.convert")  # the module (the package attribute is the function)

CONFTEST = Path(__file__).with_name("conftest.py")
ROOT = Path(__file__).resolve().parent.parent


def checkpoint_fixtures() -> list[str]:
    """Every checkpoint fixture of tests/conftest.py (those calling a build_* model helper), except variants that
    only change config.json: new families' fixtures are picked up as they are added."""
    text = CONFTEST.read_text()
    names = []
    for m in re.finditer(r"^def (\w+)\(tmp_path_factory[^)]*\)[^\n]*\n(.*?)(?=^@|^def |\Z)", text, re.M | re.S):
        if re.search(r"\bbuild_(?!\w*tokenizer)\w+\(", m.group(2)) and not m.group(1).endswith("_hub_config"):
            names.append(m.group(1))
    return names


FIXTURES = checkpoint_fixtures()


def media_inputs(processor) -> dict:
    """A fixed image + video prompt (8 frames: Video-LLaVA's trained count; fine for every family)."""
    text = processor.format_prompt("Describe the image and the video.", num_images=1, num_videos=1)
    return processor(text, images=[rgb(90, 70, seed=3)], videos=[video(8, seed=4)])


def logits(model, inputs) -> np.ndarray:
    return np.array(model(**inputs).astype(mx.float32))


def saved_tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def family_of(folder: Path) -> families.Family:
    return families.detect_family(json.loads((folder / "config.json").read_text()))


def test_fixtures_cover_every_family():
    """Every registered family has a conftest checkpoint fixture the round trip runs on (else: skipped, named)."""
    covered = {"llava_onevision": "onevision_", "video_llava": "video_llava_", "llava_video": "llava_video_"}
    missing = [f.name for f in families.FAMILIES if not any(n.startswith(covered.get(f.name, f.name)) for n in FIXTURES)]
    assert {"onevision_default", "onevision_tied", "onevision_default_v5"} <= set(FIXTURES)
    if missing:
        pytest.skip(f"no round-trip fixture yet for famil(y/ies) {missing}")


# --- float round trip, every family ----------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", FIXTURES)
def test_round_trip(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    out = convert(src, tmp_path / "mlx", dtype="float32", quiet=True)
    assert out == (tmp_path / "mlx").absolute()

    m_src, p_src = load(src, dtype="float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m_out, p_out = load(out)
    assert not [w for w in caught if "not used by mlx-vidllm" in str(w.message)]  # our config entries are ours
    a, b = media_inputs(p_src), media_inputs(p_out)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])  # tokenizer and processor files came along
    ref, got = logits(m_src, a), logits(m_out, b)
    delta = float(np.abs(ref - got).max())
    print(f"\n[convert] round trip {fixture}: max |Δ logits| = {delta:.1e} (max |logit| {np.abs(ref).max():.2f})")
    assert delta <= 1e-6
    assert float(np.abs(ref).max()) > 1.0

    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    family = family_of(src)
    assert cfg["mlx_vidllm"]["family"] == family.name
    assert cfg["mlx_vidllm"]["source_format"] in ("transformers", "transformers-v5", "llava-next-original", "llama-vid-original")
    assert "quantization" not in cfg
    assert {k: v for k, v in cfg.items() if k != "mlx_vidllm"} == src_cfg  # the original config, plus ours

    # weights under our module names, which the family's key rules leave as they are (no double renames)
    tensors = saved_tensors(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] > 0
    from mlx.utils import tree_flatten

    assert set(tensors) == {k for k, _ in tree_flatten(m_out.parameters())}
    assert set(families.rename_keys(tensors, family.key_rules)) == set(tensors)
    # conv weights stored in MLX layout (O, kh, kw, 3) and not transposed again on load
    convs = [k for k in tensors if k.endswith("patch_embedding.weight")]
    assert convs
    for k in convs:
        assert tensors[k].shape[-1] == 3 and tensors[k].shape[1] != 3
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json",
                 "README.md"):
        if name == "tokenizer.json" and (src / "tokenizer.model").exists() and not (src / "tokenizer.json").exists():
            name = "tokenizer.model"  # LLaMA-VID ships only the SentencePiece model
        if name == "preprocessor_config.json" and family.name == "llava_video" and \
                not (src / name).exists():
            continue  # original LLaVA-NeXT repos have none: their SigLIP preprocessing is fixed in code
        assert (out / name).exists(), name
    for name in os.listdir(src):  # every tokenizer / processor / template file of the source came along
        if name.startswith("tokenizer") or name.endswith(("processor_config.json", ".jinja")) \
                or name in ("chat_template.json", "generation_config.json", "special_tokens_map.json"):
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (out / "fixture_info.json").exists()  # only known files are copied


def test_converted_folder_reconverts_identically(onevision_default, tmp_path):
    """A converted folder is itself a valid source (its keys are already ours)."""
    first = convert(onevision_default, tmp_path / "a", dtype="float32", quiet=True)
    second = convert(first, tmp_path / "b", quiet=True)
    t1, t2 = saved_tensors(first), saved_tensors(second)
    assert set(t1) == set(t2)
    assert all(mx.array_equal(t1[k], t2[k]).item() for k in t1)
    assert json.loads((second / "config.json").read_text())["mlx_vidllm"]["source_format"] == "mlx-vidllm"


def test_dtype_cast(onevision_default, tmp_path):
    out = convert(onevision_default, tmp_path / "f16", dtype="float16", quiet=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlx_vidllm"]["dtype"] == "float16" and cfg.get("dtype", "float16") == "float16"
    assert {str(v.dtype) for v in saved_tensors(out).values()} == {"mlx.core.float16"}
    model, _ = load(out)
    assert model.language_model.model.embed_tokens.weight.dtype == mx.float16


def test_float16_folder_loads_as_float32_with_the_same_values(onevision_default, tmp_path):
    """load(dtype=) casts tensor by tensor (the stored copy of each is dropped as it goes): every parameter
    ends up float32 and equal to the stored float16 value."""
    from mlx.utils import tree_flatten

    out = convert(onevision_default, tmp_path / "f16", dtype="float16", quiet=True)
    stored = {k: v for k, v in saved_tensors(out).items()}
    model, _ = load(out, dtype="float32")
    params = dict(tree_flatten(model.parameters()))
    assert {str(v.dtype) for v in params.values()} == {"mlx.core.float32"}
    key = next(k for k in stored if k.endswith("embed_tokens.weight"))
    loaded = params[next(k for k in params if k.endswith("embed_tokens.weight"))]
    assert mx.array_equal(loaded, stored[key].astype(mx.float32)).item()


# --- quantization -------------------------------------------------------------------------------------------------


def quant_error(src: Path, out: Path) -> tuple[float, float]:
    m_f, p = load(src, dtype="float32")
    m_q, _ = load(out)
    inputs = media_inputs(p)
    ref, got = logits(m_f, inputs)[0], logits(m_q, inputs)[0]
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    return rel, top1


@pytest.mark.parametrize("fixture", ["onevision_default", "onevision_tied"])
def test_quantized_loads_and_generates(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    errors = {}
    for bits in (4, 8):
        out = convert(src, tmp_path / f"q{bits}", quantize=True, q_bits=bits, q_group_size=32, dtype="float32",
                      quiet=True)
        cfg = json.loads((out / "config.json").read_text())
        q = cfg["quantization"]
        assert (q["bits"], q["group_size"], q["mode"], q["modules"], q["quantize_vision"]) == \
            (bits, 32, "affine", ["language_model"], False)
        assert cfg["quantization_config"] == q
        model, processor = load(out)  # plain load(): quantized from the config before the weights load
        lm = model.language_model
        assert isinstance(lm.model.embed_tokens, nn.QuantizedEmbedding)
        assert isinstance(lm.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
        assert isinstance(lm.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
        # the vision tower and projector stayed float
        assert type(model.vision_tower.layers[0].self_attn.q_proj) is nn.Linear
        assert type(model.multi_modal_projector.linear_1) is nn.Linear
        tensors = saved_tensors(out)
        assert set(families.rename_keys(tensors, family_of(out).key_rules)) == set(tensors)
        assert not any(k.startswith("vision_tower.") and k.endswith(".scales") for k in tensors)
        errors[bits] = quant_error(src, out)
        tokens = [r.token for r in stream_generate(model, processor, "Describe it.", video=video(3, seed=5),
                                                   max_tokens=4)]
        assert len(tokens) >= 1
        before = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        after = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        print(f"\n[convert] {fixture} {bits}-bit g32 (decoder only): relative logit error {errors[bits][0]:.4f}, "
              f"top-1 agreement {errors[bits][1]:.3f}, weights {before:,} -> {after:,} bytes")
        assert after < before
    assert errors[8][0] < errors[4][0]
    assert errors[8][0] < 0.05 and errors[8][1] >= 0.9


def test_quantize_vision(onevision_default, tmp_path, capsys):
    out = convert(onevision_default, tmp_path / "qv", quantize=True, q_bits=4, q_group_size=32, dtype="float32",
                  quantize_vision=True)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["quantize_vision"] is True
    assert q["modules"] == ["language_model", "multi_modal_projector", "vision_tower"]
    model, processor = load(out)
    assert isinstance(model.vision_tower.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.vision_tower.layers[0].mlp.fc2, nn.QuantizedLinear)
    assert isinstance(model.multi_modal_projector.linear_1, nn.QuantizedLinear)
    assert type(model.vision_tower.embeddings.position_embedding) is nn.Embedding  # read as a matrix: stays float
    rel, top1 = quant_error(onevision_default, out)
    print(f"\n[convert] onevision_default 4-bit g32 + vision: relative logit error {rel:.4f}, top-1 {top1:.3f}")
    assert "note:" not in capsys.readouterr().out  # group 32 divides every dimension here


def test_layers_the_group_does_not_divide_stay_float(onevision_default, tmp_path, capsys):
    """Group 64 with --quantize-vision: the 32-wide vision layers stay float and the summary names them."""
    out = convert(onevision_default, tmp_path / "g64", quantize=True, quantize_vision=True, dtype="float32")
    printed = capsys.readouterr().out
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 64)  # the defaults
    kept = q["float_layers"]
    assert "vision_tower.layers.0.self_attn.q_proj" in kept and "multi_modal_projector.linear_1" in kept
    assert "vision_tower.layers.0.mlp.fc2" not in kept  # input 64: quantized
    note = [line for line in printed.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "vision_tower.layers.0.self_attn.q_proj" in note[0] and "group size 64" in note[0]
    model, _ = load(out)
    assert type(model.vision_tower.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(model.vision_tower.layers[0].mlp.fc2, nn.QuantizedLinear)
    card = (out / "README.md").read_text()
    assert "vision_tower.layers.0.self_attn.q_proj" in card and "--quantize-vision" in card


def test_option_checks(onevision_default, tmp_path):
    with pytest.raises(ConversionError, match="bits"):
        convert(onevision_default, tmp_path / "x", quantize=True, q_bits=7)
    with pytest.raises(ConversionError, match="group"):
        convert(onevision_default, tmp_path / "x", quantize=True, q_group_size=48)
    with pytest.raises(ConversionError, match="needs quantize"):
        convert(onevision_default, tmp_path / "x", quantize_vision=True)
    q = convert(onevision_default, tmp_path / "q", quantize=True, q_group_size=32, quiet=True)
    with pytest.raises(ConversionError, match="already quantized"):
        convert(q, tmp_path / "qq", quantize=True, quiet=True)
    with pytest.raises(ModelError):
        convert(tmp_path / "missing", tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # nothing else was written, no partial left


# --- PyTorch pickles (.bin / .pth) ------------------------------------------------------------------------------


def test_bin_checkpoint_converts(onevision_default, tmp_path):
    """A pytorch_model.bin (torch.save of the state dict) converts to the same weights as the safetensors."""
    import shutil

    import torch
    from safetensors.torch import load_file

    src = tmp_path / "bin_src"
    src.mkdir()
    for f in onevision_default.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, src / f.name)
    state = {}
    for f in onevision_default.glob("*.safetensors"):
        state.update(load_file(str(f)))
    torch.save(state, src / "pytorch_model.bin")
    torch.save({"epoch": 1}, src / "training_args.bin")  # not weights: ignored
    out = convert(src, tmp_path / "from_bin", dtype="float32", quiet=True)
    assert json.loads((out / "config.json").read_text())["mlx_vidllm"]["source_format"] == "transformers"
    m_ref, p = load(onevision_default, dtype="float32")
    m_out, _ = load(out)
    inputs = media_inputs(p)
    assert float(np.abs(logits(m_ref, inputs) - logits(m_out, inputs)).max()) <= 1e-6


def test_torch_pickle_reader(tmp_path):
    import torch

    from mlx_vidllm.loading import load_torch_pickle, load_weights

    bf = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16)
    torch.save({"state_dict": {"a.weight": bf, "b": torch.ones(2, dtype=torch.int64).t(), "step": 3}},
               tmp_path / "eva_vit_g.pth")
    w = load_torch_pickle(tmp_path / "eva_vit_g.pth")
    assert set(w) == {"a.weight", "b"}
    assert w["a.weight"].dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(w["a.weight"].astype(mx.float32)), np.arange(6).reshape(2, 3))
    assert load_weights(tmp_path).keys() == w.keys()
    torch.save([1, 2], tmp_path / "junk.bin")
    with pytest.raises(ModelError, match="junk.bin: holds a list"):
        load_weights(tmp_path)
    (tmp_path / "bad.pth").write_bytes(b"not a pickle")
    with pytest.raises(ModelError, match="bad.pth: not a readable PyTorch state dict"):
        load_torch_pickle(tmp_path / "bad.pth")


# --- atomic writes ------------------------------------------------------------------------------------------------


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def start_paused_conversion(src: Path, target: Path) -> tuple[subprocess.Popen, Path]:
    """A CLI conversion that sleeps after writing its first shard; returns once that shard is on disk."""
    env = dict(os.environ, **{conv.PAUSE_ENV: "120"})
    proc = subprocess.Popen([sys.executable, "-m", "mlx_vidllm.cli", "convert", "--hf-path", str(src),
                             "--mlx-path", str(target)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        partial = [p for p in target.parent.glob(f".{target.name}.partial-*") if (p / "model.safetensors").exists()]
        if partial:
            return proc, partial[0]
        if proc.poll() is not None:
            pytest.fail(f"conversion ended before pausing: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the conversion never wrote its first shard")


def test_sigkill_leaves_no_model_and_next_run_cleans_up(onevision_default, tmp_path):
    target = tmp_path / "out"
    proc, partial = start_paused_conversion(onevision_default, target)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.wait(timeout=30)
    assert not target.exists()
    assert partial.exists() and not (partial / "config.json").exists()  # hidden, and never looks like a model
    assert hidden_leftovers(tmp_path) == [partial.name]
    convert(onevision_default, target, quiet=True)
    assert (target / "config.json").exists()
    assert hidden_leftovers(tmp_path) == []


def test_sigterm_removes_the_partial_folder(onevision_default, tmp_path):
    target = tmp_path / "out"
    proc, partial = start_paused_conversion(onevision_default, target)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not target.exists() and hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_conversion_removes_the_partial_folder(onevision_default, tmp_path, monkeypatch, error):
    def boom(src, out):
        assert (out / "model.safetensors").exists()  # weights were already written
        raise error

    monkeypatch.setattr(conv, "_copy_side_files", boom)
    with pytest.raises(type(error)):
        convert(onevision_default, tmp_path / "out", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_existing_target_needs_force(onevision_default, tmp_path):
    target = tmp_path / "out"
    convert(onevision_default, target, dtype="float32", quiet=True)
    runner = CliRunner()
    args = ["convert", "--hf-path", str(onevision_default), "--mlx-path", str(target), "--dtype", "float16"]
    result = runner.invoke(main, args)
    assert result.exit_code == 5
    assert result.output.strip().splitlines() == [
        f"error: {target} already exists: pass --force (force=True) to replace it"]
    assert json.loads((target / "config.json").read_text())["mlx_vidllm"]["dtype"] == "float32"  # untouched
    result = runner.invoke(main, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((target / "config.json").read_text())["mlx_vidllm"]["dtype"] == "float16"
    assert hidden_leftovers(tmp_path) == []
    # --force never deletes a folder that is not a model
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    result = runner.invoke(main, ["convert", "--hf-path", str(onevision_default), "--mlx-path", str(other), "--force"])
    assert result.exit_code == 5 and "not a model folder" in result.output
    assert (other / "todo.txt").read_text() == "keep me"
    with pytest.raises(ConversionError, match="must not be the source"):
        convert(target, target, force=True)


# --- CLI and model card -----------------------------------------------------------------------------------------


def test_convert_help():
    result = CliRunner().invoke(main, ["convert", "--help"])
    assert result.exit_code == 0
    for text in ("--hf-path", "--mlx-path", "--quantize", "--q-bits", "--q-group-size", "--dtype",
                 "--quantize-vision", "--upload-repo", "--force", "--debug", "default 4", "default 64",
                 "Exit codes"):
        assert text in result.output, text


def test_cli_convert_prints_summary_and_card(onevision_default, tmp_path):
    out = tmp_path / "ov-4bit"
    result = CliRunner().invoke(main, ["convert", "--hf-path", str(onevision_default), "--mlx-path", str(out),
                                       "-q", "--q-group-size", "32"])
    assert result.exit_code == 0, result.output
    summary = [line for line in result.stdout.splitlines() if line.startswith("converted ")]  # bar: stderr
    assert len(summary) == 1
    assert re.search(r"converted llava_onevision \(transformers\) -> .*ov-4bit: [\d,]+ parameters, "
                     r"[\d.]+ KB -> [\d.]+ KB, 4-bit, group 32 \(language_model\), [\d.]+ s", summary[0]), summary[0]
    print(f"\n[convert] CLI summary: {summary[0]}")

    import yaml

    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "mlx-vidllm"
    assert meta["pipeline_tag"] == "video-text-to-text"
    assert {"mlx", "mlx-vidllm", "video-text-to-text", "4-bit"} <= set(meta["tags"])
    assert meta["base_model"] == onevision_default.name
    assert "mlx-vidllm generate --model" in card and "from mlx_vidllm import load, generate" in card
    assert "4-bit affine, group size 32" in card

    result = CliRunner().invoke(main, ["convert", "--hf-path", str(onevision_default), "--mlx-path",
                                       str(tmp_path / "x"), "--q-bits", "8"])
    assert result.exit_code == 2 and "--q-bits needs -q/--quantize" in result.output


# --- upload -------------------------------------------------------------------------------------------------------


class FakeApi:
    calls: list = []
    fail_with: Exception | None = None

    def create_repo(self, **kw):
        FakeApi.calls.append(("create_repo", kw))
        if FakeApi.fail_with is not None:
            raise FakeApi.fail_with

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls, FakeApi.fail_with = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    return FakeApi


def test_upload(onevision_default, tmp_path, fake_hub):
    out = convert(onevision_default, tmp_path / "up", quiet=True, upload_repo="someone/tiny-ov-mlx")
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[0][1] == {"repo_id": "someone/tiny-ov-mlx", "repo_type": "model", "exist_ok": True}
    up = fake_hub.calls[1][1]
    assert (up["folder_path"], up["repo_id"], up["repo_type"]) == (str(out), "someone/tiny-ov-mlx", "model")
    card = (out / "README.md").read_text()
    assert 'load("someone/tiny-ov-mlx")' in card and "# someone/tiny-ov-mlx" in card


def test_upload_not_logged_in(onevision_default, tmp_path, fake_hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    result = CliRunner().invoke(main, ["convert", "--hf-path", str(onevision_default), "--mlx-path",
                                       str(tmp_path / "up"), "--upload-repo", "someone/x"])
    assert result.exit_code == 5
    assert result.output.strip() == ("error: not logged in to the Hugging Face Hub: run `huggingface-cli login` "
                                     "or set HF_TOKEN")
    assert fake_hub.calls == [] and list(tmp_path.iterdir()) == []  # checked before converting anything

    # a token the Hub rejects (401): the same message, and the converted folder is kept
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_expired")
    response = SimpleNamespace(status_code=401, headers={}, url="https://huggingface.co/api/repos/create",
                               request=None, text="", json=lambda: {})
    try:
        fake_hub.fail_with = HfHubHTTPError("401 Client Error: Unauthorized", response=response)
    except Exception:  # noqa: BLE001 - another huggingface_hub version: any error with a 401 response
        fake_hub.fail_with = RuntimeError("401")
        fake_hub.fail_with.response = response
    with pytest.raises(ConversionError, match="^not logged in to the Hugging Face Hub") as info:
        convert(onevision_default, tmp_path / "up", quiet=True, upload_repo="someone/x")
    assert "\n" not in str(info.value) and str(tmp_path / "up") in str(info.value)
    assert (tmp_path / "up" / "config.json").exists()
    with pytest.raises(ConversionError, match="Hub repo id"):
        convert(onevision_default, tmp_path / "up2", upload_repo="../etc")


def test_quantized_prefill_takes_the_float_matmul(onevision_default, tmp_path):
    """Large inputs to quantized layers dequantize then matmul on CPU (50x faster here than MLX's
    quantized kernel for prefill-sized blocks); the numbers equal the quantized kernel's."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_vidllm import load
    from mlx_vidllm.models.blocks import PrefillQuantizedLinear

    out = convert(onevision_default, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32, dtype="float32",
                  quiet=True)
    model, processor = load(out)
    layers = [m for _, m in model.language_model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(type(m) is PrefillQuantizedLinear for m in layers)
    inputs = processor(processor.format_prompt("Describe.", num_videos=1),
                       videos=[np.zeros((4, 32, 32, 3), np.uint8) + 100])
    assert inputs["input_ids"].shape[1] > PrefillQuantizedLinear.ROWS
    fast = np.array(model(**inputs))
    for m in layers:
        m.__class__ = nn.QuantizedLinear
    reference = np.array(model(**inputs))
    np.testing.assert_allclose(fast, reference, atol=1e-4, rtol=0)
