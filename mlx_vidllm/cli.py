"""Command line: argument parsing and error reporting only; the work is in generate/loading."""

from __future__ import annotations

import sys
from contextlib import contextmanager
import traceback
import warnings

import click

from . import _blas
from .errors import EXIT_CODES_HELP, VidLLMError

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"


def _fail(e: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    code = getattr(e, "exit_code", 1)
    msg = str(e) if isinstance(e, VidLLMError) else f"{type(e).__name__}: {e}"
    # file names need not be valid UTF-8: never fail while reporting a failure
    msg = msg.splitlines()[0] if msg else type(e).__name__
    click.echo(f"error: {msg}".encode("utf-8", "backslashreplace").decode("utf-8"), err=True)
    sys.exit(code)


@contextmanager
def _reported(debug: bool):
    """Ctrl-C -> exit 130; any other failure -> one line and the error's exit code."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo("\n[interrupted]", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        _fail(e, debug)


def _short_warnings() -> None:
    """Warnings as one line each on stderr, without the source line."""
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"


@click.group(help=f"Video-language models on Apple Silicon with MLX.\n\n{EXIT_CODES_HELP}")
@click.version_option(package_name="mlx-vidllm")
def main() -> None:
    _short_warnings()


def _run_options(f):
    """Options shared by `generate` and `chat`: model, media, sampling, generation."""
    options = [
        click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model folder or Hugging Face repo id."),
        click.option("--video", type=click.Path(dir_okay=True), help="Video file to ask about."),
        click.option("--image", "images", multiple=True, type=click.Path(), help="Image file (repeat for several)."),
        click.option("--system", default=None, help="Optional system message."),
        click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1)),
        click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1)),
        click.option("--seed", default=None, type=int, help="Random seed for sampling."),
        click.option("--num-frames", default=None, type=click.IntRange(min=1),
                     help="Frames sampled over the whole video (default: the model's own rule: 16 for OneVision, "
                          "64 for LLaVA-Video, 8 for Video-LLaVA)."),
        click.option("--fps", default=None, type=click.FloatRange(min=0, min_open=True),
                     help="Sample at this rate instead of a fixed count."),
        click.option("--max-frames", default=None, type=click.IntRange(min=1), help="Cap on frames with --fps."),
        click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
                     help="Cast the weights (default: as stored)."),
        click.option("--video-layout", type=click.Choice(["grid", "one_token", "frame", "no_token"]), default=None,
                     help="Where the newline token goes in a video (default: the model's; grid for LLaVA-Video, "
                          "one_token for OneVision)."),
        click.option("--pool-mode", type=click.Choice(["bilinear", "average", "max"]), default=None,
                     help="How video frame features are pooled 2x2 (default: the model's config, bilinear)."),
        click.option("--verbose", is_flag=True, help="Print timing and memory statistics to stderr."),
        click.option("--debug", is_flag=True, help="Show full tracebacks on errors."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _check_media(video, images, num_frames, fps) -> None:
    if video is None and not images:
        raise click.UsageError("give --video FILE and/or --image FILE")
    if num_frames and fps:
        raise click.UsageError("--num-frames and --fps are alternatives; give one")


def _stats(last) -> None:
    click.echo(
        f"prompt tokens: {last.prompt_tokens}, media: {last.media_time:.2f} s, vision: {last.vision_time:.2f} s, "
        f"prefill: {last.prefill_tps:.1f} tok/s, time to first token: {last.time_to_first_token:.2f} s\n"
        f"generated {last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s, "
        f"peak memory {last.peak_memory:.2f} GB",
        err=True,
    )


@main.command(epilog=EXIT_CODES_HELP)
@_run_options
@click.option("--prompt", required=True, help="Your question (the chat template is applied for you).")
def generate(model, video, images, prompt, system, max_tokens, temp, top_p, seed, num_frames, fps, max_frames,
             dtype, video_layout, pool_mode, verbose, debug):
    """Ask a question about a video and/or images; the answer streams to stdout.

    \b
    Example:
      mlx-vidllm generate --video clip.mp4 --prompt "What happens in this video?"
    """
    from .generate import stream_generate
    from .loading import load

    _check_media(video, images, num_frames, fps)
    last = None
    with _reported(debug):
        m, processor = load(model, dtype=dtype, video_layout=video_layout, pool_mode=pool_mode)
        _blas.warn_if_slow()
        for last in stream_generate(m, processor, prompt, video=video, images=list(images), max_tokens=max_tokens,
                                    temperature=temp, top_p=top_p, seed=seed, num_frames=num_frames, fps=fps,
                                    max_frames=max_frames, system=system):
            click.echo(last.text, nl=False)
        click.echo()
        sys.stdout.flush()  # the answer before the statistics on a shared terminal
    if verbose and last is not None:
        _stats(last)


@main.command(epilog=EXIT_CODES_HELP)
@_run_options
def chat(model, video, images, system, max_tokens, temp, top_p, seed, num_frames, fps, max_frames, dtype,
         video_layout, pool_mode, verbose, debug):
    """Talk about a video and/or images, question after question (one per line; Ctrl-D or "exit" ends).

    The video is decoded and encoded once; each follow-up only computes its own tokens.

    \b
    Example:
      mlx-vidllm chat --video clip.mp4
    """
    from .chat import ChatSession
    from .loading import load

    _check_media(video, images, num_frames, fps)
    interactive = sys.stdin.isatty()
    with _reported(debug):
        m, processor = load(model, dtype=dtype, video_layout=video_layout, pool_mode=pool_mode)
        _blas.warn_if_slow()
        session = ChatSession(m, processor, video=video, images=list(images), num_frames=num_frames, fps=fps,
                              max_frames=max_frames, system=system)
        while True:
            if interactive:
                click.echo("> ", nl=False, err=True)
            line = sys.stdin.readline()
            if not line or line.strip() in ("exit", "quit"):
                break
            if not line.strip():
                continue
            last = None
            try:
                for last in session.ask(line.strip(), max_tokens=max_tokens, temperature=temp, top_p=top_p,
                                        seed=seed):
                    click.echo(last.text, nl=False)
            except KeyboardInterrupt:  # stop this answer, keep the conversation
                click.echo("\n[interrupted]", err=True)
                continue
            click.echo()
            sys.stdout.flush()
            if verbose and last is not None:
                _stats(last)


@main.command(epilog=EXIT_CODES_HELP)
@click.option("--hf-path", required=True, metavar="REPO_OR_DIR",
              help="Source checkpoint: a model folder or a Hugging Face repo id (any format `generate` loads).")
@click.option("--mlx-path", required=True, metavar="OUT", type=click.Path(file_okay=False),
              help="Output folder (built beside it under a hidden .OUT.partial-* name, renamed when complete).")
@click.option("-q", "--quantize", is_flag=True,
              help="Quantize the language decoder's Linear and Embedding layers (4-bit, group 64 by default).")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default=None, help="Bits per weight with -q (default 4).")
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="Quantization group size with -q (default 64). Layers whose input size it does not divide "
                   "stay float and are named in the summary.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="dtype of the float weights (default: the config's dtype / torch_dtype, else as stored).")
@click.option("--quantize-vision", is_flag=True,
              help="With -q, also quantize the vision tower(s) and projector (default: they stay float).")
@click.option("--upload-repo", default=None, metavar="ORG/NAME",
              help="Upload the converted folder to this Hugging Face repo (needs `huggingface-cli login` or HF_TOKEN).")
@click.option("--force", is_flag=True, help="Replace an existing OUT model folder, once the new one is complete.")
@click.option("--vision-weights", default=None, metavar="PATH", type=click.Path(dir_okay=False),
              help="LLaMA-VID only: the EVA-ViT-G weights (eva_vit_g.pth) when neither the checkpoint's shards "
                   "nor an eva_vit_g.pth beside its config.json hold them.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def convert(hf_path, mlx_path, quantize, q_bits, q_group_size, dtype, quantize_vision, upload_repo, force,
            vision_weights, debug):
    """Convert a checkpoint into an MLX model folder, optionally quantized.

    Writes config.json (the source config plus `quantization` and `mlx_vidllm` blocks), safetensors shards
    under mlx-vidllm's module names with model.safetensors.index.json, the tokenizer/processor/chat-template
    files and a README.md model card. An existing OUT is refused without --force (exit code 5).

    \b
    Examples:
      mlx-vidllm convert --hf-path llava-hf/llava-onevision-qwen2-0.5b-ov-hf --mlx-path ov-0.5b
      mlx-vidllm convert --hf-path llava-hf/llava-onevision-qwen2-7b-ov-hf --mlx-path ov-7b-4bit -q
    """
    from .convert import convert as run_convert

    if not quantize:
        for flag, value in (("--q-bits", q_bits), ("--q-group-size", q_group_size),
                            ("--quantize-vision", quantize_vision or None)):
            if value is not None:
                raise click.UsageError(f"{flag} needs -q/--quantize")
    with _reported(debug):
        run_convert(hf_path, mlx_path, quantize=quantize, q_bits=int(q_bits or 4), q_group_size=int(q_group_size or 64),
                    dtype=dtype, quantize_vision=quantize_vision, upload_repo=upload_repo, force=force,
                    vision_weights=vision_weights)


@main.command(epilog=EXIT_CODES_HELP)
@click.option("--model", required=True, metavar="PATH_OR_REPO",
              help="The model to check: the checkpoint the reference was recorded from, or an MLX folder converted "
                   "from it (a quantized one too).")
@click.option("--reference", required=True, metavar="REF.npz", type=click.Path(dir_okay=False),
              help="Reference written by `python -m mlx_vidllm.parity record` (on a machine with torch, e.g. CUDA).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
@click.option("--atol", type=float, default=None,
              help="float32: max |Δ logits| allowed (default 1e-4).")
@click.option("--rtol", type=float, default=None,
              help="Relative error allowed on the logits (half precision default 2e-2; on float32 it replaces "
                   "--atol, e.g. 1e-3 for a full-size model).")
@click.option("--top1", type=float, default=None, help="Top-1 agreement required (half precision default 0.99).")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def verify(model, reference, as_json, atol, rtol, top1, debug):
    """Check the MLX model against a recorded PyTorch reference, stage by stage.

    Runs the model, in the reference's dtype, on the inputs stored in REF.npz (no video file needed) and
    prints max |Δ|, relative error and top-1 agreement for the vision tower output, the merged input
    embeddings and the logits, then the greedy tokens (first diverging step). Exit code 0 within the
    tolerance of the recorded dtype (float32: max |Δ logits| <= 1e-4 and identical greedy tokens; half
    precision: top-1 agreement >= 0.99 and relative error <= 2e-2), 7 outside it; a top-1 or greedy
    disagreement where the reference's own top-2 margin is within the tolerance (a near-tie) is reported,
    not counted. A quantized model is reported, not failed (exit 0): the numbers are its quantization error.

    \b
    Example:
      python -m mlx_vidllm.parity record --model M --video clip.mp4 --prompt "Q?" --out ref.npz --device cuda
      mlx-vidllm verify --model M --reference ref.npz
    """
    from .parity.verify import format_report, report_json, verify_reference

    try:
        report = verify_reference(model, reference, atol=atol, rtol=rtol, top1=top1)
    except KeyboardInterrupt:
        click.echo("\n[interrupted]", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        _fail(e, debug)
    click.echo(report_json(report) if as_json else format_report(report))
    sys.exit(report.exit_code)


if __name__ == "__main__":
    main()
