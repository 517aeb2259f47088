"""Convert a checkpoint (any format `load()` reads) into an MLX model folder, optionally quantized.

    from mlx_vidllm import convert
    convert("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "onevision-0.5b-4bit", quantize=True)

The converter reuses the loader's pieces (resolve_path, read_config, the family's declarative key rules,
sanitize, the strict shape checks), so there is one key map per family. The output folder holds:

- `config.json`: the source config, plus a `quantization` block (mlx-lm style) when quantized and an
  `mlx_vidllm` block (family, source format, version, ...);
- the weights under our module names (`model.safetensors` or `model-0000i-of-0000n.safetensors` shards of
  at most 5 GiB, mlx-lm's `make_shards`) and `model.safetensors.index.json`;
- the tokenizer, processor, chat-template and generation-config files of the source;
- a Hub-style `README.md` model card.

Writes are atomic: everything is built in a hidden `.NAME.partial-PID-XXXX` folder beside the target and
renamed into place at the end; an interrupted conversion removes it, and one killed outright leaves only that
hidden folder (never a `config.json` at the target path), which the next conversion to the same target removes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .errors import ConversionError
from .loading import (DTYPES, build_model, model_config, quantize_like_checkpoint, read_checkpoint,
                      read_config, resolve_path, weight_files, apply_weights)
from .models.families import key_format, rename_keys

# The decoder is the `language_model` child in every family; everything else (vision towers, projector,
# QFormer, ...) counts as "vision" and stays float unless quantize_vision.
DECODER = "language_model"
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
MAX_SHARD_GB = 5  # mlx-lm's make_shards unit: GiB

# Files copied from the source folder: exact names and patterns, matched against top-level basenames only.
COPY_FILES = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.json", "chat_template.jinja", "generation_config.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "image_processor_config.json",
}
COPY_PATTERNS = ("tokenizer*.json", "*.tiktoken", "*.jinja", "*processor_config.json", "LICENSE*", "NOTICE*")

NOT_LOGGED_IN = "not logged in to the Hugging Face Hub: run `huggingface-cli login` or set HF_TOKEN"

# Test hook: seconds to sleep after the first shard is written (lets a test kill a conversion mid-write).
PAUSE_ENV = "MLX_VIDLLM_CONVERT_TEST_PAUSE_S"

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ConversionSummary:
    family: str
    source_format: str
    parameters: int
    bytes_before: int
    bytes_after: int
    seconds: float
    dtype: str
    quantization: dict | None = None
    kept_float: list[str] = field(default_factory=list)  # layers left float: input size not divisible by the group

    def line(self, target: Path) -> str:
        q = (f"{self.quantization['bits']}-bit, group {self.quantization['group_size']}"
             f" ({', '.join(self.quantization['modules'])})" if self.quantization else self.dtype)
        return (f"converted {self.family} ({self.source_format}) -> {target}: {self.parameters:,} parameters, "
                f"{_size(self.bytes_before)} -> {_size(self.bytes_after)}, {q}, {self.seconds:.1f} s")


def convert(
    hf_path: str | os.PathLike,
    mlx_path: str | os.PathLike,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str | None = None,
    quantize_vision: bool = False,
    upload_repo: str | None = None,
    force: bool = False,
    *,
    quiet: bool = False,
    vision_weights: str | os.PathLike | None = None,
) -> Path:
    """Convert `hf_path` (folder or Hub repo id) into an MLX folder at `mlx_path`; returns its path.

    `quantize`: the decoder's Linear and Embedding layers to `q_bits` bits in groups of `q_group_size`
    (vision tower(s) and projector too with `quantize_vision`; layers whose input size the group does not
    divide stay float and are named in the summary). `dtype`: the float weights' dtype (default: the
    config's `dtype` / `torch_dtype`, else as stored). `force`: replace an existing model folder (only once
    the new one is complete). `upload_repo`: then upload the folder to this Hub repo.
    `vision_weights`: LLaMA-VID's EVA-ViT-G `.pth` when neither the shards nor `eva_vit_g.pth` beside
    config.json hold it.
    Prints a progress bar (stderr) and a summary line (stdout) unless `quiet`.
    """
    start = time.perf_counter()
    _check_options(quantize, q_bits, q_group_size, dtype, quantize_vision)
    if upload_repo is not None:
        _check_upload_repo(upload_repo)
    target = Path(mlx_path).expanduser().absolute()
    _check_target(target, force)
    src = resolve_path(hf_path)
    if target.resolve() == src.resolve() or target.resolve() in src.resolve().parents:
        raise ConversionError(f"{target}: the output folder must not be the source folder or contain it")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)  # mode from the umask, like any folder the user makes
    with _removed_unless_finished(tmp):
        summary = _convert_into(src, tmp, hf_path, quantize, q_bits, q_group_size, dtype, quantize_vision,
                                upload_repo or str(mlx_path), quiet, vision_weights)
        _install(tmp, target, force)
    summary.seconds = time.perf_counter() - start
    if not quiet:
        print(summary.line(target))
        if summary.kept_float:
            print(f"note: {len(summary.kept_float)} layer(s) kept float (input size not divisible by the group size "
                  f"{q_group_size}): {', '.join(summary.kept_float)}")
    if upload_repo is not None:
        upload(target, upload_repo)
        if not quiet:
            print(f"uploaded to https://huggingface.co/{upload_repo}")
    return target


# --- checks ------------------------------------------------------------------------------------------------------


def _check_options(quantize, q_bits, q_group_size, dtype, quantize_vision) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if q_bits not in Q_BITS:
        raise ConversionError(f"q_bits={q_bits!r}: MLX quantizes to {', '.join(map(str, Q_BITS))} bits")
    if q_group_size not in Q_GROUP_SIZES:
        raise ConversionError(f"q_group_size={q_group_size!r}: one of {', '.join(map(str, Q_GROUP_SIZES))}")
    if quantize_vision and not quantize:
        raise ConversionError("quantize_vision needs quantize")


def _looks_like_model(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").exists() or not any(path.iterdir()))


def _check_target(target: Path, force: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise ConversionError(f"{target} already exists: pass --force (force=True) to replace it")
    if not _looks_like_model(target):
        raise ConversionError(f"{target} exists and is not a model folder (no config.json): not replacing it")


def _check_upload_repo(repo: str) -> None:
    if not REPO_ID.match(repo):
        raise ConversionError(f"--upload-repo {repo!r}: expected a Hub repo id like org/name")
    from huggingface_hub import get_token

    if get_token() is None:  # before the conversion, not after it
        raise ConversionError(NOT_LOGGED_IN)


# --- atomic folder handling ---------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove `.NAME.partial-PID-*` / `.NAME.old-PID-*` folders left beside `target` by conversions that were
    killed (their process is gone); those of a conversion still running are left alone."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:partial|old)-(\d+)-[0-9a-f]+$")
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink():
            pid = int(m.group(1))
            if pid == os.getpid() or not _pid_alive(pid):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


@contextlib.contextmanager
def _removed_unless_finished(tmp: Path):
    """Delete `tmp` if the block does not finish: exceptions, Ctrl-C and SIGTERM (turned into SystemExit)."""
    previous = None
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        def on_sigterm(signum, frame):
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, target: Path, force: bool) -> None:
    """Rename the finished folder into place; an old target is moved aside first and deleted last."""
    if target.exists() or target.is_symlink():
        _check_target(target, force)  # again: it may have appeared during the conversion
        old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


# --- the conversion ------------------------------------------------------------------------------------------------


def _config_dtype(config: dict) -> str | None:
    for c in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if c.get(key) in DTYPES:
                return c[key]
    return None


def _float_dtype(model: nn.Module) -> str:
    from mlx.utils import tree_flatten

    counts: dict[str, int] = {}
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating) and v.ndim > 1:
            name = str(v.dtype).removeprefix("mlx.core.")
            counts[name] = counts.get(name, 0) + v.size
    return max(counts, key=counts.get) if counts else "float32"


def _is_decoder(path: str) -> bool:
    return path == DECODER or path.startswith(DECODER + ".")


def quantize_modules(model: nn.Module, config: dict, bits: int, group_size: int, vision: bool):
    """Quantize the decoder's Linear and Embedding layers (and with `vision` the Linear layers of the vision
    tower(s) and projector; their position embeddings are read as plain matrices and stay float) with
    mlx-lm's quantize_model. Returns (config with the `quantization` block, quantized layers, layers kept float)."""
    from mlx_lm.utils import quantize_model

    def wanted(path: str, module: nn.Module) -> bool:
        if _is_decoder(path):
            return hasattr(module, "to_quantized")
        return vision and isinstance(module, nn.Linear)

    quantized: list[str] = []
    kept_float = [p for p, m in model.named_modules() if wanted(p, m) and m.weight.shape[-1] % group_size]

    def predicate(path: str, module: nn.Module) -> bool:
        if wanted(path, module):  # quantize_model has already skipped layers the group size does not divide
            quantized.append(path)
            return True
        return False

    with contextlib.redirect_stdout(io.StringIO()):  # its "[INFO] Quantized model with ..." line
        model, qconfig = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    if not quantized:
        raise ConversionError(f"no layer can be quantized with group size {group_size}: "
                              f"try --q-group-size {min(Q_GROUP_SIZES)}")
    block = dict(qconfig["quantization"])
    block["modules"] = sorted({p.split(".")[0] for p in quantized})
    block["quantize_vision"] = vision
    if kept_float:
        block["float_layers"] = sorted(kept_float)
    qconfig["quantization"] = block
    qconfig["quantization_config"] = block  # mlx-lm writes both (the Hub's model tree reads the latter)
    return qconfig, sorted(quantized), sorted(kept_float)


