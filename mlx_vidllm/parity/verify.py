"""The MLX side of a parity check: run the model on a recorded reference's inputs and compare stage by stage.

Stages: the vision tower output before the projector (per image set / video), the decoder's input
embeddings with the media merged in, the logits at the recorded positions, and greedy decoding: the
next-token choice at each of the reference's N greedy steps given the reference's own prefix
("teacher-forced"), and a free-running greedy run compared token by token (first diverging step).

Only the logits and greedy stages decide the verdict (see `Tolerance`); the others locate a difference.
A quantized model (config.json has `quantization`) is reported, never failed: the numbers are then the
quantization error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from . import PARITY_EXIT_CODE, Reference, Tolerance, default_tolerance, load_reference

VISION_CHUNK = 16


@dataclass
class Stage:
    name: str
    shape: tuple
    max_abs: float | None = None
    rel: float | None = None
    top1: tuple[int, int] | None = None  # (agreeing, compared)
    ties: int = 0  # disagreements at a reference near-tie (see tie_threshold)
    note: str = ""
    gated: bool = False  # part of the verdict
    ok: bool | None = None


@dataclass
class VerifyReport:
    reference: str
    model: str
    family: str
    dtype: str
    recorded_on: str
    tolerance: Tolerance
    stages: list[Stage] = field(default_factory=list)
    tokens_ref: list[int] = field(default_factory=list)
    tokens_mlx: list[int] = field(default_factory=list)
    first_divergence: int | None = None
    tie_threshold: float = 0.0
    quantization: dict | None = None
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def within_tolerance(self) -> bool:
        return not self.failures

    @property
    def quantized(self) -> bool:
        return self.quantization is not None

    @property
    def exit_code(self) -> int:
        return 0 if self.within_tolerance or self.quantized else PARITY_EXIT_CODE

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tolerance"] = {**asdict(self.tolerance), "rule": self.tolerance.describe()}
        d.update(within_tolerance=self.within_tolerance, quantized=self.quantized, exit_code=self.exit_code)
        return d


# ----------------------------------------------------------------------------------------------------- metrics


def _f32(a) -> np.ndarray:
    return np.asarray(a.astype(mx.float32) if isinstance(a, mx.array) else a, dtype=np.float32)


def compare(name: str, ours, ref: np.ndarray, top1_axis: bool = False, note: str = "") -> Stage:
    ours, ref = _f32(ours), _f32(ref)
    if ours.shape != ref.shape:
        raise ValueError(f"stage {name}: the MLX model gives shape {ours.shape}, the reference {ref.shape}")
    delta = ours - ref
    norm = float(np.linalg.norm(ref.astype(np.float64)))
    rel = float(np.linalg.norm(delta.astype(np.float64)) / norm) if norm > 0 else float(np.abs(delta).max())
    top1 = None
    if top1_axis:
        top1 = (int((ours.argmax(-1) == ref.argmax(-1)).sum()), int(np.prod(ref.shape[:-1])))
    return Stage(name, tuple(ref.shape), max_abs=float(np.abs(delta).max()) if delta.size else 0.0, rel=rel,
                 top1=top1, note=note)


# ----------------------------------------------------------------------------------------------------- MLX side


def vision_features(family: str, model, inputs: dict[str, Any]) -> dict[str, mx.array]:
    """The vision tower output before the projector, keyed like the reference (image, video.0, ...)."""
    if family == "video_llava":
        image_tower, video_tower = model.image_tower, model.video_tower
    else:  # OneVision / LLaVA-Video (SigLIP), LLaMA-VID (EVA): one tower
        image_tower = video_tower = model.vision_tower

    def run(tower, pixels) -> mx.array:
        pixels = mx.array(np.asarray(pixels))
        out = []
        for i in range(0, pixels.shape[0], VISION_CHUNK):
            f = tower(pixels[i:i + VISION_CHUNK])
            mx.eval(f)
            out.append(f)
        return mx.concatenate(out) if len(out) > 1 else out[0]

    out = {}
    if inputs.get("pixel_values") is not None and len(inputs["pixel_values"]):
        out["image"] = run(image_tower, inputs["pixel_values"])
    for i, video in enumerate(inputs.get("pixel_values_videos") or []):
        out[f"video.{i}"] = run(video_tower, video)
    return out


def _head(lm, hidden: mx.array) -> mx.array:
    """mlx-lm's output projection (tied or not) on hidden states."""
    if getattr(lm.args, "tie_word_embeddings", False):
        return lm.model.embed_tokens.as_linear(hidden)
    return lm.lm_head(hidden)


