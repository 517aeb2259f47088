"""Video-LLaVA: two CLIP ViT-L/14 towers -> one mlp2x_gelu projector -> Llama/Vicuna (mlx-lm).

Images go through `image_tower` and drop CLS (256 tokens at 224/14); video
frames go through `video_tower`, are encoded one by one and keep CLS
(257 tokens per frame, 2056 for the 8 frames the model was trained on).
The towers have the same shape but separate weights. This follows the
transformers port (LanguageBind/Video-LLaVA-7B-hf), which runs the video tower
as plain CLIP: the original checkpoint's temporal attention is not part of it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from ..errors import ModelError
from ..media import image as imgops
from ..processing import (ImageLike, NormalizeConfig, Processor, VideoLike, eos_token_ids, load_chat_template,
                          load_image, load_tokenizer, read_json)
from .blocks import LlavaModel, MLPProjector, merge_placeholders
from .clip import CLIPVisionConfig, CLIPVisionModel
from .decoder import build_decoder, warn_unused_keys

# How many frames/images go through a vision tower at once: bounds memory on long videos.
VISION_CHUNK = 16

# transformers' class defaults. They apply to every key a config.json leaves out, and the Hub's
# Video-LLaVA-7B-hf config.json stores only the values that differ from them (its text_config has
# no hidden_size, rope_theta or tie_word_embeddings; its vision_config no hidden_act or image_size).
CLIP_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
    patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu",
)
LLAMA_DEFAULTS = dict(
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
)
# vision_config keys that change nothing here (CLIP's text/projection heads are not part of a tower).
IGNORED_VISION_KEYS = {"projection_dim", "vocab_size", "attention_dropout", "dropout", "model_type"}


def _text_config(text_config: dict | None) -> dict:
    """A complete Llama text_config: explicit values win over LlamaConfig's defaults."""
    cfg = dict(text_config or {})
    if cfg.get("model_type", "llama") != "llama":
        return cfg  # another mlx-lm decoder: its own defaults apply
    cfg = {**LLAMA_DEFAULTS, **cfg}
    if "rope_theta" not in cfg and "rope_theta" not in (cfg.get("rope_parameters") or {}):
        cfg["rope_theta"] = 10000.0
    if cfg.get("num_key_value_heads") is None:  # LlamaConfig: no GQA unless stated
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return cfg


@dataclass
class VideoLlavaConfig:
    vision: CLIPVisionConfig
    text_config: dict
    image_token_id: int = 32000
    video_token_id: int = 32001
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, config: dict) -> "VideoLlavaConfig":
        """Read a transformers VideoLlavaConfig dict (Hub v4 style or as saved by transformers 5)."""
        vision_keys = {f.name for f in fields(CLIPVisionConfig)}
        vc = config.get("vision_config")
        if vc is None:  # VideoLlavaConfig's own default: ViT-L/14@224
            vision = CLIPVisionConfig()
        else:
            warn_unused_keys("vision_config", vc, vision_keys | IGNORED_VISION_KEYS)
            if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
                raise ValueError(f"vision_config.model_type={vc['model_type']!r}: only CLIP towers are supported")
            vision = CLIPVisionConfig(**{**CLIP_VISION_DEFAULTS, **{k: v for k, v in vc.items() if k in vision_keys}})
        layer = config.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: only a single layer is supported")
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={strategy!r}: expected 'default' or 'full'")
        if config.get("multimodal_projector_bias", True) is not True:
            raise ValueError("multimodal_projector_bias=False is not supported")
        text = _text_config(config.get("text_config"))
        used = {
            "vision_config", "text_config", "image_token_index", "image_token_id", "video_token_index",
            "video_token_id", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
            "multimodal_projector_bias", "tie_word_embeddings", "image_seq_length", "video_seq_length",
            "ignore_index",  # training only
            "vocab_size",  # v4 configs repeat text_config.vocab_size at the top
        }
        warn_unused_keys("config", config, used)
        tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return cls(
            vision=vision,
            text_config=text,
            image_token_id=config.get("image_token_id", config.get("image_token_index", 32000)),
            video_token_id=config.get("video_token_id", config.get("video_token_index", 32001)),
            vision_feature_layer=layer,
            vision_feature_select_strategy=strategy,
            projector_hidden_act=config.get("projector_hidden_act", "gelu"),
            tie_word_embeddings=bool(tie),
        )

    @property
    def image_tokens(self) -> int:
        """Tokens per image: the patch grid, plus CLS only with the "full" strategy."""
        return self.vision.grid**2 + (self.vision_feature_select_strategy == "full")

    @property
    def frame_tokens(self) -> int:
        """Tokens per video frame: the video path never drops CLS."""
        return self.vision.grid**2 + 1