def _convert_into(src: Path, out: Path, hf_path, quantize, q_bits, q_group_size, dtype, quantize_vision,
                  model_ref: str, quiet: bool, vision_weights=None) -> ConversionSummary:
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters

    from . import __version__

    config = read_config(src)
    if quantize and config.get("quantization"):
        raise ConversionError(f"{src} is already quantized: convert from the float checkpoint")
    family, model = build_model(src, config)
    files = weight_files(src)
    if vision_weights is not None and family.read_weights is None:
        raise ConversionError(f"--vision-weights applies to LLaMA-VID checkpoints, not {family.name}")
    # = load_weights(src), or the family's reader (LLaMA-VID: EVA from eva_vit_g.pth / --vision-weights)
    raw = read_checkpoint(src, family, config, **({"vision_weights": vision_weights} if vision_weights else {}))
    source_format = "mlx-vidllm" if "mlx_vidllm" in config else key_format(set(raw))
    weights = rename_keys(raw, family.key_rules)  # = loading.checkpoint_weights, keeping the raw keys' format
    del raw
    quantize_like_checkpoint(model, config, weights)  # a converted folder as the source
    dtype = dtype or _config_dtype(model_config(config))
    apply_weights(model, weights, DTYPES.get(dtype) if dtype else None)
    del weights
    model.eval()

    out_config = json.loads(json.dumps(config))  # the source config, untouched but for what follows
    for c in (out_config, out_config.get("text_config"), out_config.get("vision_config")):
        for key in ("dtype", "torch_dtype"):
            if isinstance(c, dict) and key in c and dtype:
                c[key] = dtype
    quantized, kept_float = [], []
    if quantize:
        out_config.pop("quantization_config", None)
        out_config, quantized, kept_float = quantize_modules(model, out_config, q_bits, q_group_size,
                                                             quantize_vision)
    base_model = _base_model(hf_path, src, config)
    out_config["mlx_vidllm"] = {
        "family": family.name, "source_format": source_format, "version": __version__, "base_model": base_model,
        "dtype": _float_dtype(model),
    }

    params = get_total_parameters(model)
    weights = dict(tree_flatten(model.parameters()))
    written = _write_shards(out, weights, params, quiet)
    _copy_side_files(src, out)
    if family.write_side_files is not None:  # what load() needs that the source keeps elsewhere
        family.write_side_files(src, out, model)
    summary = ConversionSummary(
        family=family.name, source_format=source_format, parameters=params,
        bytes_before=sum(f.stat().st_size for f in files), bytes_after=written, seconds=0.0,
        dtype=out_config["mlx_vidllm"]["dtype"], quantization=out_config.get("quantization") if quantize else None,
        kept_float=kept_float,
    )
    write_model_card(out / "README.md", out_config, summary, family.description, base_model, model_ref,
                     _source_card(src))
    with open(out / "config.json", "w", encoding="utf-8") as f:  # last: a folder without it is not a model
        json.dump(out_config, f, indent=2)
        f.write("\n")
    return summary