def _text_ids(ids: np.ndarray) -> np.ndarray:
    """Placeholder ids below zero (LLaMA-VID's -200) never reach the embedding table."""
    return np.where(ids < 0, 0, ids).astype(np.int32)


def greedy_mlx(lm, ids: np.ndarray, embeds: mx.array, steps: int) -> list[int]:
    """Free-running greedy decoding from the merged embeddings, as `generate` runs it (KV cache, no EOS stop)."""
    from mlx_lm.generate import generate_step

    tokens = []
    for token, _ in generate_step(mx.array(_text_ids(ids)), lm, max_tokens=steps, sampler=lambda x: mx.argmax(x, -1),
                                  input_embeddings=embeds):
        tokens.append(int(token))
    return tokens


def _model_config_diff(recorded: dict | None, config: dict) -> list[str]:
    if not recorded:
        return []
    skip = {"quantization", "quantization_config", "mlx_vidllm", "_name_or_path", "transformers_version", "dtype",
            "torch_dtype"}
    return sorted(k for k in set(recorded) | set(config) if k not in skip and recorded.get(k) != config.get(k))


# ----------------------------------------------------------------------------------------------------- verify


def verify_reference(model_path, reference, *, atol: float | None = None, rtol: float | None = None,
                     top1: float | None = None, loaded=None) -> VerifyReport:
    """Run the MLX model at `model_path` (any folder `load` takes: the source checkpoint or a converted,
    possibly quantized, MLX folder) on the reference's recorded inputs; returns the per-stage report.

    The model runs in the reference's dtype, with the recorded processor options (video layout, pooling).
    `loaded`: an already loaded (model, processor) to use instead (tests)."""
    from ..errors import ModelError
    from ..loading import load, model_config, read_config, resolve_path
    from ..models.families import detect_family

    ref = reference if isinstance(reference, Reference) else load_reference(reference)
    meta = ref.meta
    path = resolve_path(model_path)
    config = read_config(path)
    family = detect_family(model_config(config)).name
    if family != ref.family:
        raise ModelError(f"{path}: a {family} model, the reference was recorded from a {ref.family} model")
    tol = default_tolerance(ref.dtype, atol, rtol, top1)
    versions = meta.get("versions", {})
    report = VerifyReport(
        reference=str(ref.path or ""), model=str(model_path), family=family, dtype=ref.dtype,
        recorded_on=f"{meta.get('device', '?')} ({meta.get('device_name', '')}), torch {versions.get('torch', '?')}, "
                    f"transformers {versions.get('transformers', '?')}",
        tolerance=tol, quantization=config.get("quantization"),
    )
    changed = _model_config_diff(meta.get("model", {}).get("config"), model_config(config))
    if changed:
        report.notes.append(f"config.json differs from the recorded model's in: {', '.join(changed[:8])}")

    model, _ = loaded if loaded is not None else load(path, dtype=ref.dtype, **meta.get("options", {}))
    inputs = ref.inputs

    # vision tower, before the projector
    ours = vision_features(family, model, inputs)
    for kind, theirs in ref.vision.items():
        if kind not in ours:
            raise ModelError(f"the reference has vision features {kind!r}, the MLX model computed none")
        report.stages.append(compare(f"vision.{kind}", ours[kind], theirs, note="tower output, pre-projector"))

    # merged input embeddings
    embeds = model.get_input_embeddings(**inputs)
    mx.eval(embeds)
    report.stages.append(compare("embeds", embeds, ref.embeds, note="projected media merged into the text"))

    # logits at the recorded positions and teacher-forced greedy steps, from one pass over prompt + ref tokens
    lm = model.language_model
    ids = np.asarray(inputs["input_ids"]).reshape(-1)
    L, tokens_ref = len(ids), [int(t) for t in ref.tokens]
    N = len(tokens_ref)
    vocab = ref.logits.shape[-1]
    prefix = np.asarray(tokens_ref[:-1], dtype=np.int32)
    all_ids = np.concatenate([_text_ids(ids), prefix])
    all_embeds = mx.concatenate([embeds, lm.model.embed_tokens(mx.array(prefix)).astype(embeds.dtype)]) \
        if len(prefix) else embeds
    hidden = lm.model(mx.array(all_ids)[None], None, all_embeds[None])[0]
    rows = mx.array(np.concatenate([np.asarray(ref.positions, np.int32), np.arange(L - 1, L - 1 + N, dtype=np.int32)]))
    logits = _head(lm, hidden[rows])
    mx.eval(logits)
    if logits.shape[-1] != vocab:
        raise ModelError(f"the MLX model's vocabulary has {logits.shape[-1]} entries, the reference's {vocab}")
    P = len(ref.positions)
    tie = tie_threshold(tol, ref)
    report.tie_threshold = tie
    ours_pos = _f32(logits[:P])
    s = compare("logits", ours_pos, ref.logits, top1_axis=True, note=f"{P} positions (media + last)")
    top2 = np.sort(ref.logits, axis=-1)[:, -2:]
    missed = ours_pos.argmax(-1) != ref.logits.argmax(-1)
    s.ties = int((missed & ((top2[:, 1] - top2[:, 0]) <= tie)).sum()) if P else 0  # top-1 minus top-2
    s.gated = True
    report.stages.append(s)
    margins = np.asarray(ref.margins, dtype=np.float32)
    tf_pred = np.asarray(mx.argmax(logits[P:], axis=-1)).tolist()
    tf_miss = [i for i, (a, b) in enumerate(zip(tf_pred, tokens_ref)) if a != b]
    report.stages.append(Stage("greedy.teacher_forced", (N,), top1=(N - len(tf_miss), N),
                               ties=sum(int(margins[i] <= tie) for i in tf_miss),
                               gated=tol.half or tol.top1 is not None, note="next token given the reference's prefix"))

    # free-running greedy
    report.tokens_ref = tokens_ref
    report.tokens_mlx = greedy_mlx(lm, ids, embeds, N)
    div = next((i for i, (a, b) in enumerate(zip(report.tokens_mlx, tokens_ref)) if a != b), None)
    report.first_divergence = div
    if div is None:
        note = f"identical ({N}/{N} tokens)"
    else:
        note = f"first divergence at step {div} (reference margin {margins[div]:.2e})"
    report.stages.append(Stage("greedy.free_running", (N,), top1=(div if div is not None else N, N), note=note,
                               gated=not tol.half))

    _judge(report, tol, ref)
    return report


