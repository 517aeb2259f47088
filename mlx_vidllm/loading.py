"""load(): local folder or Hub repo id -> family and checkpoint format -> (model, processor)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .errors import ModelError
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
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
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


def load_weights(path: Path) -> dict[str, mx.array]:
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise ModelError(f"{path}: no *.safetensors weights found")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(f))
        except Exception as e:  # truncated or foreign files: MLX raises several types
            raise ModelError(f"{f}: not a readable safetensors file ({e})") from None
    return weights


def checkpoint_weights(path: Path, family: Family) -> dict[str, mx.array]:
    """The folder's tensors under our module names (any supported key format)."""
    return rename_keys(load_weights(path), family.key_rules)


def apply_weights(model: nn.Module, weights: dict[str, mx.array], dtype: mx.Dtype | None) -> None:
    weights = model.sanitize(weights)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
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
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())


def _flat_parameters(model: nn.Module):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def load(path_or_repo: str | os.PathLike, dtype: str | None = None):
    """Load a model and its processor: `model, processor = load("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")`.

    `dtype` ("float16" | "bfloat16" | "float32") casts the weights; by default they keep the stored dtype.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = resolve_path(path_or_repo)
    config = read_config(path)
    try:
        family = detect_family(config)
        model = family.build(config)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{path / 'config.json'}: {e}") from None
    apply_weights(model, checkpoint_weights(path, family), DTYPES.get(dtype))
    model.eval()
    processor = family.processor(path, model)
    return model, processor
