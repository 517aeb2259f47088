"""Parity with the PyTorch reference: recorded references (`.npz`) and the MLX-side verifier.

    python -m mlx_vidllm.parity record --model PATH --video clip.mp4 --prompt "..." --out ref.npz --device cuda
    mlx-vidllm verify --model PATH --reference ref.npz

The recorder (`references.py`, run by `__main__.py`) needs torch and transformers, imported only when it
runs: torch is a test/benchmark dependency, never a run-time one. The verifier (`verify.py`) needs only
MLX. This module holds the file format both sides share (numpy and json only).

A reference file is an uncompressed-or-compressed numpy `.npz` holding:

    meta                     JSON string: format, family, model (path, config, fixture builder when known),
                             prompt and formatted text, media, options, dtype, device, versions, stages
    input.<name>             the processor's output arrays, exactly as `model(**inputs)` takes them
    input.<name>.<i>         ... the i-th array of a list input (pixel_values_videos)
    ref.vision.<kind>        vision tower output before the projector: image, video.0, ... (N, tokens, Dv)
    ref.embeds               the decoder's input embeddings, media merged in (L, D)
    ref.positions            the prompt positions whose logits are kept (P,)
    ref.logits               logits at those positions (P, vocab), float32
    ref.greedy.tokens        N greedy tokens (EOS is not a stop: always N steps)
    ref.greedy.margins       the reference's top-1 minus top-2 logit at each greedy step (near-ties)

Every float array is stored as float32, whatever dtype the reference ran in.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import VidLLMError

FORMAT = "mlx-vidllm-parity/1"

#: Exit code of `mlx-vidllm verify` when the model is outside the tolerance (see errors.EXIT_CODES_HELP).
PARITY_EXIT_CODE = 7

#: Greedy steps recorded by default, and how many final prompt positions keep their logits.
DEFAULT_STEPS = 20
DEFAULT_LAST = 8


class ReferenceFileError(VidLLMError, ValueError):
    """A reference file that cannot be read (missing, not a parity reference, another format version)."""


@dataclass
class Tolerance:
    """When a model passes against a reference of a given dtype.

    float32: max |Δ logits| <= atol (or, when rtol is set instead, relative error <= rtol), and the greedy
    tokens identical (a divergence at a reference near-tie, margin <= the tolerance, is reported, not failed).
    Half precision: top-1 agreement >= top1 (over the kept positions and the teacher-forced greedy steps)
    and relative error <= rtol. Relative error is ||Δ||₂ / ||reference||₂."""

    dtype: str
    atol: float | None = None
    rtol: float | None = None
    top1: float | None = None

    @property
    def half(self) -> bool:
        return self.dtype in ("bfloat16", "float16")

    def describe(self) -> str:
        if self.half:
            return f"{self.dtype}: top-1 agreement >= {self.top1:g}, relative error <= {self.rtol:g}"
        if self.atol is not None:
            return f"float32: max |Δ logits| <= {self.atol:g}, greedy tokens identical"
        return f"float32: relative error <= {self.rtol:g}, greedy tokens identical"


def default_tolerance(dtype: str, atol: float | None = None, rtol: float | None = None,
                      top1: float | None = None) -> Tolerance:
    """The issue's rule: float32 <= 1e-4 abs on logits; half: top-1 >= 0.99 and relative error <= 2e-2.
    `rtol` alone on float32 switches to a relative criterion (e.g. 1e-3 for a full-size model)."""
    if dtype in ("bfloat16", "float16"):
        return Tolerance(dtype, atol=atol, rtol=2e-2 if rtol is None else rtol, top1=0.99 if top1 is None else top1)
    if atol is None and rtol is None:
        atol = 1e-4
    return Tolerance("float32", atol=atol, rtol=rtol, top1=top1)


def select_positions(input_ids: np.ndarray, media_ids: Sequence[int], last: int = DEFAULT_LAST) -> np.ndarray:
    """Prompt positions whose logits are recorded: the last `last` positions, and for every run of media
    placeholders its first, middle and last position and the first text position after it."""
    ids = np.asarray(input_ids).reshape(-1)
    L = len(ids)
    keep = set(range(max(L - last, 0), L))
    is_media = np.isin(ids, np.asarray(list(media_ids), dtype=ids.dtype)) if media_ids else np.zeros(L, bool)
    start = None
    for i in range(L + 1):
        inside = i < L and is_media[i]
        if inside and start is None:
            start = i
        elif not inside and start is not None:
            end = i - 1
            keep.update({start, (start + end) // 2, end})
            if i < L:
                keep.add(i)
            start = None
    return np.asarray(sorted(keep), dtype=np.int32)


@dataclass
class Reference:
    """A recorded reference, read back."""

    meta: dict
    inputs: dict[str, Any]
    vision: dict[str, np.ndarray] = field(default_factory=dict)
    embeds: np.ndarray | None = None
    positions: np.ndarray | None = None
    logits: np.ndarray | None = None
    tokens: np.ndarray | None = None
    margins: np.ndarray | None = None
    path: Path | None = None

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def family(self) -> str:
        return self.meta["family"]


def _input_arrays(inputs: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays, kinds = {}, {}
    for name, value in inputs.items():
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, np.ndarray) for v in value):
            kinds[name] = "arrays"
            for i, v in enumerate(value):
                arrays[f"input.{name}.{i}"] = v
        elif isinstance(value, (list, tuple)):
            kinds[name] = "list"
            arrays[f"input.{name}"] = np.asarray(value)
        elif isinstance(value, np.ndarray):
            kinds[name] = "array"
            arrays[f"input.{name}"] = value
        else:
            raise TypeError(f"processor output {name!r} is a {type(value).__name__}: only arrays can be recorded "
                            f"(decode video files to frames before the processor)")
    return arrays, kinds


def save_reference(path: str | Path, meta: dict, inputs: dict[str, Any], vision: dict[str, np.ndarray],
                   embeds: np.ndarray, positions: np.ndarray, logits: np.ndarray, tokens: Sequence[int],
                   margins: Sequence[float]) -> Path:
    """Write a reference file (compressed npz); returns its path."""
    arrays, kinds = _input_arrays(inputs)
    meta = {**meta, "format": FORMAT, "inputs": kinds, "vision_stages": sorted(vision)}
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    arrays.update({f"ref.vision.{k}": f32(v) for k, v in vision.items()})
    arrays.update({
        "meta": np.array(json.dumps(meta, sort_keys=True, default=str)),
        "ref.embeds": f32(embeds),
        "ref.positions": np.asarray(positions, dtype=np.int32),
        "ref.logits": f32(logits),
        "ref.greedy.tokens": np.asarray(tokens, dtype=np.int32),
        "ref.greedy.margins": f32(margins),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    tmp.replace(path)
    return path


def load_reference(path: str | Path) -> Reference:
    """Read a reference file written by `save_reference` (no pickles: allow_pickle=False)."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceFileError(f"{path}: no such reference file")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # zip, npy, JSON: one message
        raise ReferenceFileError(f"{path}: not a readable mlx-vidllm parity reference ({type(e).__name__}: {e})") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ReferenceFileError(f"{path}: reference format {found!r}, this version reads {FORMAT!r}")
    inputs: dict[str, Any] = {}
    for name, kind in meta["inputs"].items():
        if kind == "arrays":
            n = sum(1 for k in data if k.startswith(f"input.{name}.") and k[len(f"input.{name}."):].isdigit())
            inputs[name] = [data[f"input.{name}.{i}"] for i in range(n)]
        elif kind == "list":
            inputs[name] = data[f"input.{name}"].tolist()
        else:
            inputs[name] = data[f"input.{name}"]
    return Reference(
        meta=meta, inputs=inputs, vision={k: data[f"ref.vision.{k}"] for k in meta.get("vision_stages", [])},
        embeds=data["ref.embeds"], positions=data["ref.positions"], logits=data["ref.logits"],
        tokens=data["ref.greedy.tokens"], margins=data["ref.greedy.margins"], path=path,
    )


def __getattr__(name: str):
    # verify (MLX) and record (torch) are imported on first use, so reading a reference needs neither.
    if name in ("verify_reference", "VerifyReport", "format_report"):
        from . import verify as _verify

        return getattr(_verify, name)
    if name == "record":
        from .references import record

        return record
    raise AttributeError(name)


__all__ = ["FORMAT", "PARITY_EXIT_CODE", "Reference", "ReferenceFileError", "Tolerance", "default_tolerance",
           "load_reference", "save_reference", "select_positions"]
