"""The benchmark, in one command: mlx-vidllm vs mlx-vlm vs transformers (PyTorch CPU) on LLaVA-OneVision-0.5B.

    python benchmarks/run.py [--preset full|small] [--frames 8 32] [--rounds 3]
                             [--systems mlx-vidllm,mlx-vlm,transformers] [--dtypes float32,4bit]
                             [--video examples/videollava_sample_demo_1.mp4] [--budget-minutes N]

Builds the random-weight checkpoints once (benchmarks/build.py, cached), measures the machine (MLX matmul
rate and memory bandwidth, before and after), then runs ONE fresh process (benchmarks/worker.py) per
system, config and round, interleaved (A B C A B C ...), and writes benchmarks/RESULTS.md: per-stage
medians with min-max, ratios between systems of this run, the compute / bandwidth floors and the targets
of issue #6. Only ratios within one run are meaningful.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import build  # noqa: E402

SYSTEMS = ("mlx-vidllm", "mlx-vlm", "transformers")
BANDWIDTH_KEYS = ("bandwidth_mlx_sum_gbs", "bandwidth_mlx_gemv_gbs", "bandwidth_numpy_sum_gbs",
                  "bandwidth_numpy_gemv_gbs")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
COLUMNS = [("load_s", "load s"), ("media_s", "media s"), ("vision_s", "vision s"), ("prefill_s", "prefill s"),
           ("ttft_s", "TTFT s"), ("decode_tps", "decode tok/s"), ("peak_rss_gb", "peak RSS GB"),
           ("mlx_peak_gb", "MLX peak GB")]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- running the workers -------------------------------------------------------------------------------------


def model_dir(paths: dict, system: str, dtype: str) -> Path:
    """4-bit: each MLX system's own conversion. Float: the transformers checkpoint, which mlx-vidllm and
    transformers cast at load time; mlx-vlm cannot (no load-time dtype), so float32 is its own conversion."""
    if dtype == "4bit":
        return paths[f"{system}-4bit"]
    if system == "mlx-vlm" and dtype == "float32":
        return paths["mlx-vlm-float32"]
    return paths["hf"]


def supported(system: str, dtype: str) -> bool:
    return not (system == "transformers" and dtype == "4bit")  # transformers runs the float checkpoint only


def run_worker(argv: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(HERE / "worker.py"), *argv]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - start}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "wall_s": time.perf_counter() - start}
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": time.perf_counter() - start}


def probe(probe_mb: int) -> dict:
    return run_worker(["--probe", "--probe-mb", str(probe_mb)], timeout=600)


# --- floors --------------------------------------------------------------------------------------------------


def lm_spec(spec: dict) -> dict:
    t = spec["text"]
    d, heads, kv = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
    dh = d // heads
    linear = t["num_hidden_layers"] * (2 * d * d + 2 * d * kv * dh + 3 * d * t["intermediate_size"])
    return {"d": d, "heads": heads, "kv": kv, "dh": dh, "layers": t["num_hidden_layers"], "linear": linear,
            "vocab": spec["vocab_size"]}


def prefill_flops(spec: dict, tokens: int) -> float:
    """2 * decoder linear params * tokens + causal attention (QK^T and AV) + the LM head for the last token."""
    s = lm_spec(spec)
    attention = s["layers"] * 2 * s["heads"] * s["dh"] * tokens * (tokens + 1)
    return 2 * s["linear"] * tokens + attention + 2 * s["d"] * s["vocab"]


def vision_flops(spec: dict, frames: int) -> float:
    """SigLIP (patch embedding, layers with full attention) + the 2-layer projector, per frame."""
    v, d = spec["vision"], spec["text"]["hidden_size"]
    D, F = v["hidden_size"], v["intermediate_size"]
    n = (v["image_size"] // v["patch_size"]) ** 2
    layer = 2 * n * (4 * D * D + 2 * D * F) + 4 * n * n * D
    patch = 2 * n * 3 * v["patch_size"] ** 2 * D
    projector = 2 * n * (D * d + d * d)
    return frames * (v["num_hidden_layers"] * layer + patch + projector)


SAFETENSORS_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "I64": 8}


def lm_weight_bytes(folder: Path, dtype: str) -> int:
    """Bytes of the decoder's (language_model.*) tensors, read from the safetensors headers; a float run
    reads them in its own dtype (the Hub checkpoint is stored float16)."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name == "__metadata__" or not name.startswith("language_model."):
                continue
            numel = math.prod(t["shape"])
            total += numel * (SAFETENSORS_BYTES[t["dtype"]] if dtype == "4bit" else 4 if dtype == "float32" else 2)
    return total