def _write_shards(out: Path, weights: dict[str, mx.array], params: int, quiet: bool) -> int:
    """mlx-lm's shard layout and index; tensors evaluated one by one under a progress bar. Returns bytes written."""
    from mlx_lm.utils import make_shards
    from tqdm import tqdm

    shards = make_shards(weights, MAX_SHARD_GB)
    name = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values()), "total_parameters": params},
             "weight_map": {}}
    written = 0
    with tqdm(total=len(weights), unit="tensor", desc="converting", file=sys.stderr, disable=quiet,
              leave=False) as bar:
        for i, shard in enumerate(shards):
            for v in shard.values():
                mx.eval(v)
                bar.update(1)
            file = out / name.format(i + 1, len(shards))
            mx.save_safetensors(str(file), shard, metadata={"format": "mlx"})
            written += file.stat().st_size
            index["weight_map"].update({k: file.name for k in shard})
            if i == 0 and os.environ.get(PAUSE_ENV):
                time.sleep(float(os.environ[PAUSE_ENV]))
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    with open(out / "model.safetensors.index.json", "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return written


def _copy_side_files(src: Path, out: Path) -> list[str]:
    """Tokenizer, processor, chat-template and generation-config files: known top-level basenames only."""
    copied = []
    for entry in sorted(src.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name in ("config.json", "README.md") or not entry.is_file():
            continue
        if name in COPY_FILES or any(fnmatch(name, p) for p in COPY_PATTERNS):
            shutil.copyfile(entry, out / name)  # follows Hub cache symlinks; `name` has no separators
            copied.append(name)
    return copied


# --- model card ----------------------------------------------------------------------------------------------------


def _base_model(hf_path, src: Path, config: dict) -> str:
    """The source's Hub repo id when it came from the Hub (or the config names one), else the folder's name."""
    given = str(hf_path)
    if not Path(given).expanduser().exists() and REPO_ID.match(given):
        return given
    name = config.get("_name_or_path")
    if isinstance(name, str) and REPO_ID.match(name) and not Path(name).exists():
        return name
    return src.resolve().name


def _source_card(src: Path) -> dict:
    """license / language of the source's model card, carried over to ours."""
    readme = src / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(readme).data.to_dict()
    except Exception:  # noqa: BLE001 - a malformed card just is not carried over
        return {}
    return {k: data[k] for k in ("license", "license_name", "license_link", "language") if data.get(k)}


def write_model_card(path: Path, config: dict, summary: ConversionSummary, description: str, base_model: str,
                     model_ref: str, source_card: dict) -> None:
    """Hub-style README.md: YAML front matter (library_name, tags, base_model, pipeline_tag), usage, details."""
    from huggingface_hub import ModelCardData

    q = summary.quantization
    tags = ["mlx", "mlx-vidllm", "video-text-to-text", "image-text-to-text", summary.family.replace("_", "-")]
    if q:
        tags.append(f"{q['bits']}-bit")
    data = ModelCardData(library_name="mlx-vidllm", pipeline_tag="video-text-to-text", base_model=base_model,
                         tags=tags, **source_card)
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if REPO_ID.match(base_model) else \
        f"`{base_model}`"
    if q:
        qtext = (f"{q['bits']}-bit affine, group size {q['group_size']}; quantized: {', '.join(q['modules'])} "
                 f"(Linear and Embedding layers)" + ("" if q["quantize_vision"] else
                                                    "; vision tower(s) and projector kept float"))
    else:
        qtext = "none"
    kept = ""
    if summary.kept_float:
        kept = (f"\nLayers kept float because their input size is not divisible by the group size "
                f"({len(summary.kept_float)}):\n\n" + "\n".join(f"- `{n}`" for n in summary.kept_float) + "\n")
    text = f"""---
{data.to_yaml()}
---

# {model_ref if REPO_ID.match(model_ref) else Path(model_ref).name}

{description}, converted to [MLX](https://github.com/ml-explore/mlx) from {base_link} with
[mlx-vidllm](https://github.com/mlx-vidllm/mlx-vidllm) {config['mlx_vidllm']['version']}.

## Use with mlx-vidllm

```bash
pip install mlx-vidllm
mlx-vidllm generate --model {model_ref} --video clip.mp4 --prompt "What happens in this video?"
mlx-vidllm generate --model {model_ref} --image photo.jpg --prompt "Describe the image."
```

```python
from mlx_vidllm import load, generate

model, processor = load("{model_ref}")
print(generate(model, processor, "What happens in this video?", video="clip.mp4"))
```

## Conversion

| | |
|---|---|
| family | `{summary.family}` |
| source | {base_link} (`{summary.source_format}` key names) |
| parameters | {summary.parameters:,} |
| float weights | {summary.dtype} |
| quantization | {qtext} |
| size | {_size(summary.bytes_before)} -> {_size(summary.bytes_after)} |
{kept}
Converted with `mlx-vidllm convert --hf-path {base_model} --mlx-path {model_ref}"""
    if q:
        text += f" -q --q-bits {q['bits']} --q-group-size {q['group_size']}"
        if q["quantize_vision"]:
            text += " --quantize-vision"
    text += "`.\n"
    path.write_text(text, encoding="utf-8")


# --- upload --------------------------------------------------------------------------------------------------------


def upload(path: Path, repo: str) -> None:
    """create_repo(exist_ok=True) + upload_folder; every failure is one ConversionError line."""
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise ConversionError(NOT_LOGGED_IN)
    api = HfApi()
    try:
        api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(path), repo_id=repo, repo_type="model",
                          commit_message="Upload MLX model converted with mlx-vidllm")
    except Exception as e:  # noqa: BLE001 - HTTP, network, permission errors: one line each
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise ConversionError(f"{NOT_LOGGED_IN} (the converted model is in {path})") from None
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConversionError(f"upload to {repo} failed ({type(e).__name__}: {first}); "
                              f"the converted model is in {path}") from None


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


__all__ = ["convert", "upload", "remove_stale_partials", "quantize_modules", "ConversionSummary"]
