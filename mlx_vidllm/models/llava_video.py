"""LLaVA-Video (lmms-lab/LLaVA-Video-7B-Qwen2): the OneVision architecture trained for video.

What differs from LLaVA-OneVision (see onevision.py for the shared model):

* Token layout: "grid" by default, a newline after every pooled row of every frame
  (p*(p+1)*T, 210*T for the real 27x27 tower), pooled per `mm_spatial_pool_mode`.
* Frames: 64 by default, `linspace(0, N-1, 64)` (force_sample), else 1 fps capped at 64.
* A time instruction in the prompt (`add_time_instruction`), placed as in training:
  `<video>\\n{instruction}\\n{question}`; the qwen_1_5 system prompt "You are a helpful assistant.".
  The frames `processor.load_video` returns carry their sampling (`SampledFrames.sampling`), and
  `processor(text, videos=[frames])` writes the instruction after the `<video>` placeholder, so it is the
  same in every turn of a chat and wherever the frames are cached.
* Two checkpoint formats:
  - the original LLaVA-NeXT one (`LlavaQwenForCausalLM`: Qwen2 fields at the top level, `mm_*` fields,
    `model.mm_projector.*` / `model.vision_tower.vision_tower.*` keys, a tokenizer without `<image>`);
    the SigLIP geometry comes from `mm_vision_tower` (see `resolve_vision_tower`);
  - the transformers one (a `llava_onevision` config). Such a folder is told apart from a OneVision
    one only by the LLaVA-Video fields a converter kept in config.json (`add_time_instruction`,
    `force_sample`, `mm_newline_position`): the weights, shapes and processor files are those of
    OneVision-7B. Without them it loads as OneVision; `load(path, video_layout="grid")` then gives
    the trained layout.

Placeholders in the original format: the tokenizer has no `<image>` / `<video>` token, so the prompt is
split at the placeholder texts and every piece is tokenized on its own, exactly like LLaVA-NeXT's
`tokenizer_image_token` does around its -200 sentinel. Instead of a negative sentinel the placeholders get
the first ids past the tokenizer's vocabulary (len(tokenizer), len(tokenizer)+1): these are the ids the
transformers conversion gives `<image>` / `<video>` (151646 / 151647 for Qwen2), so both formats produce
identical input_ids, and they index padded (untrained) rows of the embedding matrix, which the visual
features overwrite, so the embedding lookup needs no special case.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from ..errors import ModelError
from ..processing import (ImageLike, NormalizeConfig, Processor, VideoLike, eos_token_ids, load_chat_template,
                          load_tokenizer, read_json)
from .blocks import sanitize_llava
from .decoder import DECODER_KEYS, build_decoder, warn_unused_keys
from .onevision import Model as OneVisionModel
from .onevision import ONEVISION_CONFIG_KEYS, OneVisionConfig, OneVisionProcessor, check_video_options
from .siglip import SiglipConfig

DEFAULT_SYSTEM = "You are a helpful assistant."  # LLaVA-NeXT conv template qwen_1_5
MAX_FRAMES = 64  # "This model supports at most 64 frames"
TIME_INSTRUCTION = (
    "The video lasts for {video_time:.2f} seconds, and {num_frames} frames are uniformly sampled from it. "
    "These frames are located at {frame_time}.Please answer the following questions related to this video."
)
# "training": <video>\n{instr}\n{question} (llava/train/train.py, lmms-eval); "model_card": <video>{instr}\n{question}
PLACEMENTS = ("training", "model_card")


# --- SigLIP towers ----------------------------------------------------------------------------------------------

# transformers' SiglipVisionConfig defaults: what a tower config.json that leaves a field out means.
SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
                       hidden_act="gelu_pytorch_tanh")

# Released towers, so that loading needs no network (the full towers; the checkpoints store one layer less).
KNOWN_TOWERS: dict[str, dict] = {
    "google/siglip-so400m-patch14-384": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                             num_attention_heads=16, image_size=384, patch_size=14,
                                             num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
}


def siglip_config_from_json(cfg: dict, where: str) -> SiglipConfig:
    """A SigLIP tower config.json, flat (`siglip_vision_model`) or Google-style (`siglip`, nested `vision_config`)."""
    if isinstance(cfg.get("vision_config"), dict):
        cfg = cfg["vision_config"]
    model_type = cfg.get("model_type", "siglip_vision_model")
    if model_type not in ("siglip_vision_model", "siglip"):
        raise ModelError(f"{where}: model_type {model_type!r} is not a SigLIP vision tower (only SigLIP is supported)")
    return SiglipConfig(**{k: cfg.get(k, v) for k, v in SIGLIP_DEFAULTS.items()})


def resolve_vision_tower(name: str) -> tuple[SiglipConfig, str]:
    """Geometry of the full `mm_vision_tower`, and where it came from ("local" | "table" | "hub").

    (a) a local folder with a SigLIP config.json, else (b) a built-in table of released towers,
    else (c) the tower's config.json from the Hugging Face Hub."""
    path = Path(str(name)).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelError(f"mm_vision_tower {name}: the folder has no config.json")
        return siglip_config_from_json(read_json(cfg_file), str(cfg_file)), "local"
    if name in KNOWN_TOWERS:
        return SiglipConfig(**KNOWN_TOWERS[name]), "table"
    if str(name).startswith((".", "/", "~")) or str(name).count("/") != 1:
        raise ModelError(f"mm_vision_tower {name!r}: no such folder, and not a Hub repo id or a known tower "
                         f"({', '.join(KNOWN_TOWERS)})")
    try:
        from huggingface_hub import hf_hub_download

        cfg_file = hf_hub_download(str(name), "config.json")
    except Exception as e:  # offline, missing repo, auth: all end the same way
        raise ModelError(
            f"mm_vision_tower {name!r} is not a local folder nor a built-in tower, and its config.json cannot be "
            f"downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); point mm_vision_tower in "
            f"config.json at a folder holding the tower's config.json"
        ) from None
    return siglip_config_from_json(read_json(Path(cfg_file)), cfg_file), "hub"


