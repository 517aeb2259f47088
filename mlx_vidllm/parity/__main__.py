"""python -m mlx_vidllm.parity record|verify|compare ...

    # on the machine with torch (CUDA or CPU): run the PyTorch reference, write ref.npz
    python -m mlx_vidllm.parity record --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf \\
        --video clip.mp4 --prompt "What happens?" --out ref.npz --device cuda --dtype bfloat16
    # anywhere MLX runs (no torch needed): compare the MLX model stage by stage
    python -m mlx_vidllm.parity verify --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --reference ref.npz
    # two recordings of the same inputs (CUDA vs CPU, bfloat16 vs float32)
    python -m mlx_vidllm.parity compare ref-cpu.npz ref-cuda.npz

`verify` is the same as `mlx-vidllm verify`. `record` needs torch and transformers (the test extra).
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import _blas  # noqa: F401  (OpenBLAS before mlx.core on Linux)


def _record(args) -> int:
    from .references import TORCH_MISSING, record

    fixture = json.loads(args.fixture) if args.fixture else None
    try:
        out = record(args.model, args.out, args.prompt, video=args.video, images=args.image or [], device=args.device,
                     dtype=args.dtype, steps=args.steps, last=args.last, num_frames=args.num_frames, fps=args.fps,
                     max_frames=args.max_frames, video_layout=args.video_layout, pool_mode=args.pool_mode,
                     torch_model=args.torch_model, fixture=fixture, threads=args.threads)
    except ImportError as e:
        if str(e) == TORCH_MISSING:
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1024:.0f} KiB): {args.dtype} reference on {args.device}")
    return 0


def _verify(args) -> int:
    from .verify import format_report, report_json, verify_reference

    report = verify_reference(args.model, args.reference, atol=args.atol, rtol=args.rtol, top1=args.top1)
    print(report_json(report) if args.json else format_report(report))
    return report.exit_code


def _compare(args) -> int:
    from . import load_reference
    from .verify import compare_references, format_comparison

    a, b = load_reference(args.a), load_reference(args.b)
    stages, notes = compare_references(a, b)
    print(format_comparison(a, b, stages, notes))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_vidllm.parity", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser("record", help="run the PyTorch reference and write a reference .npz (needs torch)")
    rec.add_argument("--model", required=True, help="model folder or Hugging Face repo id")
    rec.add_argument("--video", help="video file (decoded with the model's own sampling rule)")
    rec.add_argument("--image", action="append", help="image file (repeat for several)")
    rec.add_argument("--prompt", required=True, help="the question (the chat template is applied)")
    rec.add_argument("--out", required=True, help="reference file to write (.npz)")
    rec.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ... (default cpu)")
    rec.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    rec.add_argument("--steps", type=int, default=20, help="greedy steps recorded (default 20)")
    rec.add_argument("--last", type=int, default=8, help="final prompt positions whose logits are kept (default 8)")
    rec.add_argument("--num-frames", type=int, help="frames sampled uniformly (default: the model's rule)")
    rec.add_argument("--fps", type=float, help="sample at this rate instead")
    rec.add_argument("--max-frames", type=int, help="cap on frames with --fps")
    rec.add_argument("--video-layout", choices=["grid", "one_token", "frame", "no_token"],
                     help="OneVision / LLaVA-Video token layout (default: the model's)")
    rec.add_argument("--pool-mode", choices=["bilinear", "average", "max"], help="default: the model's")
    rec.add_argument("--torch-model", help="transformers-format folder with the same weights, when --model is a "
                                           "format transformers cannot load (original LLaVA-NeXT LLaVA-Video)")
    rec.add_argument("--fixture", help="JSON describing how the checkpoint was built (seed, builder), stored as is")
    rec.add_argument("--threads", type=int, help="torch CPU threads")
    rec.set_defaults(run=_record)

    ver = sub.add_parser("verify", help="compare the MLX model with a reference .npz (same as mlx-vidllm verify)")
    ver.add_argument("--model", required=True, help="MLX or Hugging Face model folder / repo id")
    ver.add_argument("--reference", required=True, help="reference .npz written by `record`")
    ver.add_argument("--atol", type=float, help="float32: max |Δ logits| allowed (default 1e-4)")
    ver.add_argument("--rtol", type=float, help="relative error allowed (half precision default 2e-2; on float32 "
                                                "it replaces --atol, e.g. 1e-3 at full size)")
    ver.add_argument("--top1", type=float, help="top-1 agreement required (half precision default 0.99)")
    ver.add_argument("--json", action="store_true", help="print the report as JSON")
    ver.set_defaults(run=_verify)

    cmp = sub.add_parser("compare", help="per-stage differences between two recordings of the same inputs "
                                         "(CUDA vs CPU, bfloat16 vs float32)")
    cmp.add_argument("a", help="reference .npz (the baseline)")
    cmp.add_argument("b", help="reference .npz compared with it")
    cmp.set_defaults(run=_compare)

    args = parser.parse_args(argv)
    from ..errors import VidLLMError

    try:
        return args.run(args)
    except (VidLLMError, ValueError, RuntimeError) as e:  # bad model / reference / options: one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return getattr(e, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
