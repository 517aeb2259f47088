"""Processors: chat template, media preprocessing and placeholder expansion.

`processor(text, images=[...], videos=[...])` takes a prompt that already
contains `<image>` / `<video>` placeholders and returns numpy arrays that
`model(**inputs)` consumes; `format_prompt` builds that text from a plain
question with the checkpoint's chat template.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .errors import InputError, ModelError
from .media import image as imgops

ImageLike = Image.Image | np.ndarray | str | os.PathLike
VideoLike = np.ndarray | str | os.PathLike


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_image(image: ImageLike) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            raise InputError(f"{image}: no such file") from None
        except (OSError, ValueError) as e:
            raise InputError(f"{image}: not a readable image ({e})") from None
    return imgops.to_rgb_array(image)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types here
        raise ModelError(f"{path}: cannot load the tokenizer ({e})") from None


def load_chat_template(path: Path, tokenizer) -> str | None:
    """The chat template as stored by transformers: chat_template.jinja, chat_template.json, or the tokenizer's."""
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").exists():
        return read_json(path / "chat_template.json")["chat_template"]
    return getattr(tokenizer, "chat_template", None)


def eos_token_ids(path: Path, tokenizer) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = path / "generation_config.json"
    if gen.exists():
        eos = read_json(gen).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


@dataclass
class NormalizeConfig:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255

    @classmethod
    def from_preprocessor(cls, pp: dict, where: Path) -> "NormalizeConfig":
        # Never fall back to class defaults: SigLIP (0.5) and CLIP stats differ.
        if "image_mean" not in pp or "image_std" not in pp:
            raise ModelError(f"{where}: preprocessor_config.json has no image_mean/image_std")
        return cls(tuple(pp["image_mean"]), tuple(pp["image_std"]), pp.get("rescale_factor", 1 / 255))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return imgops.normalize(image, self.mean, self.std, self.rescale)


class Processor:
    """Shared by all families: tokenizer, chat template, placeholder expansion."""

    image_token = "<image>"
    video_token = "<video>"
    default_num_frames = 16
    frame_rule = "uniform"

    def __init__(self, tokenizer, chat_template: str | None, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.eos_token_ids = eos_ids

    def check_placeholder_tokens(self) -> None:
        """The tokenizer must map `<image>`/`<video>` to the ids the model's config expects."""
        vocab = self.tokenizer.get_vocab()
        for tok, tid in ((self.image_token, self.image_token_id), (self.video_token, self.video_token_id)):
            if tok not in vocab:
                raise ModelError(f"the tokenizer has no {tok} token (the config expects id {tid})")
            if vocab[tok] != tid:
                raise ModelError(f"the tokenizer maps {tok} to id {vocab[tok]}, the config expects {tid}")

    # --- prompt ---------------------------------------------------------------------------

    def format_prompt(self, question: str, num_images: int = 0, num_videos: int = 0, system: str | None = None,
                      history: Sequence[tuple[str, str]] | None = None) -> str:
        """The checkpoint's chat template applied to `question`, the media placeholders in the first
        user turn; `history` holds earlier (user, assistant) turns of a conversation."""
        if not self.chat_template:
            raise ModelError("the checkpoint has no chat template; pass an already formatted prompt")
        media = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        for i, (user, answer) in enumerate([*(history or []), (question, None)]):
            messages.append({"role": "user", "content": (media if i == 0 else []) + [{"type": "text", "text": user}]})
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    # --- media ----------------------------------------------------------------------------

    def frame_transform(self, image: Image.Image) -> Image.Image:
        """Applied to each frame while decoding so memory does not scale with the source resolution."""
        return image

    def load_video(self, path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None,
                   max_frames: int | None = None) -> np.ndarray:
        from .media.video import load_video

        frames, _, _ = load_video(
            path, num_frames=num_frames or (None if fps else self.default_num_frames), fps=fps,
            max_frames=max_frames, rule=self.frame_rule, transform=self.frame_transform,
        )
        return frames

    def _frames(self, video: VideoLike) -> np.ndarray:
        if isinstance(video, (str, os.PathLike)):
            return self.load_video(video)
        video = np.asarray(video)
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise InputError(f"a video array must be uint8 (T, H, W, 3), got {video.dtype} {video.shape}")
        return video

    # --- text + media -> arrays -------------------------------------------------------------

    def expand(self, text: str, placeholder: str, counts: Sequence[int], token: str) -> str:
        parts = text.split(placeholder)
        if len(parts) - 1 != len(counts):
            raise InputError(
                f"the prompt has {len(parts) - 1} {placeholder} placeholder(s) but {len(counts)} "
                f"{'image' if placeholder == self.image_token else 'video'}(s) were given"
            )
        out = [parts[0]]
        for n, part in zip(counts, parts[1:]):
            out.append(token * n + part)
        return "".join(out)

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text)["input_ids"], dtype=np.int32)[None]

    def __call__(self, text: str, images: Sequence[ImageLike] | None = None,
                 videos: Sequence[VideoLike] | None = None) -> dict[str, Any]:
        raise NotImplementedError