def tie_threshold(tol: Tolerance, ref: Reference) -> float:
    """A reference top-2 margin at or below this is a near-tie: the tolerance itself (float32, absolute), or the
    relative tolerance times the largest recorded logit. A disagreement there is reported, not counted."""
    if tol.atol is not None and not tol.half:
        return tol.atol
    return tol.rtol * float(np.abs(ref.logits).max())


def _judge(report: VerifyReport, tol: Tolerance, ref: Reference) -> None:
    logits = report.stage("logits")
    tf = report.stage("greedy.teacher_forced")
    free = report.stage("greedy.free_running")
    fails = report.failures
    ties = logits.ties + tf.ties
    if ties:
        report.notes.append(f"{ties} top-1 disagreement(s) where the reference's top-2 margin is <= "
                            f"{report.tie_threshold:.2e} (near-ties): counted as agreeing")
    if tol.half or tol.top1 is not None:
        agree = logits.top1[0] + tf.top1[0] + ties
        total = logits.top1[1] + tf.top1[1]
        frac = agree / total if total else 1.0
        tf.ok = frac >= tol.top1
        if not tf.ok:
            fails.append(f"top-1 agreement {agree}/{total} = {frac:.3f} < {tol.top1:g}")
    if tol.half:
        logits.ok = logits.rel <= tol.rtol and tf.ok is not False
        if logits.rel > tol.rtol:
            fails.append(f"logits relative error {logits.rel:.2e} > {tol.rtol:g}")
        return
    if tol.atol is not None:
        logits.ok = logits.max_abs <= tol.atol
        if not logits.ok:
            fails.append(f"logits max |Δ| {logits.max_abs:.2e} > {tol.atol:g}")
    else:
        logits.ok = logits.rel <= tol.rtol
        if not logits.ok:
            fails.append(f"logits relative error {logits.rel:.2e} > {tol.rtol:g}")
    div = report.first_divergence
    if div is None:
        free.ok = True
    elif float(ref.margins[div]) <= report.tie_threshold:
        free.ok = True
        report.notes.append(f"greedy diverges at step {div} where the reference's top-2 margin "
                            f"{float(ref.margins[div]):.2e} is within the tolerance (a near-tie): not a failure")
    else:
        free.ok = False
        fails.append(f"greedy tokens diverge at step {div} (reference margin {float(ref.margins[div]):.2e})")


