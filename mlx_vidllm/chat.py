"""Multi-turn chat about one video (and/or images), with the expensive work done once.

A second question on the same video costs only its own tokens:
- the encoded media (vision features) are cached in memory, keyed by the file's
  content digest, the model and the sampling settings (never by path alone, so a
  changed file is re-encoded);
- the decoder's KV cache of the longest prompt prefix already computed is reused
  (the conversation so far within a session; the system prompt + media across
  sessions on the same media).
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import stream_generate as lm_stream_generate
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .generate import GenerationResponse, _check_context

CACHE_ENTRIES = 4  # encoded videos kept per process


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def media_key(model, video, images, settings: tuple) -> tuple | None:
    """Identity of the encoded media: content digests + model + sampling settings. None: don't cache."""
    parts = []
    for item in ([video] if video is not None else []) + list(images):
        if isinstance(item, (str, os.PathLike)):
            parts.append(file_digest(item))
        elif isinstance(item, np.ndarray):
            parts.append(hashlib.sha256(np.ascontiguousarray(item).tobytes()).hexdigest())
        else:
            return None  # PIL images etc.: not worth hashing
    return (id(model), tuple(parts), settings)


@dataclass
class _Entry:
    model: "weakref.ref"  # id(model) in the key can be reused by another model once this one is gone
    frames: np.ndarray | None
    media_rows: mx.array | None = None  # features at the placeholder positions, in order
    prefix_ids: np.ndarray | None = None  # prompt prefix (through the last media token) and its KV
    prefix_cache: list | None = None


_ENTRIES: "OrderedDict[tuple, _Entry]" = OrderedDict()


def _remember(key, entry: _Entry) -> None:
    _ENTRIES[key] = entry
    _ENTRIES.move_to_end(key)
    while len(_ENTRIES) > CACHE_ENTRIES:
        _ENTRIES.popitem(last=False)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


@dataclass
class ChatSession:
    """`session = ChatSession(model, processor, video="clip.mp4")`; `for r in session.ask("..."): ...`"""

    model: object
    processor: object
    video: str | os.PathLike | np.ndarray | None = None
    images: Sequence = ()
    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    system: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.images = list(self.images)
        # Families whose visual tokens depend on the question (LLaMA-VID) cannot reuse them.
        self._reusable = not getattr(self.processor, "question_dependent_media", False)
        settings = (self.num_frames, self.fps, self.max_frames, getattr(self.processor, "cache_settings", None))
        self._key = media_key(self.model, self.video, self.images, settings) if self._reusable else None
        self._entry = _ENTRIES.get(self._key) if self._key else None
        if self._entry is not None and self._entry.model() is not self.model:
            del _ENTRIES[self._key]  # a stale entry of a model that no longer exists
            self._entry = None
        self._ids = np.zeros(0, np.int32)  # tokens whose KV is in self._cache
        self._cache = None
        if self._entry and self._entry.prefix_cache is not None:
            self._ids = self._entry.prefix_ids
            self._cache = copy.deepcopy(self._entry.prefix_cache)

    def _frames(self):
        if self.video is None:
            return []
        if self._entry is not None and self._entry.frames is not None:
            return [self._entry.frames]
        video = self.video
        if isinstance(video, (str, os.PathLike)):
            video = self.processor.load_video(video, num_frames=self.num_frames, fps=self.fps,
                                              max_frames=self.max_frames)
        if self._key:
            self._entry = _Entry(model=weakref.ref(self.model), frames=video)
            _remember(self._key, self._entry)
        return [video]

    def _media_ids(self) -> set[int]:
        p = self.processor
        return {i for i in (getattr(p, "image_token_id", None), getattr(p, "video_token_id", None)) if i is not None}

    def _embeddings(self, inputs: dict) -> mx.array:
        """Prompt embeddings; the media features come from the cache when this media was encoded before."""
        ids = inputs["input_ids"][0]
        media = np.isin(ids, list(self._media_ids()))
        entry = self._entry
        if entry is not None and entry.media_rows is not None and int(media.sum()) == entry.media_rows.shape[0]:
            embeds = self.model.language_model.model.embed_tokens(mx.array(ids))
            embeds[mx.array(np.flatnonzero(media))] = entry.media_rows.astype(embeds.dtype)
            return embeds
        embeds = self.model.get_input_embeddings(**inputs)
        if entry is not None and media.any():
            entry.media_rows = embeds[mx.array(np.flatnonzero(media))]
            mx.eval(entry.media_rows)
        return embeds

    def ask(self, question: str, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None) -> Iterator[GenerationResponse]:
        start = time.perf_counter()
        if seed is not None:
            mx.random.seed(seed)
        p, model = self.processor, self.model
        frames = self._frames()
        text = p.format_prompt(question, len(self.images), len(frames), self.system, history=self.history)
        inputs = p(text, images=self.images, videos=frames)
        ids = inputs["input_ids"][0]
        _check_context(model, p, ids, max_tokens, frames)
        media_done = time.perf_counter()
        embeds = self._embeddings(inputs)
        mx.eval(embeds)
        vision_done = time.perf_counter()

        if self._cache is not None and self._cache[0].offset != len(self._ids):
            self._cache, self._ids = None, np.zeros(0, np.int32)  # an interrupted answer: start clean
        # Reuse the KV of the longest prefix already computed; keep at least one token to prefill.
        keep = min(_common_prefix(self._ids, ids), len(ids) - 1) if self._cache is not None else 0
        if self._cache is None or keep == 0:
            self._cache = make_prompt_cache(model.language_model)
            keep = 0
        elif len(self._ids) > keep:
            trim_prompt_cache(self._cache, len(self._ids) - keep)

        tokenizer = TokenizerWrapper(p.tokenizer, eos_token_ids=p.eos_token_ids)
        sampled, pieces, first = [], [], None
        for r in lm_stream_generate(model.language_model, tokenizer, mx.array(ids[keep:]), max_tokens=max_tokens,
                                    sampler=make_sampler(temp=temperature, top_p=top_p),
                                    input_embeddings=embeds[keep:], prompt_cache=self._cache):
            first = first or time.perf_counter()
            sampled.append(r.token)
            pieces.append(r.text)
            yield GenerationResponse(
                text=r.text, token=r.token, prompt_tokens=len(ids), generation_tokens=r.generation_tokens,
                media_time=media_done - start, vision_time=vision_done - media_done, prefill_tps=r.prompt_tps,
                time_to_first_token=first - start, generation_tps=r.generation_tps, peak_memory=r.peak_memory,
                finish_reason=r.finish_reason,
            )
        # The cache holds the prompt and the answer tokens fed back so far, in order.
        fed = self._cache[0].offset
        self._ids = np.concatenate([ids, np.asarray(sampled, np.int32)])[:fed]
        self.history.append((question, "".join(pieces)))
        self._share_media_prefix(ids)

    def _share_media_prefix(self, ids: np.ndarray) -> None:
        """Once per media: keep a copy of the KV through the last media token, so that a new conversation
        about the same media starts from it."""
        entry = self._entry
        if entry is None or entry.prefix_cache is not None:
            return
        media = np.flatnonzero(np.isin(ids, list(self._media_ids())))
        n = int(media[-1]) + 1 if len(media) else 0
        if n == 0 or self._cache[0].offset < n:
            return
        cache = copy.deepcopy(self._cache)
        trim_prompt_cache(cache, cache[0].offset - n)
        entry.prefix_ids, entry.prefix_cache = ids[:n].copy(), cache