class Model(LlavaModel):
    def __init__(self, config: VideoLlavaConfig):
        super().__init__()
        self.config = config
        self.image_tower = CLIPVisionModel(config.vision, config.vision_feature_layer)
        self.video_tower = CLIPVisionModel(config.vision, config.vision_feature_layer)
        self.multi_modal_projector = MLPProjector(
            config.vision.hidden_size, config.text_config["hidden_size"], config.projector_hidden_act
        )
        self.language_model = build_decoder(config.text_config, config.tie_word_embeddings)

    # --- vision -> projected tokens ----------------------------------------------------

    def encode(self, tower: CLIPVisionModel, pixels: mx.array, drop_cls: bool) -> mx.array:
        """(N, S, S, 3) -> projected features (N, tokens, D), in chunks of VISION_CHUNK frames."""
        out = []
        for i in range(0, pixels.shape[0], VISION_CHUNK):
            feats = tower(pixels[i:i + VISION_CHUNK])
            feats = self.multi_modal_projector(feats[:, 1:] if drop_cls else feats)
            mx.eval(feats)
            out.append(feats)
        return mx.concatenate(out) if len(out) > 1 else out[0]

    def image_features(self, pixel_values: mx.array) -> mx.array:
        """(N, S, S, 3) -> (N * image_tokens, D), images in prompt order."""
        drop = self.config.vision_feature_select_strategy == "default"
        feats = self.encode(self.image_tower, pixel_values, drop_cls=drop)
        return feats.reshape(-1, feats.shape[-1])

    def video_features(self, frames: mx.array) -> mx.array:
        """(T, S, S, 3) -> (T * (grid*grid + 1), D): frames in time order, each [CLS, patches]."""
        feats = self.encode(self.video_tower, frames, drop_cls=False)
        return feats.reshape(-1, feats.shape[-1])

    # --- merge and decode ----------------------------------------------------------------

    def get_input_embeddings(
        self,
        input_ids: mx.array | np.ndarray,
        pixel_values: mx.array | np.ndarray | None = None,
        pixel_values_videos: Sequence | mx.array | np.ndarray | None = None,
        **unused,
    ) -> mx.array:
        """Text embeddings with every placeholder replaced by its visual features: (L, D)."""
        ids = np.asarray(input_ids).reshape(-1)
        embeds = self.language_model.model.embed_tokens(mx.array(ids))
        if pixel_values is not None and len(pixel_values):
            feats = self.image_features(mx.array(pixel_values))
            embeds = merge_placeholders(embeds, ids, self.config.image_token_id, feats, "image")
        if pixel_values_videos is not None and len(pixel_values_videos):
            videos = [self.video_features(mx.array(v)) for v in pixel_values_videos]
            embeds = merge_placeholders(embeds, ids, self.config.video_token_id, mx.concatenate(videos), "video")
        return embeds