# ----------------------------------------------------------------------------------------------------- output


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def format_report(report: VerifyReport) -> str:
    lines = [
        f"reference: {report.reference}",
        f"  {report.family}, {report.dtype}, recorded on {report.recorded_on}",
        f"model:     {report.model}" + (f" (quantized {report.quantization.get('bits')}-bit, group "
                                        f"{report.quantization.get('group_size')})" if report.quantized else ""),
        f"tolerance: {report.tolerance.describe()}",
        "",
        f"{'stage':<24}{'shape':<14}{'max |Δ|':>10}{'rel err':>10}{'top-1':>9}  {'':<5} note",
    ]
    for s in report.stages:
        shape = "x".join(str(d) for d in s.shape)
        top1 = f"{s.top1[0]}/{s.top1[1]}" if s.top1 else "-"
        status = "" if s.ok is None else ("ok" if s.ok else ("over" if report.quantized else "FAIL"))
        note = s.note + (f"; {s.ties} miss(es) at a reference near-tie" if s.ties else "")
        lines.append(f"{s.name:<24}{shape:<14}{_num(s.max_abs):>10}{_num(s.rel):>10}{top1:>9}  {status:<5} {note}")
    lines.append("")
    if report.first_divergence is not None:
        d = report.first_divergence
        lines.append(f"greedy reference: {report.tokens_ref[max(d - 2, 0):d + 3]} ... ")
        lines.append(f"greedy MLX:       {report.tokens_mlx[max(d - 2, 0):d + 3]} ... (from step {max(d - 2, 0)})")
    lines += [f"note: {n}" for n in report.notes]
    if report.quantized:
        lines.append("quantized model: reporting quantization error, not failing")
        if report.failures:
            lines.append("  (outside the float tolerance: " + "; ".join(report.failures) + ")")
    elif report.within_tolerance:
        lines.append("PASS: within tolerance")
    else:
        lines.append("FAIL: " + "; ".join(report.failures))
    return "\n".join(lines)


def report_json(report: VerifyReport) -> str:
    return json.dumps(report.to_dict(), indent=2, default=str)


def _same(x, y) -> bool:
    if isinstance(x, list) and x and isinstance(x[0], np.ndarray):  # pixel_values_videos
        return isinstance(y, list) and len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y))
    return np.array_equal(np.asarray(x), np.asarray(y))


def compare_references(a, b) -> tuple[list[Stage], list[str]]:
    """Two recordings of the same inputs (e.g. CUDA vs CPU, or bfloat16 vs float32): per-stage differences
    of `b` from `a`, and notes (input differences, greedy divergence). Reads numpy only."""
    a = a if isinstance(a, Reference) else load_reference(a)
    b = b if isinstance(b, Reference) else load_reference(b)
    notes = []
    same_inputs = a.inputs.keys() == b.inputs.keys() and all(_same(a.inputs[k], b.inputs[k]) for k in a.inputs)
    notes.append("inputs identical" if same_inputs else "inputs DIFFER: the stages below compare different inputs")
    stages = [compare(f"vision.{k}", b.vision[k], v) for k, v in a.vision.items() if k in b.vision]
    stages.append(compare("embeds", b.embeds, a.embeds))
    if np.array_equal(a.positions, b.positions):
        stages.append(compare("logits", b.logits, a.logits, top1_axis=True))
    else:
        notes.append("logits kept at different positions: not compared")
    ta, tb = a.tokens.tolist(), b.tokens.tolist()
    div = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
    n = min(len(ta), len(tb))
    stages.append(Stage("greedy", (n,), top1=(div if div is not None else n, n),
                        note="identical" if div is None else f"first divergence at step {div} "
                                                             f"(margins {a.margins[div]:.2e} / {b.margins[div]:.2e})"))
    return stages, notes


def format_comparison(a: Reference, b: Reference, stages: list[Stage], notes: list[str]) -> str:
    def who(r: Reference) -> str:
        m = r.meta
        return f"{r.path}: {m['family']} {m['dtype']} on {m['device']} ({m.get('device_name', '')}), " \
               f"torch {m.get('versions', {}).get('torch', '?')}"

    header = f"{'stage':<24}{'shape':<14}{'max |Δ|':>10}{'rel err':>10}{'top-1':>9}  note"
    lines = [f"A: {who(a)}", f"B: {who(b)}", "", header]
    for s in stages:
        top1 = f"{s.top1[0]}/{s.top1[1]}" if s.top1 else "-"
        lines.append(f"{s.name:<24}{'x'.join(map(str, s.shape)):<14}{_num(s.max_abs):>10}{_num(s.rel):>10}{top1:>9}  "
                     f"{s.note}")
    return "\n".join(lines + [""] + [f"note: {n}" for n in notes])
