"""One entry per family: how to recognise its config, how its checkpoint keys
map onto our module names (data, shared by the loader and the converter),
and which model/processor classes serve it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

# How checkpoint keys map onto our module names: ordered (pattern, replacement)
# rewrites, the first matching pattern wins, keys matching none keep their name.
# One list covers every format a family is stored in, since the prefixes do not clash.
KeyRules = list[tuple[str, str]]

LLAVA_KEYS: KeyRules = [
    # vision tower: "vision_tower.vision_model." (Hub legacy), "vision_tower." (saved by
    # transformers 5), "model.vision_tower." (transformers 5 runtime names),
    # "model.vision_tower.vision_tower.vision_model." (original LLaVA-NeXT)
    (r"^(?:model\.)?vision_tower\.(?:vision_tower\.)?(?:vision_model\.)?encoder\.layers\.", "vision_tower.layers."),
    (r"^(?:model\.)?vision_tower\.(?:vision_tower\.)?(?:vision_model\.)?", "vision_tower."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.(multi_modal_projector|image_newline)", r"\1"),
    (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
    (r"^model\.", "language_model.model."),  # original LLaVA-NeXT decoder keys
]

# Video-LLaVA: "image_tower.vision_model." / "video_tower.vision_model." (Hub legacy),
# "image_tower." / "video_tower." (what transformers 5.23's plain save_pretrained writes: legacy
# decoder names, but no "vision_model." level), "model.image_tower." (transformers 5 runtime names).
VIDEO_LLAVA_KEYS: KeyRules = [
    (r"^(?:model\.)?(image_tower|video_tower)\.(?:vision_model\.)?encoder\.layers\.", r"\1.layers."),
    (r"^(?:model\.)?(image_tower|video_tower)\.(?:vision_model\.)?", r"\1."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
]

# Keys present in checkpoints that the LLaVA models never use.
DROPPED_KEYS = [
    r"\.position_ids$",
    r"rotary_emb\.inv_freq$",
    r"^vision_tower\.post_layernorm\.",
    r"^vision_tower\.head\.",  # SigLIP pooling head
    r"^(?:image|video)_tower\.post_layernorm\.",  # Video-LLaVA's CLIP towers
]


def key_format(keys: set[str]) -> str:
    """Name of the checkpoint's key format, for messages and model cards."""
    if any(k.startswith("model.language_model.") for k in keys):
        return "transformers-v5"
    if any(k.startswith("model.mm_projector.") for k in keys):
        return "llava-next-original"
    if any(k.startswith("language_model.model.") for k in keys):
        return "transformers"
    return "unknown"


def rename_keys(weights: dict, rules: KeyRules) -> dict:
    compiled = [(re.compile(p), r) for p, r in rules]
    dropped = [re.compile(p) for p in DROPPED_KEYS]
    out = {}
    for key, value in weights.items():
        for pattern, repl in compiled:
            new, n = pattern.subn(repl, key, count=1)
            if n:
                key = new
                break
        if not any(d.search(key) for d in dropped):
            out[key] = value
    return out


@dataclass
class Family:
    name: str
    description: str
    detect: Callable[[dict], bool]
    key_rules: KeyRules
    build: Callable[[dict], object] = field(repr=False)  # config dict -> Model
    processor: Callable = field(repr=False)  # (path, model) -> Processor


def _onevision_build(config: dict):
    from .onevision import Model, OneVisionConfig

    return Model(OneVisionConfig.from_hf(config))


def _onevision_processor(path, model):
    from .onevision import OneVisionProcessor

    return OneVisionProcessor.from_pretrained(path, model.config)


def _video_llava_build(config: dict):
    from .video_llava import Model, VideoLlavaConfig

    return Model(VideoLlavaConfig.from_hf(config))


def _video_llava_processor(path, model):
    from .video_llava import VideoLlavaProcessor

    return VideoLlavaProcessor.from_pretrained(path, model.config)


FAMILIES: list[Family] = [
    Family(
        name="llava_onevision",
        description="LLaVA-OneVision (SigLIP + Qwen2), transformers format",
        detect=lambda c: c.get("model_type") == "llava_onevision",
        key_rules=LLAVA_KEYS,
        build=_onevision_build,
        processor=_onevision_processor,
    ),
    Family(
        name="video_llava",
        description="Video-LLaVA (two CLIP ViT-L/14 towers + Vicuna), transformers format",
        detect=lambda c: c.get("model_type") == "video_llava",
        key_rules=VIDEO_LLAVA_KEYS,
        build=_video_llava_build,
        processor=_video_llava_processor,
    ),
]


def detect_family(config: dict) -> Family:
    for family in FAMILIES:
        if family.detect(config):
            return family
    supported = ", ".join(f.name for f in FAMILIES)
    raise ValueError(
        f"unsupported model (model_type={config.get('model_type')!r}, "
        f"architectures={config.get('architectures')}); supported families: {supported}"
    )