def kv_bytes_per_token(spec: dict, context: int, dtype: str) -> int:
    s = lm_spec(spec)
    return 2 * s["layers"] * s["kv"] * s["dh"] * context * (2 if dtype in ("float16", "bfloat16") else 4)


# --- statistics and the report -------------------------------------------------------------------------------


def med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def cell(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "–"
    fmt = (lambda v: f"{v:.3g}" if v < 100 else f"{v:.0f}")
    m = fmt(statistics.median(vals))
    return m if len(vals) == 1 else f"{m} ({fmt(min(vals))}–{fmt(max(vals))})"


def joined(probes: list[dict], key: str) -> str:
    return " / ".join(f"{p[key]:.1f}" for p in probes)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fx(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}×"


def shown_path(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")) * 1024
    except (OSError, StopIteration):
        mem = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem / 1e9, 1), "os": platform.platform()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mlx", "mlx-metal", "mlx-cpu", "mlx-lm", "mlx-vlm", "mlx-vidllm", "transformers", "torch", "numpy",
                "av", "opencv-python", "opencv-python-headless"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:  # read-only
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True)
        out["mlx-vidllm commit"] = rev.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return out


def evaluate(results: list[dict], args, spec: dict, paths: dict, probes: list[dict]) -> dict:
    """Floors, ratios (medians of mlx-vidllm / medians of the others) and the issue's targets."""
    ok = [r for r in results if "error" not in r]

    def median_of(system, dtype, frames, key):
        return med([r for r in ok if (r["system"], r["dtype"], r["frames"]) == (system, dtype, frames)], key)

    rate_lm = max(p["matmul_lm_gflops"] for p in probes) * 1e9
    rate_vision = max(p["matmul_vision_gflops"] for p in probes) * 1e9
    bandwidth = max(p[k] for p in probes for k in BANDWIDTH_KEYS) * 1e9
    floors, ratios, targets = {}, [], []

    def target(what, value, limit, at_most=True):
        if value is None:
            targets.append((what, "not measured", "–", "–"))
            return
        met = value <= limit if at_most else value >= limit
        gap = value / limit if at_most else limit / value
        targets.append((what, f"{value:.3g} ({'≤' if at_most else '≥'} {limit})", "met" if met else "**not met**",
                        "–" if met else f"{gap:.2f}× off"))

    for frames in args.frames:
        for dtype in args.dtypes:
            ours = lambda key: median_of("mlx-vidllm", dtype, frames, key)  # noqa: E731
            vlm = lambda key: median_of("mlx-vlm", dtype, frames, key)  # noqa: E731
            tokens = next((median_of(s, dtype, frames, "prompt_tokens") for s in SYSTEMS
                           if median_of(s, dtype, frames, "prompt_tokens")), None)
            if tokens is None:
                continue
            tokens = int(tokens)
            lm_bytes = (lm_weight_bytes(paths["mlx-vidllm-4bit"] if dtype == "4bit" else paths["hf"], dtype)
                        + kv_bytes_per_token(spec, tokens + 32, dtype))  # KV at the middle of the 64 tokens
            f = {"tokens": tokens, "prefill_gflop": prefill_flops(spec, tokens) / 1e9,
                 "vision_gflop": vision_flops(spec, frames) / 1e9, "bytes_per_token_gb": lm_bytes / 1e9,
                 "decode_floor_tps": bandwidth / lm_bytes}
            f["prefill_floor_s"] = f["prefill_gflop"] * 1e9 / rate_lm
            f["vision_floor_s"] = f["vision_gflop"] * 1e9 / rate_vision
            f["ttft_floor_s"] = f["prefill_floor_s"] + f["vision_floor_s"]
            floors[(frames, dtype)] = f
            ttft = ours("ttft_s")
            vision_prefill = ours("vision_s") + ours("prefill_s") if ttft is not None else None
            r = {"frames": frames, "dtype": dtype,
                 "ttft_vs_vlm": ratio(ttft, vlm("ttft_s")),
                 "decode_vs_vlm": ratio(ours("decode_tps"), vlm("decode_tps")),
                 "rss_vs_vlm": ratio(ours("peak_rss_gb"), vlm("peak_rss_gb")),
                 "ttft_vs_tr_f32": ratio(ttft, median_of("transformers", "float32", frames, "ttft_s")),
                 "ttft_vs_floor": ratio(ttft, f["ttft_floor_s"]),
                 "vision_prefill_vs_floor": ratio(vision_prefill, f["ttft_floor_s"]),
                 "decode_vs_floor": ratio(ours("decode_tps"), f["decode_floor_tps"]),
                 "4bit_vs_f32": ratio(ttft, median_of("mlx-vidllm", "float32", frames, "ttft_s"))}
            for name in ("second_stream", "chat_follow_up", "chat_new_session"):
                r[name] = ratio(ours(f"{name}_ttft_s"), ttft)
            ratios.append(r)

            label = f"{frames} frames, {dtype}"
            if dtype in ("float32", "4bit"):
                target(f"TTFT / mlx-vlm, {label}", r["ttft_vs_vlm"], 0.5)
                target(f"TTFT / floor, {label}", r["ttft_vs_floor"], 1.3)
                target(f"TTFT / transformers float32, {label}", r["ttft_vs_tr_f32"], 1.0)
                target(f"decode tok/s / mlx-vlm, {label}", r["decode_vs_vlm"], 1.5, at_most=False)
            if dtype == "float32":
                target(f"decode tok/s / bandwidth floor, {label}", r["decode_vs_floor"], 0.8, at_most=False)
            if dtype == "4bit" and "float32" in args.dtypes:
                target(f"TTFT 4-bit / TTFT float32, {frames} frames", r["4bit_vs_f32"], 1.0)
            if frames == max(args.frames):
                target(f"peak RSS / mlx-vlm, {label}", r["rss_vs_vlm"], 0.7)
            has_chat = r["chat_new_session"] is not None
            target(f"second question TTFT / first ({'new ChatSession' if has_chat else 'stream_generate'}), {label}",
                   r["chat_new_session"] if has_chat else r["second_stream"], 0.1)
            if has_chat:
                target(f"follow-up question TTFT / first (same ChatSession), {label}", r["chat_follow_up"], 0.1)
    return {"floors": floors, "targets": targets, "ratios": ratios, "rate_lm": rate_lm, "rate_vision": rate_vision,
            "bandwidth": bandwidth}