def parse_pinpoints(value, tile: int) -> list[list[int]]:
    """LLaVA-NeXT `image_grid_pinpoints` ((W, H) pairs, or a "(1x1),...,(6x6)" range of tiles) -> (H, W) pairs."""
    if isinstance(value, str):
        matches = re.findall(r"\((\d+)x(\d+)\)", value)
        if not matches:
            raise ModelError(f"image_grid_pinpoints {value!r}: expected a range like '(1x1),...,(6x6)'")
        (a0, b0), (a1, b1) = (tuple(map(int, m)) for m in (matches[0], matches[-1]))
        pairs = [(i * tile, j * tile) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    elif isinstance(value, (list, tuple)) and value:
        pairs = [tuple(int(v) for v in p) for p in value]
    else:
        raise ModelError(f"image_grid_pinpoints {value!r}: anyres needs a list of (width, height) resolutions")
    return [[h, w] for w, h in pairs]  # the original code reads (width, height); ours are (height, width)


# --- config -----------------------------------------------------------------------------------------------------

# Original LLaVA-NeXT config.json fields that change nothing at inference (training options, bookkeeping).
ORIGINAL_HARMLESS_KEYS = {
    "mm_projector_lr", "mm_vision_tower_lr", "mm_tunable_parts", "mm_use_im_patch_token", "mm_vision_select_feature",
    "mm_resampler_type", "mm_mask_drop_mode", "mm_mask_drop_skip_percentage", "mm_mask_drop_ratio",
    "mm_mask_drop_ratio_upper", "mm_mask_drop_ratio_lower", "mm_perceiver_depth", "mm_perceiver_latents",
    "mm_perceiver_ff_mult", "mm_perceiver_pretrained", "mm_qformer_depth", "mm_qformer_latents",
    "mm_qformer_pretrained", "mm_spatial_pool_out_channels", "mm_pooling_position", "use_mm_proj",
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "tune_mm_vision_resampler",
    "vision_tower_pretrained", "mm_vision_tower_pretrained", "tokenizer_model_max_length", "tokenizer_padding_side",
    "image_crop_resolution", "image_split_resolution", "faster_token_stride", "frames_upbound", "pos_skipping_range",
    "use_pos_skipping", "delay_load", "max_sequence_length", "attn_implementation", "_attn_implementation",
}
# Fields this module reads (the original format).
ORIGINAL_USED_KEYS = {
    "mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer", "mm_use_im_start_end",
    "mm_patch_merge_type", "mm_newline_position", "mm_spatial_pool_mode", "mm_spatial_pool_stride",
    "image_aspect_ratio", "image_grid_pinpoints", "add_time_instruction", "force_sample", "add_faster_video",
}


@dataclass
class LlavaVideoConfig(OneVisionConfig):
    checkpoint_format: str = "transformers"  # or "llava-next-original"
    video_layout: str = "grid"
    add_time_instruction: bool = True
    force_sample: bool = True
    max_frames: int = MAX_FRAMES
    instruction_placement: str = "training"
    system_prompt: str = DEFAULT_SYSTEM
    vision_tower_source: str = ""  # original format: "local" | "table" | "hub"
    config_vocab_size: int | None = None  # what config.json says; the stored embedding rows win

    @classmethod
    def from_hf(cls, config: dict) -> "LlavaVideoConfig":
        """A transformers `llava_onevision` config that carries LLaVA-Video fields."""
        # the LLaVA-Video fields on top of what the OneVision parser reads (image_grid_pinpoints is in both)
        extra = {k: config[k] for k in config
                 if k in ORIGINAL_USED_KEYS | ORIGINAL_HARMLESS_KEYS and k not in ONEVISION_CONFIG_KEYS}
        base = super().from_hf({k: v for k, v in config.items() if k not in extra})
        out = replace(base, **_video_options(extra, default_layout="grid"))
        out.config_vocab_size = out.text_config.get("vocab_size")
        return out

    @classmethod
    def from_original(cls, config: dict) -> "LlavaVideoConfig":
        """An original LLaVA-NeXT `LlavaQwenForCausalLM` config.json."""
        if "mm_vision_tower" not in config:
            raise ModelError("not an original LLaVA-NeXT config: mm_vision_tower is missing")
        vision, source = resolve_vision_tower(config["mm_vision_tower"])
        if config.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
            raise ModelError(f"mm_hidden_size={config['mm_hidden_size']} but the tower "
                             f"{config['mm_vision_tower']} has hidden_size {vision.hidden_size}")
        projector = config.get("mm_projector_type", "linear")
        if projector != "mlp2x_gelu":
            raise ModelError(f"mm_projector_type={projector!r} is not supported (only mlp2x_gelu)")
        if config.get("mm_use_im_start_end"):
            raise ModelError("mm_use_im_start_end=true is not supported")
        if config.get("mm_resampler_type") not in (None, "", "identity"):
            raise ModelError(f"mm_resampler_type={config['mm_resampler_type']!r} is not supported")
        merge = config.get("mm_patch_merge_type", "flat")
        if not (merge.startswith("spatial") and "unpad" in merge):
            raise ModelError(f"mm_patch_merge_type={merge!r} is not supported (only spatial_unpad)")
        aspect = config.get("image_aspect_ratio", "square")
        if not re.fullmatch(r"anyres_max_\d+", str(aspect)):
            raise ModelError(f"image_aspect_ratio={aspect!r} is not supported (only anyres_max_N)")
        select = config.get("mm_vision_select_layer", -2)
        if select != -2:
            warnings.warn(f"config.json: mm_vision_select_layer={select} is ignored, as by LLaVA-NeXT's SigLIP tower "
                          f"(it drops the tower's last layer and uses the output of the one before)", stacklevel=3)
        if config.get("mm_vision_select_feature", "patch") not in ("patch", "full", "cls_patch"):
            warnings.warn(f"config.json: mm_vision_select_feature={config['mm_vision_select_feature']!r} is ignored "
                          f"(SigLIP has no CLS token)", stacklevel=3)
        for key in ("image_crop_resolution", "image_split_resolution"):
            if config.get(key) is not None:
                warnings.warn(f"config.json: {key}={config[key]!r} is not used by mlx-vidllm", stacklevel=3)
        text_config = {k: config[k] for k in DECODER_KEYS if k in config}
        text_config["model_type"] = "qwen2"
        text_config.setdefault("tie_word_embeddings", False)  # Qwen2Config's default (mlx-lm's is True)
        text_config.setdefault("vocab_size", 151936)  # Qwen2Config's default; the stored embedding rows win anyway
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "rope_theta"):
            if key not in text_config:
                raise ModelError(f"original LLaVA-NeXT config.json has no top-level {key} (the Qwen2 decoder's)")
        known = ORIGINAL_USED_KEYS | ORIGINAL_HARMLESS_KEYS | DECODER_KEYS
        warn_unused_keys("config", config, known)
        options = _video_options(config, default_layout=config.get("mm_newline_position", "one_token"))
        return cls(
            vision=vision,
            text_config=text_config,
            image_token_id=None,  # set by the processor: the first ids past the tokenizer's vocabulary
            video_token_id=None,
            image_grid_pinpoints=parse_pinpoints(config.get("image_grid_pinpoints"), vision.image_size),
            vision_feature_layer=-2,  # LLaVA-NeXT deletes the tower's last layer (counted again from the weights)
            vision_aspect_ratio=aspect,
            projector_hidden_act="gelu",
            tie_word_embeddings=text_config["tie_word_embeddings"],
            checkpoint_format="llava-next-original",
            vision_tower_source=source,
            config_vocab_size=text_config["vocab_size"],
            **options,
        )


