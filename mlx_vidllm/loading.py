"""load(): local folder or Hub repo id -> family and checkpoint format -> (model, processor)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .errors import ModelError
from .models.blocks import use_prefill_friendly_quantization
from .models.families import Family, detect_family, rename_keys

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

# What a model needs from a Hub repo (no .bin / .pth pickles, no original-format extras).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


def resolve_path(path_or_repo: str | os.PathLike) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: a model must be a folder (or a Hub repo id), this is a file")
        return path
    name = str(path_or_repo)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(f"{name}: no such model folder (and not a Hub repo id like org/name)")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
        if not any(path.glob("*.safetensors")):  # PyTorch-only repos (LLaMA-VID): weights are pickles
            path = Path(snapshot_download(name, allow_patterns=HUB_PATTERNS + ["*.bin", "*.pth", "bert/*"]))
        return path
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise ModelError(f"{name}: cannot download from the Hugging Face Hub ({type(e).__name__}: {e})") from None


def read_config(path: Path) -> dict:
    try:
        with open(path / "config.json", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{path}: config.json is missing") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path / 'config.json'}: not valid JSON ({e})") from None


# Pickles in a checkpoint folder that hold no model weights.
NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.pth", "optimizer.pt", "scheduler.pt"}


def weight_files(path: Path) -> list[Path]:
    """The files load_weights() reads: every *.safetensors, or when there is none the PyTorch pickles
    (the shards named by pytorch_model.bin.index.json, else every *.bin / *.pth)."""
    files = sorted(Path(f) for f in glob.glob(str(path / "*.safetensors")))
    if files:
        return files
    index = path / "pytorch_model.bin.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ModelError(f"{index}: not a valid weight index ({e})") from None
        return [path / Path(n).name for n in names]  # basenames: an index never points outside its folder
    pickles = glob.glob(str(path / "*.bin")) + glob.glob(str(path / "*.pth"))
    return sorted(Path(f) for f in pickles if Path(f).name not in NOT_WEIGHTS)


def load_weights(path: Path) -> dict[str, mx.array]:
    """Every tensor of the checkpoint in `path` under its stored names: *.safetensors (loaded lazily), or
    PyTorch *.bin / *.pth pickles when the folder has no safetensors (see load_torch_pickle)."""
    files = weight_files(path)
    if not files:
        raise ModelError(f"{path}: no *.safetensors (or PyTorch *.bin / *.pth) weights found")
    weights = {}
    for f in files:
        if f.suffix != ".safetensors":
            weights.update(load_torch_pickle(f))
            continue
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # truncated or foreign files: MLX raises several types
            raise ModelError(f"{f}: not a readable safetensors file ({e})") from None
    return weights


def load_torch_pickle(file: Path) -> dict[str, mx.array]:
    """A PyTorch state dict (`.bin` / `.pth`: original Video-LLaVA, LLaMA-VID, eva_vit_g.pth) as MLX arrays.

    Read with `torch.load(weights_only=True)`: tensors and plain containers only, no code in the pickle
    runs. torch is imported here only, so nothing else needs it."""
    try:
        import torch
    except ImportError:
        raise ModelError(f"{file}: reading PyTorch checkpoints needs torch: pip install 'mlx-vidllm[torch]'") from None
    if not file.is_file():
        raise ModelError(f"{file}: weight file is missing")
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt files and pickles of other objects end the same way
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"{file}: not a readable PyTorch state dict ({type(e).__name__}: {msg})") from None
    # {"state_dict": {...}} / {"model": {...}} / {"module": {...}}: training checkpoints wrap the weights
    while (isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model", "module")
           and isinstance(next(iter(state.values())), dict)):
        state = next(iter(state.values()))
    if not isinstance(state, dict):
        raise ModelError(f"{file}: holds a {type(state).__name__}, not a state dict")
    out = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue  # bookkeeping entries (epoch, step, ...)
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the bits
            out[key] = mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
        else:
            out[key] = mx.array(t.numpy())
    return out


def read_checkpoint(path: Path, family: Family, config: dict | None = None, **options) -> dict[str, mx.array]:
    """The folder's tensors under their stored names: the family's own reader when it has one (LLaMA-VID's
    EVA weights live in a side file; `options` go to it, e.g. vision_weights), else load_weights."""
    if family.read_weights is not None:
        return family.read_weights(path, read_config(path) if config is None else config, **options)
    return load_weights(path)


def checkpoint_weights(path: Path, family: Family, config: dict | None = None) -> dict[str, mx.array]:
    """The folder's tensors under our module names (any supported key format)."""
    return rename_keys(read_checkpoint(path, family, config), family.key_rules)


