"""The pipeline in one function: media -> pixels -> vision features ->
merged embeddings -> mlx-lm decoder -> streamed text."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import stream_generate as lm_stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .errors import ContextLengthError


@dataclass
class GenerationResponse:
    text: str  # the new piece of text
    token: int
    prompt_tokens: int
    generation_tokens: int
    media_time: float  # frame decoding + preprocessing, seconds
    vision_time: float  # vision encoder + projector + merge, seconds
    prefill_tps: float  # decoder prompt tokens per second
    time_to_first_token: float  # from the call to the first token, seconds
    generation_tps: float
    peak_memory: float  # GB, MLX allocator peak
    finish_reason: str | None = None


def _context_length(model) -> int | None:
    return model.config.text_config.get("max_position_embeddings")


def _check_context(model, processor, ids: np.ndarray, max_tokens: int, videos: list) -> None:
    limit = _context_length(model)
    if not limit or len(ids) + max_tokens <= limit:
        return
    hint = "use a shorter prompt or fewer --max-tokens"
    per_frame = getattr(processor, "tokens_per_frame", None)
    if videos and per_frame:
        frames = len(videos[0])
        room = limit - max_tokens - (len(ids) - frames * per_frame)
        hint = (f"at most {max(room // per_frame, 0)} frames would fit (--num-frames), "
                f"or lower --max-tokens")
    raise ContextLengthError(
        f"prompt is {len(ids)} tokens with the visual tokens, plus {max_tokens} to generate: more than the "
        f"model's context of {limit}; {hint}"
    )


def stream_generate(
    model,
    processor,
    prompt: str,
    video: str | os.PathLike | np.ndarray | None = None,
    images: Sequence | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    system: str | None = None,
    chat_template: bool = True,
) -> Iterator[GenerationResponse]:
    """Answer `prompt` about a video and/or images, yielding text as tokens arrive.

    `prompt` is the user's question; the checkpoint's chat template wraps it (pass
    `chat_template=False` for a prompt that is already formatted with placeholders).
    """
    start = time.perf_counter()
    if seed is not None:
        mx.random.seed(seed)
    images = list(images or [])
    videos = []
    if video is not None:
        if isinstance(video, (str, os.PathLike)):
            video = processor.load_video(video, num_frames=num_frames, fps=fps, max_frames=max_frames)
        videos.append(video)
    text = (processor.format_prompt(prompt, len(images), len(videos), system) if chat_template else prompt)
    # Processors whose visual tokens depend on the question (LLaMA-VID's QFormer) also get the bare question.
    guided = {"question": prompt} if chat_template and getattr(processor, "takes_question", False) else {}
    inputs = processor(text, images=images, videos=videos, **guided)
    ids = inputs["input_ids"][0]
    _check_context(model, processor, ids, max_tokens, videos)
    media_done = time.perf_counter()

    embeds = model.get_input_embeddings(**inputs)
    mx.eval(embeds)
    vision_done = time.perf_counter()

    tokenizer = TokenizerWrapper(processor.tokenizer, eos_token_ids=processor.eos_token_ids)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    first = None
    for r in lm_stream_generate(model.language_model, tokenizer, mx.array(ids), max_tokens=max_tokens,
                                sampler=sampler, input_embeddings=embeds):
        first = first or time.perf_counter()
        yield GenerationResponse(
            text=r.text, token=r.token, prompt_tokens=r.prompt_tokens, generation_tokens=r.generation_tokens,
            media_time=media_done - start, vision_time=vision_done - media_done, prefill_tps=r.prompt_tps,
            time_to_first_token=first - start, generation_tps=r.generation_tps, peak_memory=r.peak_memory,
            finish_reason=r.finish_reason,
        )


def generate(model, processor, prompt: str, video=None, images=None, verbose: bool = False, **kwargs) -> str:
    """Like `stream_generate`, returning the whole answer."""
    pieces = []
    for r in stream_generate(model, processor, prompt, video=video, images=images, **kwargs):
        pieces.append(r.text)
        if verbose:
            print(r.text, end="", flush=True)
    if verbose:
        print()
    return "".join(pieces)