def _video_options(config: dict, default_layout: str) -> dict:
    layout = config.get("mm_newline_position", default_layout)
    pool = config.get("mm_spatial_pool_mode", "bilinear")  # LLaVA-NeXT train.py's default
    try:
        check_video_options(layout, pool)
    except ModelError as e:
        raise ModelError(f"config.json: {e}") from None
    stride = config.get("mm_spatial_pool_stride")
    if stride not in (None, 2):
        warnings.warn(f"config.json: mm_spatial_pool_stride={stride} is ignored: LLaVA-NeXT pools video frames with "
                      f"stride 2 whatever it says", stacklevel=4)
    if config.get("add_faster_video"):
        raise ModelError("add_faster_video=true is not supported")
    return dict(video_layout=layout, pool_mode=pool,
                add_time_instruction=bool(config.get("add_time_instruction", True)),
                force_sample=bool(config.get("force_sample", True)))


# --- model ------------------------------------------------------------------------------------------------------


class Model(OneVisionModel):
    """The OneVision model with LLaVA-Video defaults; fits itself to the stored tower depth and vocabulary."""

    def sanitize(self, weights: dict) -> dict:
        # The vision tower: as many layers as are stored (the original checkpoints store the tower minus its
        # last layer, which LLaVA-NeXT deletes), never more than the features need.
        stored = {int(m.group(1)) for k in weights if (m := re.match(r"vision_tower\.layers\.(\d+)\.", k))}
        n_stored = max(stored) + 1 if stored else 0
        if n_stored == 0:
            raise ModelError("the checkpoint holds no vision tower layers")
        if n_stored < len(self.vision_tower.layers):
            self.vision_tower.layers = self.vision_tower.layers[:n_stored]
        # The decoder vocabulary: the embedding rows actually stored (config.json's vocab_size may differ).
        embed = weights.get("language_model.model.embed_tokens.weight")
        if embed is not None and embed.shape[0] != self.language_model.model.embed_tokens.weight.shape[0]:
            if isinstance(self.language_model.model.embed_tokens, nn.QuantizedEmbedding):
                raise ModelError("stored vocabulary size differs from config.json in a quantized checkpoint")
            self.config.text_config = {**self.config.text_config, "vocab_size": int(embed.shape[0])}
            self.language_model = build_decoder(self.config.text_config, self.config.tie_word_embeddings)
        return sanitize_llava(self, weights)

    def get_input_embeddings(self, input_ids, **media) -> mx.array:
        if self.config.video_token_id is None or self.config.image_token_id is None:
            raise ModelError("the placeholder token ids are not set: build the inputs with the model's processor")
        return super().get_input_embeddings(input_ids, **media)


