"""Command line: argument parsing and error reporting only; the work is in generate/loading."""

from __future__ import annotations

import sys
import traceback
import warnings

import click

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


def _short_warnings() -> None:
    """Warnings as one line each on stderr, without the source line."""
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"


@click.group(help=f"Video-language models on Apple Silicon with MLX.\n\n{EXIT_CODES_HELP}")
@click.version_option(package_name="mlx-vidllm")
def main() -> None:
    _short_warnings()


@main.command(epilog=EXIT_CODES_HELP)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model folder or Hugging Face repo id.")
@click.option("--video", type=click.Path(dir_okay=True), help="Video file to ask about.")
@click.option("--image", "images", multiple=True, type=click.Path(), help="Image file (repeat for several).")
@click.option("--prompt", required=True, help="Your question (the chat template is applied for you).")
@click.option("--system", default=None, help="Optional system message.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--seed", default=None, type=int, help="Random seed for sampling.")
@click.option("--num-frames", default=None, type=click.IntRange(min=1),
              help="Frames sampled uniformly over the whole video (default: the model's own rule, 16 for OneVision).")
@click.option("--fps", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Sample at this rate instead of a fixed count.")
@click.option("--max-frames", default=None, type=click.IntRange(min=1), help="Cap on frames with --fps.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Cast the weights (default: as stored).")
@click.option("--verbose", is_flag=True, help="Print timing and memory statistics to stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def generate(model, video, images, prompt, system, max_tokens, temp, top_p, seed, num_frames, fps, max_frames,
             dtype, verbose, debug):
    """Ask a question about a video and/or images; the answer streams to stdout.

    \b
    Example:
      mlx-vidllm generate --video clip.mp4 --prompt "What happens in this video?"
    """
    from .generate import stream_generate
    from .loading import load

    if video is None and not images:
        raise click.UsageError("give --video FILE and/or --image FILE")
    if num_frames and fps:
        raise click.UsageError("--num-frames and --fps are alternatives; give one")
    last = None
    try:
        m, processor = load(model, dtype=dtype)
        for last in stream_generate(m, processor, prompt, video=video, images=list(images), max_tokens=max_tokens,
                                    temperature=temp, top_p=top_p, seed=seed, num_frames=num_frames, fps=fps,
                                    max_frames=max_frames, system=system):
            click.echo(last.text, nl=False)
        click.echo()
        sys.stdout.flush()  # the answer before the statistics on a shared terminal
    except KeyboardInterrupt:
        click.echo("\n[interrupted]", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        _fail(e, debug)
    if verbose and last is not None:
        click.echo(
            f"prompt tokens: {last.prompt_tokens}, media: {last.media_time:.2f} s, vision: {last.vision_time:.2f} s, "
            f"prefill: {last.prefill_tps:.1f} tok/s, time to first token: {last.time_to_first_token:.2f} s\n"
            f"generated {last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s, "
            f"peak memory {last.peak_memory:.2f} GB",
            err=True,
        )


if __name__ == "__main__":
    main()