class VideoLlavaProcessor(Processor):
    """Video-LLaVA: CLIP preprocessing (shortest edge, center crop) for images and frames, 8 frames."""

    default_num_frames = 8  # the model was trained on exactly 8 frames per video
    frame_rule = "arange"  # the -hf rule: np.arange(0, N, N / 8).astype(int)

    def __init__(self, tokenizer, chat_template: str | None, eos_ids: set[int], model_config: VideoLlavaConfig,
                 norm: NormalizeConfig, size: dict, crop: tuple[int, int] | None, resample: int):
        super().__init__(tokenizer, chat_template, eos_ids)
        self.config = model_config
        self.norm = norm
        self.size = size  # {"shortest_edge": s} or {"height": h, "width": w}; {} = no resize
        self.crop = crop  # (h, w) or None
        self.resample = Image.Resampling(resample)
        self.image_token_id = model_config.image_token_id
        self.video_token_id = model_config.video_token_id
        self.check_placeholder_tokens()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model_config: VideoLlavaConfig) -> "VideoLlavaProcessor":
        path = Path(path)
        pp_file = path / "preprocessor_config.json"
        if not pp_file.exists():
            raise ModelError(f"{path}: preprocessor_config.json is missing")
        pp = read_json(pp_file)
        size = pp.get("size", {"shortest_edge": 224}) if pp.get("do_resize", True) else {}
        if isinstance(size, int):  # very old configs store a bare int
            size = {"shortest_edge": size}
        crop = None
        if pp.get("do_center_crop", True):
            c = pp.get("crop_size", {"height": 224, "width": 224})
            crop = (c, c) if isinstance(c, int) else (c["height"], c["width"])
        S = model_config.vision.image_size
        out = crop or (size.get("height"), size.get("width"))
        if tuple(out) != (S, S):  # the tower's position embedding fixes the input size
            raise ModelError(f"{pp_file}: crop_size/size give {out[0]}x{out[1]} images, the vision tower "
                             f"expects {S}x{S}")
        tokenizer = load_tokenizer(path)
        return cls(tokenizer, load_chat_template(path, tokenizer), eos_token_ids(path, tokenizer), model_config,
                   NormalizeConfig.from_preprocessor(pp, path), size, crop, pp.get("resample", 3))

    # --- pixels ---------------------------------------------------------------------------

    def _resize(self, image: np.ndarray) -> np.ndarray:
        if "shortest_edge" in self.size:
            return imgops.resize_shortest_edge(image, self.size["shortest_edge"], self.resample)
        if "height" in self.size:
            return imgops.resize(image, self.size["height"], self.size["width"], self.resample)
        return image

    def frame_transform(self, image: Image.Image) -> Image.Image:
        # Only the resize: frames stay small while decoding, and it is a no-op when preprocessed again.
        return Image.fromarray(self._resize(np.asarray(image.convert("RGB"))))

    def preprocess_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (S, S, 3): resize, center crop, rescale, normalize."""
        image = self._resize(image)
        if self.crop is not None:
            image = imgops.center_crop(image, *self.crop)
        return self.norm(image)

    def preprocess_video(self, frames: np.ndarray) -> np.ndarray:
        return np.stack([self.preprocess_image(f) for f in frames])

    def load_video(self, path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None,
                   max_frames: int | None = None) -> np.ndarray:
        n = self.default_num_frames
        if fps is not None or (num_frames is not None and num_frames != n):
            asked = f"fps={fps}" if fps is not None else f"{num_frames} frames"
            warnings.warn(f"Video-LLaVA was trained on exactly {n} frames per video; {asked} may give worse answers",
                          stacklevel=2)
        return super().load_video(path, num_frames=num_frames, fps=fps, max_frames=max_frames)

    def video_token_count(self, num_frames: int) -> int:
        return num_frames * self.config.frame_tokens

    # --- prompt ---------------------------------------------------------------------------

    def format_prompt(self, question: str, num_images: int = 0, num_videos: int = 0, system: str | None = None,
                      history: Sequence[tuple[str, str]] | None = None) -> str:
        """The prompt for `question`, with the media placeholders in the first user turn.

        `history` holds earlier (user, assistant) turns. The checkpoint's chat template is used when it
        has one; otherwise Video-LLaVA's training format (LLaVA "v1" conversation, no system prompt
        unless given): `USER: <image>\\n<video>\\n{question} ASSISTANT:`, earlier answers ending in `</s>`.
        """
        turns = list(history or []) + [(question, None)]
        media = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
        if self.chat_template:
            messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
            for i, (user, answer) in enumerate(turns):
                content = (media if i == 0 else []) + [{"type": "text", "text": user}]
                messages.append({"role": "user", "content": content})
                if answer is not None:
                    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
        text = [f"{system} "] if system else []
        for i, (user, answer) in enumerate(turns):
            if i == 0:  # images before videos, like the transformers templates
                user = f"{self.image_token}\n" * num_images + f"{self.video_token}\n" * num_videos + user
            text.append(f"USER: {user} ASSISTANT:")
            if answer is not None:
                text.append(f" {answer}{self.tokenizer.eos_token or '</s>'}")
        return "".join(text)

    # --- text + media -> arrays -------------------------------------------------------------

    def __call__(self, text: str, images: Sequence[ImageLike] | None = None,
                 videos: Sequence[VideoLike] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        images = [load_image(i) for i in images or []]
        if images:
            out["pixel_values"] = np.stack([self.preprocess_image(i) for i in images])
        text = self.expand(text, self.image_token, [self.config.image_tokens] * len(images), self.image_token)
        pix = [self.preprocess_video(self._frames(v)) for v in videos or []]
        if pix:
            out["pixel_values_videos"] = pix
        text = self.expand(text, self.video_token, [self.video_token_count(len(p)) for p in pix], self.video_token)
        # The Llama tokenizer adds BOS itself, as it does in transformers' VideoLlavaProcessor.
        out["input_ids"] = self.tokenize(text)
        return out