# --- frame sampling ---------------------------------------------------------------------------------------------


@dataclass
class VideoSampling:
    """Which frames of a video were used, and when they are: what the time instruction states."""

    path: str
    indices: np.ndarray
    frame_times: list[float]  # seconds
    total_frames: int
    avg_fps: float

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    @property
    def video_time(self) -> float:
        return self.total_frames / self.avg_fps if self.avg_fps else 0.0


def sample_indices(total: int, avg_fps: float, num_frames: int | None = None, fps: float | None = None,
                   max_frames: int = MAX_FRAMES, force_sample: bool = True) -> tuple[np.ndarray, list[float]]:
    """LLaVA-Video's rule (model card `load_video`, training `process_video_with_decord`): frame indices and times.

    * `num_frames`, or `force_sample` with neither given: `linspace(0, N-1, count, dtype=int)` (frames repeat in
      videos shorter than the count, as in the original), at index / avg_fps seconds;
    * else every round(avg_fps/fps)-th frame (1 fps by default), at index / stride seconds as in the original;
      when that gives more than `max_frames`, the linspace rule with `max_frames` instead."""
    if total < 1:
        raise ValueError(f"a video needs at least one frame, got {total}")

    def uniform(count: int):
        idx = np.linspace(0, total - 1, count, dtype=int)
        return idx, [i / avg_fps if avg_fps > 0 else 0.0 for i in idx.tolist()]

    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        return uniform(num_frames)
    if fps is None and force_sample:
        return uniform(max_frames)
    fps = 1.0 if fps is None else fps
    if avg_fps <= 0 or fps <= 0:
        raise ValueError(f"sampling by rate needs positive rates, got avg_fps={avg_fps}, fps={fps}")
    stride = max(1, round(avg_fps / fps))  # Python round, as in the reference
    idx = np.arange(0, total, stride)
    if len(idx) > max_frames or force_sample:
        return uniform(max_frames)
    return idx, [i / (stride * fps) for i in idx.tolist()]  # fps=1: i / stride, the original's quirk