def write_report(out: Path, args, results: list[dict], probes: list[dict], ev: dict, info: dict) -> None:
    ok = [r for r in results if "error" not in r]
    L = [f"# Benchmark results: LLaVA-OneVision-0.5B ({args.preset} preset, random weights)", ""]
    L += [f"- date: {info['date']}", f"- command: `{info['command']}`",
          f"- video: `{shown_path(args.video)}`; frames: {', '.join(map(str, args.frames))}; 64 forced greedy tokens",
          f"- rounds: {info['rounds_done']} of {args.rounds} requested{info['budget_note']}; "
          f"{len(results)} worker runs, {len(results) - len(ok)} failed; total {info['minutes']:.1f} min",
          f"- machine: {info['machine']['cpu']}, {info['machine']['cores']} cores, {info['machine']['ram_gb']} GB RAM, "
          f"{info['machine']['os']}; load average {info['load_before']} before, {info['load_after']} after",
          f"- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
          f"- MLX BLAS: {probes[0]['blas']} (`mlx_vidllm._blas.status`), device {probes[0]['device']}",
          f"- machine probes ({'before / after' if len(probes) > 1 else 'before only'}): MLX float32 matmul "
          f"{joined(probes, 'matmul_lm_gflops')} GFLOP/s "
          f"at 2048×896×4864, {joined(probes, 'matmul_vision_gflops')} GFLOP/s at 2048×1152×4304; reading "
          f"{probes[0]['probe_mb']} MB: {joined(probes, 'bandwidth_mlx_sum_gbs')} GB/s (mx.sum), "
          f"{joined(probes, 'bandwidth_mlx_gemv_gbs')} GB/s (MLX x @ W.T, as in decoding), "
          f"{joined(probes, 'bandwidth_numpy_sum_gbs')} GB/s (numpy sum), "
          f"{joined(probes, 'bandwidth_numpy_gemv_gbs')} GB/s (numpy / OpenBLAS matrix-vector)", ""]
    if args.preset != "full":
        L += [f"> **{args.preset} preset**: a narrow, few-layer model for checking the benchmark itself; the "
              "timings say nothing about the real model.", ""]

    L += ["## Per stage (median, min–max over rounds)", "",
          "| frames | dtype | system | runs | prompt tokens | " + " | ".join(c[1] for c in COLUMNS) + " |",
          "|---|---|---|---|---|" + "---|" * len(COLUMNS)]
    for frames in args.frames:
        for dtype in args.dtypes:
            for system in args.systems:
                rows = [r for r in ok if (r["system"], r["dtype"], r["frames"]) == (system, dtype, frames)]
                if not rows:
                    continue
                L.append(f"| {frames} | {dtype} | {system} | {len(rows)} | {cell(rows, 'prompt_tokens')} | "
                         + " | ".join(cell(rows, k) for k, _ in COLUMNS) + " |")
    L += ["", "Second question on the same video (mlx-vidllm, same process, after the first answer), TTFT in s:", "",
          "| frames | dtype | first (generate_step) | stream_generate again (no cache) | ChatSession first | "
          "ChatSession follow-up | new ChatSession, same video |", "|---|---|---|---|---|---|---|"]
    keys = ("ttft_s", "second_stream_ttft_s", "chat_first_ttft_s", "chat_follow_up_ttft_s", "chat_new_session_ttft_s")
    for frames in args.frames:
        for dtype in args.dtypes:
            rows = [r for r in ok if (r["system"], r["dtype"], r["frames"]) == ("mlx-vidllm", dtype, frames)]
            if rows:
                L.append(f"| {frames} | {dtype} | " + " | ".join(cell(rows, k) for k in keys) + " |")
    if not any(r.get("chat_first_ttft_s") for r in ok):
        L += ["", "(No ChatSession timings: `mlx_vidllm.chat.ChatSession` is not available, or `--second` "
              "left `chat` out.)"]

    L += ["", "## Ratios (medians of this run; mlx-vidllm / other)", "",
          "| frames | dtype | TTFT / mlx-vlm | decode / mlx-vlm | peak RSS / mlx-vlm | TTFT / transformers f32 | "
          "4-bit TTFT / f32 TTFT | 2nd question / 1st (new session) | follow-up / 1st |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in ev["ratios"]:
        L.append(f"| {r['frames']} | {r['dtype']} | {fx(r['ttft_vs_vlm'])} | {fx(r['decode_vs_vlm'])} | "
                 f"{fx(r['rss_vs_vlm'])} | {fx(r['ttft_vs_tr_f32'])} | "
                 f"{fx(r['4bit_vs_f32']) if r['dtype'] == '4bit' else '–'} | {fx(r['chat_new_session'], 3)} | "
                 f"{fx(r['chat_follow_up'], 3)} |")

    L += ["", "## Floors (this machine, this run)", "",
          f"Matmul rate: {ev['rate_lm'] / 1e9:.1f} GFLOP/s (decoder shapes), {ev['rate_vision'] / 1e9:.1f} GFLOP/s "
          f"(vision shapes); bandwidth {ev['bandwidth'] / 1e9:.1f} GB/s (the fastest reader of the probes: the "
          "machine's, not necessarily MLX's). TTFT floor = vision FLOPs / "
          "rate + prefill FLOPs / rate (frame decoding not included); decode floor = bandwidth / bytes read per "
          "token (decoder weights in the run's dtype, tied embedding read once as the LM head, + KV cache).", "",
          "| frames | dtype | prompt tokens | vision GFLOP | prefill GFLOP | vision floor s | prefill floor s | "
          "TTFT floor s | mlx-vidllm TTFT / floor | (vision+prefill) / floor | GB per token | decode floor tok/s | "
          "mlx-vidllm decode / floor |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ev["ratios"]:
        f = ev["floors"][(r["frames"], r["dtype"])]
        L.append(f"| {r['frames']} | {r['dtype']} | {f['tokens']} | {f['vision_gflop']:.0f} | "
                 f"{f['prefill_gflop']:.0f} | "
                 f"{f['vision_floor_s']:.3g} | {f['prefill_floor_s']:.3g} | {f['ttft_floor_s']:.3g} | "
                 f"{fx(r['ttft_vs_floor'])} | {fx(r['vision_prefill_vs_floor'])} | {f['bytes_per_token_gb']:.3f} | "
                 f"{f['decode_floor_tps']:.1f} | {fx(r['decode_vs_floor'])} |")

    L += ["", "## Targets (issue #6)", "", "| target | measured | status | gap |", "|---|---|---|---|"]
    L += [f"| {t[0]} | {t[1]} | {t[2]} | {t[3]} |" for t in ev["targets"]]

    failed = [r for r in results if "error" in r]
    if failed:
        L += ["", "## Failed runs", ""]
        L += [f"- {r['system']} {r['dtype']} {r['frames']} frames, round {r['round']}: {r['error']}" for r in failed]

    L += ["", "## What was timed", "",
          "Each run is a fresh process: load (reported separately), then one question about the video. "
          "`media` = frame decoding + preprocessing + prompt tokenization; `vision` = vision tower + projector + "
          "pooling + merge into the prompt embeddings; `prefill` = decoder prefill to the first token; TTFT = "
          "the three on one clock; decode tok/s = 63 / (last token − first token), 64 greedy tokens, EOS ignored. "
          "Peak RSS = getrusage maximum of the process, right after the first answer (load included); MLX peak = "
          "mx.get_peak_memory, reset after loading.", "",
          "- **mlx-vidllm**: `load(dtype=...)` (4-bit: its own `convert(quantize=True)` folder); "
          "`processor.load_video` + `processor(...)`, `model.get_input_embeddings`, then mlx-lm's `generate_step` "
          "with the embeddings (what `stream_generate` does, minus its EOS stop). Second question: "
          "`stream_generate` again (no cache), then `ChatSession.ask` twice (follow-up) and a new `ChatSession` "
          "on the same video.",
          "- **mlx-vlm**: `mlx_vlm.load` of its own conversions, `mlx_vlm.convert(dtype='float32')` (it has no "
          "load-time dtype) and `mlx_vlm.convert(quantize=True, q_group_size=64, dtype='float32')` (vision "
          "skipped); "
          "`apply_chat_template(..., video=...)` + `prepare_inputs(videos=[path], nframes=N)` (its own OpenCV "
          "decoder and numpy video processor: native video, 196 tokens per frame + 1, like ours); then "
          "`mlx_vlm.generate.generate_step`, whose `model.get_input_embeddings` call is wrapped to be evaluated and "
          "timed (vision); prefill = from there to the first token. Same OpenBLAS preload as mlx-vidllm.",
          "- **transformers** (PyTorch CPU, eager loop): `LlavaOnevisionForConditionalGeneration.from_pretrained("
          "dtype=...)`; frames with `transformers.video_utils.load_video(backend='pyav')`, resized / normalized "
          "in numpy + PIL exactly like `LlavaOnevisionVideoProcessor` (which needs torchvision, not installed); "
          "`get_video_features` + `masked_scatter` (vision), one forward with `use_cache=True` (prefill), then a "
          "greedy loop over the KV cache.",
          "", f"Raw results: `{info['raw']}`.", ""]
    L += ["<details><summary>raw worker results</summary>", "", "```"]
    L += [json.dumps(r) for r in probes + results]
    L += ["```", "", "</details>", ""]
    out.write_text("\n".join(L), encoding="utf-8")


# --- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(build.PRESETS), default="full")
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--dtypes", default="float32,4bit")
    ap.add_argument("--video", default="examples/videollava_sample_demo_1.mp4")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="no new round starts once the elapsed time (build included) plus the last round's "
                         "would exceed it; the first round always runs")
    ap.add_argument("--second", default="stream,chat",
                    help="mlx-vidllm's second-question cases after the first answer: stream (stream_generate again, "
                         "no cache: one more full TTFT), chat (ChatSession: one more full TTFT, then the cached "
                         "follow-up and new-session questions), none")
    ap.add_argument("--job-timeout", type=float, default=7200, help="seconds, per worker process")
    ap.add_argument("--probe-mb", type=int, default=1024, help="array size of the bandwidth probe")
    ap.add_argument("--output", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--from-raw", metavar="JSONL", help="write the report from the raw results of an earlier run "
                    "(benchmarks/.cache/runs/*.jsonl) instead of running; its settings replace the options above")
    args = ap.parse_args()
    if args.from_raw:  # the settings of that run
        saved = next(json.loads(ln) for ln in open(args.from_raw, encoding="utf-8") if '"kind": "args"' in ln)
        for k in ("preset", "frames", "rounds", "systems", "dtypes", "video", "second", "probe_mb"):
            setattr(args, k, saved[k])
        args.systems, args.dtypes = ",".join(args.systems), ",".join(args.dtypes)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [s for s in args.systems if s not in SYSTEMS] + [d for d in args.dtypes if d not in (*FLOAT_DTYPES, "4bit")]
    if bad:
        raise SystemExit(f"unknown system / dtype: {', '.join(bad)}")
    video = Path(args.video).expanduser().resolve()
    if not video.is_file():
        raise SystemExit(f"{args.video}: no such video")
    args.video = str(video)

    if args.from_raw:
        report(args, *read_raw(Path(args.from_raw)))
        return
    report(args, *run_all(args))


def run_all(args) -> tuple[dict, list[dict], list[dict]]:
    """Build, probe, run every worker; everything also goes to a raw .jsonl as it arrives."""
    start = time.perf_counter()
    info = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]), "machine": machine(),
            "versions": versions(), "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    raw = HERE / ".cache" / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.preset}.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    info["raw"] = os.path.relpath(raw, ROOT)

    def record(kind: str, item: dict) -> None:
        with open(raw, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, **item}) + "\n")

    record("args", vars(args))
    paths = build.build(args.preset)
    log("probing the machine (matmul rate, bandwidth)")
    probes = [probe(args.probe_mb)]
    if "error" in probes[0]:
        raise SystemExit(f"machine probe failed: {probes[0]['error']}")
    record("probe", probes[0])

    jobs = [(f, d, s) for f in args.frames for d in args.dtypes for s in args.systems if supported(s, d)]
    results, last_round = [], 0.0
    info.update(rounds_done=0, budget_note="")
    for rnd in range(1, args.rounds + 1):
        elapsed = time.perf_counter() - start
        if args.budget_minutes is not None and rnd > 1 and elapsed + last_round > args.budget_minutes * 60:
            info["budget_note"] = (f" (stopped: the budget of {args.budget_minutes:g} min would be exceeded; "
                                   f"{elapsed / 60:.1f} min spent, the last round took {last_round / 60:.1f} min)")
            log(info["budget_note"].strip(" ()"))
            break
        round_start = time.perf_counter()
        for i, (frames, dtype, system) in enumerate(jobs, 1):
            log(f"round {rnd}/{args.rounds}, run {i}/{len(jobs)}: {system} {dtype} {frames} frames")
            argv = ["--system", system, "--model", str(model_dir(paths, system, dtype)), "--dtype", dtype,
                    "--frames", str(frames), "--video", args.video, "--second", args.second]
            r = run_worker(argv, args.job_timeout)
            r.update(system=system, dtype=dtype, frames=frames, round=rnd)
            log(f"  -> {r['error']}" if "error" in r else
                f"  -> TTFT {r['ttft_s']:.2f} s, {r['decode_tps']:.1f} tok/s, peak RSS {r['peak_rss_gb']:.2f} GB "
                f"({r['wall_s']:.0f} s wall)")
            results.append(r)
            record("run", r)
        info["rounds_done"], last_round = rnd, time.perf_counter() - round_start

    log("probing the machine again")
    after = probe(args.probe_mb)
    if "error" in after:
        log(f"the second probe failed ({after['error']}): the floors use the first one")
    else:
        probes.append(after)
        record("probe", after)
    info.update(minutes=(time.perf_counter() - start) / 60, load_after=" ".join(f"{x:.1f}" for x in os.getloadavg()))
    record("info", info)
    return info, probes, results


def read_raw(path: Path) -> tuple[dict, list[dict], list[dict]]:
    """A raw .jsonl of an earlier (maybe interrupted) run -> what `report` needs."""
    lines = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    results = [ln for ln in lines if ln["kind"] == "run"]
    info = next((ln for ln in lines if ln["kind"] == "info"), None) or {
        "date": "(not recorded)", "command": "(not recorded)", "machine": machine(), "versions": versions(),
        "load_before": "?", "load_after": "?", "minutes": float("nan"), "budget_note": " (run interrupted)",
        "rounds_done": max((r["round"] for r in results), default=0)}
    info["raw"] = os.path.relpath(path.resolve(), ROOT)
    return info, [ln for ln in lines if ln["kind"] == "probe"], results


def report(args, info: dict, probes: list[dict], results: list[dict]) -> None:
    ev = evaluate(results, args, build.PRESETS[args.preset], build.paths(args.preset), probes)
    write_report(Path(args.output), args, results, probes, ev, info)
    log(f"wrote {args.output}")
    for t in ev["targets"]:
        print(f"{t[2]:>12}  {t[0]}: {t[1]}" + (f" ({t[3]})" if t[3] != "–" else ""))


if __name__ == "__main__":
    main()