# config.json entries that mlx-vidllm's converter adds; the model classes never see them.
MLX_CONFIG_KEYS = ("quantization", "quantization_config", "mlx_vidllm")


def model_config(config: dict) -> dict:
    """config.json without the converter's own entries: what family.build reads."""
    if "quantization" not in config:
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method"):
            raise ModelError(f"pre-quantized checkpoints (quant_method={qc['quant_method']!r}) are not supported")
    return {k: v for k, v in config.items() if k not in MLX_CONFIG_KEYS}


def quantize_like_checkpoint(model: nn.Module, config: dict, weights: dict[str, mx.array]) -> None:
    """A converted folder whose config.json has a `quantization` block: before the weights are loaded,
    quantize exactly the modules whose weights come with `.scales` (mlx-lm style). Group size and bits
    follow from each layer's stored shapes, so layers kept float or quantized differently load too."""
    q = config.get("quantization")
    if not q:
        return

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        in_dims = module.weight.shape[-1]
        return {"group_size": in_dims // weights[f"{path}.scales"].shape[-1],
                "bits": weights[f"{path}.weight"].shape[-1] * 32 // in_dims, "mode": q.get("mode", "affine")}

    nn.quantize(model, group_size=q.get("group_size"), bits=q.get("bits"), class_predicate=predicate)
    use_prefill_friendly_quantization(model)


def apply_weights(model: nn.Module, weights: dict[str, mx.array], dtype: mx.Dtype | None) -> None:
    """Check and load `weights` (emptied: the model takes them over) into `model`, cast to `dtype`."""
    source, weights = weights, model.sanitize(weights)
    source.clear()  # from here on the sanitized dict holds the only reference to each stored tensor
    expected = dict(_flat_parameters(model))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
        raise ModelError("checkpoint does not match the config: " + "; ".join(parts))
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelError(
                f"checkpoint tensor {k} has shape {tuple(v.shape)}, the config implies {tuple(expected[k].shape)}"
            )
    # One tensor at a time, each stored copy dropped once cast: loading a float16 checkpoint as float32
    # never holds both copies of the whole model (full-size OneVision-0.5B: 1.8 GB less at the peak).
    loaded = []
    for k in list(weights):
        v = weights.pop(k)
        v = v.astype(dtype) if dtype is not None and mx.issubdtype(v.dtype, mx.floating) else v
        mx.eval(v)
        loaded.append((k, v))
    model.load_weights(loaded, strict=True)


def _flat_parameters(model: nn.Module):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def build_model(path: Path, config: dict) -> tuple[Family, nn.Module]:
    """The family of `config` (read from `path`) and its model, weights not loaded yet."""
    try:
        family = detect_family(config)
        return family, family.build(model_config(config))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{path / 'config.json'}: {e}") from None


def load(path_or_repo: str | os.PathLike, dtype: str | None = None, **options):
    """Load a model and its processor: `model, processor = load("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")`.

    `dtype` ("float16" | "bfloat16" | "float32") casts the weights; by default they keep the stored dtype.
    `options` are the family's settings, passed to `processor.configure` (the model shares its config), e.g.
    `video_layout="grid"`, `pool_mode="average"` (LLaVA-OneVision, LLaVA-Video); None values are ignored.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = resolve_path(path_or_repo)
    config = read_config(path)
    family, model = build_model(path, config)
    weights = checkpoint_weights(path, family, config)
    quantize_like_checkpoint(model, config, weights)
    apply_weights(model, weights, DTYPES.get(dtype))  # empties `weights`
    model.eval()
    processor = family.processor(path, model)
    options = {k: v for k, v in options.items() if v is not None}
    if options:
        if not hasattr(processor, "configure"):
            raise ModelError(f"{family.name} models take no options (got {', '.join(sorted(options))})")
        try:
            processor.configure(**options)
        except TypeError as e:
            raise ModelError(f"{family.name}: {e}") from None
    return model, processor