def time_instruction(sampling: VideoSampling) -> str:
    frame_time = ",".join(f"{t:.2f}s" for t in sampling.frame_times)
    return TIME_INSTRUCTION.format(video_time=sampling.video_time, num_frames=sampling.num_frames,
                                   frame_time=frame_time)


class SampledFrames(np.ndarray):
    """uint8 frames (T, H, W, 3) that remember how they were sampled (`.sampling`), so that the time
    instruction can be written wherever the frames go (generate, chat sessions and their media cache)."""

    sampling: VideoSampling | None

    def __new__(cls, frames: np.ndarray, sampling: VideoSampling | None):
        obj = np.asarray(frames).view(cls)
        obj.sampling = sampling
        return obj

    def __array_finalize__(self, obj):
        self.sampling = getattr(obj, "sampling", None)


# --- processor --------------------------------------------------------------------------------------------------


class LlavaVideoProcessor(OneVisionProcessor):
    """OneVision preprocessing plus LLaVA-Video's frame sampling, time instruction and prompt (both formats)."""

    default_num_frames = MAX_FRAMES

    def __init__(self, tokenizer, chat_template, eos_ids, model_config: LlavaVideoConfig, norm: NormalizeConfig,
                 size: int, resample: int, embedding_rows: int):
        Processor.__init__(self, tokenizer, chat_template, eos_ids)
        self.config = model_config
        self.norm = norm
        self.size = size
        self.resample = Image.Resampling(resample)
        vocab = tokenizer.get_vocab()
        # Split-and-insert tokenization when the tokenizer has no placeholder tokens (the original format).
        self.split_placeholders = not (self.image_token in vocab and self.video_token in vocab)
        if self.split_placeholders:
            n = len(tokenizer)
            if n + 1 >= embedding_rows:
                raise ModelError(f"the tokenizer has {n} tokens and the embedding matrix {embedding_rows} rows: "
                                 f"no free ids for the <image> / <video> placeholders")
            model_config.image_token_id, model_config.video_token_id = n, n + 1
        else:
            for tok, attr in ((self.image_token, "image_token_id"), (self.video_token, "video_token_id")):
                tid = getattr(model_config, attr)
                if tid is None:
                    setattr(model_config, attr, vocab[tok])
                elif vocab[tok] != tid:
                    raise ModelError(f"the tokenizer maps {tok} to id {vocab[tok]}, the config expects {tid}")
        self.image_token_id = model_config.image_token_id
        self.video_token_id = model_config.video_token_id

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model) -> "LlavaVideoProcessor":
        path = Path(path)
        cfg = model.config
        # The original LLaVA-NeXT uses its SigLipImageProcessor (0.5 stats, bicubic, the tower's size) and
        # ships no preprocessor_config.json; one that is present wins.
        pp = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255, "resample": 3}
        pp_file = path / "preprocessor_config.json"
        if pp_file.exists():
            pp.update(read_json(pp_file))
        elif cfg.checkpoint_format != "llava-next-original":
            raise ModelError(f"{path}: preprocessor_config.json is missing")
        size = pp.get("size") or {}
        side = size.get("height", size.get("shortest_edge", cfg.vision.image_size)) if isinstance(size, dict) \
            else cfg.vision.image_size
        with warnings.catch_warnings():  # transformers reads the original config.json (rope_scaling: null) too
            warnings.filterwarnings("ignore", message=".*rope_scaling.*")
            tokenizer = load_tokenizer(path)
        eos = eos_token_ids(path, tokenizer)
        vocab = tokenizer.get_vocab()
        eos.update(vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab)  # qwen_1_5 stops
        rows = model.language_model.model.embed_tokens.weight.shape[0]
        return cls(tokenizer, load_chat_template(path, tokenizer), eos, cfg,
                   NormalizeConfig.from_preprocessor(pp, path), side, pp.get("resample", 3), rows)

    # --- options ----------------------------------------------------------------------------------------------

    def configure(self, video_layout: str | None = None, pool_mode: str | None = None,
                  time_instruction: bool | None = None, instruction_placement: str | None = None,
                  force_sample: bool | None = None, max_frames: int | None = None, system_prompt: str | None = None):
        """Change LLaVA-Video's options; the model shares this config (see OneVisionProcessor.configure)."""
        check_video_options(video_layout, pool_mode)  # everything is checked before anything changes
        if instruction_placement is not None and instruction_placement not in PLACEMENTS:
            raise ModelError(f"instruction_placement {instruction_placement!r} is not one of {', '.join(PLACEMENTS)}")
        if max_frames is not None and max_frames < 1:
            raise ModelError(f"max_frames must be >= 1, got {max_frames}")
        super().configure(video_layout=video_layout, pool_mode=pool_mode)
        for name, value in (("add_time_instruction", time_instruction),
                            ("instruction_placement", instruction_placement), ("force_sample", force_sample),
                            ("max_frames", max_frames), ("system_prompt", system_prompt)):
            if value is not None:
                setattr(self.config, name, value)

    @property
    def cache_settings(self) -> tuple:
        return super().cache_settings + (self.config.force_sample, self.config.max_frames)

    # --- video ------------------------------------------------------------------------------------------------

    def sample_video(self, path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None,
                     max_frames: int | None = None) -> tuple[np.ndarray, VideoSampling]:
        """Frames (uint8, resized to the tower) and what was sampled, by LLaVA-Video's rule (see sample_indices)."""
        from ..media import video as vid

        info = vid.probe_video(path)
        if fps is not None and info.avg_fps <= 0:
            raise vid.VideoError(f"{info.path}: frame rate unknown, sample with num_frames instead of fps")
        cap = max_frames or self.config.max_frames

        def pick(total: int):
            return sample_indices(total, info.avg_fps, num_frames, fps, cap, self.config.force_sample)

        total = info.num_frames
        indices, times = pick(total)
        frames = vid.read_frames(path, indices, transform=self.frame_transform)
        if len(frames) < len(indices):  # the container over-reports its length: sample from what exists
            total = vid._count_by_decoding(info.path)
            if total == 0:
                raise vid.VideoError(f"{info.path}: no decodable video frames")
            warnings.warn(f"{info.path}: the stream ends after {total} of the {info.num_frames} frames its header "
                          f"announces; sampling from those", stacklevel=2)
            indices, times = pick(total)
            frames = vid.read_frames(path, indices, transform=self.frame_transform)
        return frames, VideoSampling(info.path, np.asarray(indices), times, total, info.avg_fps)

    def load_video(self, path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None,
                   max_frames: int | None = None) -> SampledFrames:
        """uint8 frames (T, S, S, 3), carrying what was sampled (`.sampling`) for the time instruction."""
        frames, sampling = self.sample_video(path, num_frames, fps, max_frames)
        return SampledFrames(frames, sampling)

    def _frames(self, video: VideoLike) -> np.ndarray:
        frames = super()._frames(video)  # a path goes through load_video; arrays are checked (and lose their type)
        sampling = getattr(frames, "sampling", None) or getattr(video, "sampling", None)
        return SampledFrames(frames, sampling) if sampling is not None else frames

    def preprocess_video(self, frames: np.ndarray) -> np.ndarray:
        return super().preprocess_video(np.asarray(frames))

    def time_instruction(self, sampling: VideoSampling) -> str:
        return time_instruction(sampling)

    def insert_time_instruction(self, text: str, sampling: VideoSampling) -> str:
        """`text` with the time instruction after its (first) video placeholder: `<video>\\n{instr}\\n...`
        ("training" placement) or `<video>{instr}\\n...` ("model_card"); unchanged if already there."""
        instr = time_instruction(sampling)
        at = text.find(self.video_token)
        if instr in text or at < 0:
            return text
        head, rest = text[:at + len(self.video_token)], text[at + len(self.video_token):]
        rest = rest[1:] if rest.startswith("\n") else rest
        sep = "" if self.config.instruction_placement == "model_card" else "\n"
        return f"{head}{sep}{instr}\n{rest}"

    # --- prompt -----------------------------------------------------------------------------------------------

    def format_prompt(self, question: str, num_images: int = 0, num_videos: int = 0, system: str | None = None,
                      history: Sequence[tuple[str, str]] | None = None, sampling: VideoSampling | None = None) -> str:
        """The qwen_1_5 conversation LLaVA-Video was trained with: the system prompt, then in the first user turn
        `<image>\\n` per image, `<video>\\n` and the text; `history` holds earlier (user, assistant) turns.

        The time instruction goes after `<video>\\n` when the processor receives frames from `load_video`
        (they carry their sampling), or here already when `sampling` is given.
        `system=None` uses "You are a helpful assistant."; `system=""` leaves the system turn out."""
        cfg = self.config
        system = cfg.system_prompt if system is None else system
        if self.split_placeholders:  # original format: the Qwen2 template takes string content
            media = (self.image_token + "\n") * num_images + (self.video_token + "\n") * num_videos
            messages = [{"role": "system", "content": system}] if system else []
            for i, (user, answer) in enumerate([*(history or []), (question, None)]):
                messages.append({"role": "user", "content": (media if i == 0 else "") + user})
                if answer is not None:
                    messages.append({"role": "assistant", "content": answer})
            if self.chat_template:
                out = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                         add_generation_prompt=True)
            else:  # LLaVA-NeXT's qwen_1_5 conversation (SeparatorStyle.CHATML)
                out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
                out += "<|im_start|>assistant\n"
        else:  # transformers format: its chat template renders <image>\n / <video>\n before the text
            out = super().format_prompt(question, num_images, num_videos, system or None, history=history)
        if sampling is not None and num_videos == 1 and cfg.add_time_instruction:
            out = self.insert_time_instruction(out, sampling)
        return out

    def tokenize(self, text: str) -> np.ndarray:
        if not self.split_placeholders:
            return super().tokenize(text)
        # LLaVA-NeXT tokenizer_image_token: tokenize the text between placeholders piece by piece.
        ids: list[int] = []
        special = {self.image_token: self.image_token_id, self.video_token: self.video_token_id}
        pieces = re.split(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})", text)
        bos = self.tokenizer.bos_token_id
        for i, piece in enumerate(pieces):
            if piece in special:
                ids.append(special[piece])
            elif piece:
                chunk = self.tokenizer(piece)["input_ids"]
                if i > 0 and bos is not None and chunk[:1] == [bos]:
                    chunk = chunk[1:]  # only the first chunk keeps a BOS
                ids.extend(chunk)
        return np.asarray(ids, dtype=np.int32)[None]

    def __call__(self, text: str, images: Sequence[ImageLike] | None = None,
                 videos: Sequence[VideoLike] | None = None) -> dict[str, Any]:
        """As OneVision's, plus the time instruction for one video that carries its sampling (see load_video)."""
        videos = [self._frames(v) for v in videos or []]
        if len(videos) == 1 and self.config.add_time_instruction:
            sampling = getattr(videos[0], "sampling", None)
            if sampling is not None and sampling.num_frames == len(videos[0]) and sampling.avg_fps > 0:
                text = self.insert_time_instruction(text, sampling)
            elif TIME_INSTRUCTION[:20] not in text:
                warnings.warn("the video's sampling is unknown (frames given as an array, or no frame rate): the "
                              "prompt has no time instruction; load the video with processor.load_video(path)",
                              stacklevel=2)
        return super().__call__(text, images=images, videos=videos)


# --- family hooks -----------------------------------------------------------------------------------------------


def build(config: dict) -> Model:
    if config.get("model_type") == "llava_onevision":
        cfg = LlavaVideoConfig.from_hf(config)
    else:
        cfg = LlavaVideoConfig.from_original(config)
    return Model(cfg)


def processor(path, model: Model) -> LlavaVideoProcessor:
    return LlavaVideoProcessor.from_pretrained(path, model)
