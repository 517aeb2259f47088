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

# LLaMA-VID: released .bin shards ("model.vlm_att_*", "model.mm_projector.*", Llama decoder keys) and
# LAVIS EVA-ViT-G names, bare in eva_vit_g.pth or under "model.vision_tower.vision_tower." in the shards.
_EVA = r"^(?:model\.vision_tower\.vision_tower\.)?"
_BERT = r"^model\.vlm_att_encoder\.bert\."
LLAMA_VID_KEYS: KeyRules = [
    (_EVA + r"blocks\.(\d+)\.norm1\.", r"vision_tower.layers.\1.layer_norm1."),
    (_EVA + r"blocks\.(\d+)\.norm2\.", r"vision_tower.layers.\1.layer_norm2."),
    (_EVA + r"blocks\.(\d+)\.attn\.", r"vision_tower.layers.\1.self_attn."),  # qkv, q_bias, v_bias, proj
    (_EVA + r"blocks\.(\d+)\.mlp\.", r"vision_tower.layers.\1.mlp."),
    (_EVA + r"patch_embed\.proj\.", "vision_tower.patch_embedding."),
    (_EVA + r"(cls_token|pos_embed)$", r"vision_tower.\1"),
    (_EVA + r"(norm|fc_norm|head)\.", r"vision_tower.\1."),  # never used; dropped by the model's sanitize
    (_BERT + r"embeddings\.word_embeddings\.", "qformer.word_embeddings."),
    (_BERT + r"embeddings\.position_embeddings\.", "qformer.position_embeddings."),
    (_BERT + r"embeddings\.LayerNorm\.", "qformer.embed_norm."),
    (_BERT + r"encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.", r"qformer.layers.\1.\2."),
    (_BERT + r"encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.dense\.", r"qformer.layers.\1.\2.dense."),
    (_BERT + r"encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.LayerNorm\.",
     r"qformer.layers.\1.\2.norm."),
    (_BERT + r"encoder\.layer\.(\d+)\.intermediate(_query)?\.dense\.", r"qformer.layers.\1.ffn\2.fc1."),
    (_BERT + r"encoder\.layer\.(\d+)\.output(_query)?\.dense\.", r"qformer.layers.\1.ffn\2.fc2."),
    (_BERT + r"encoder\.layer\.(\d+)\.output(_query)?\.LayerNorm\.", r"qformer.layers.\1.ffn\2.norm."),
    (r"^model\.vlm_att_query$", "qformer.query_tokens"),
    (r"^model\.vlm_att_ln\.", "qformer.ln_vision."),
    (r"^model\.vlm_att_projector\.", "context.text_proj."),
    (r"^model\.vlm_att_key_projector\.", "context.key_proj."),
    (r"^model\.vlm_att_val_projector\.", "context.value_proj."),
    (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.", "language_model.model."),  # Vicuna decoder keys
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
    if any(k.startswith("model.vlm_att_") for k in keys):
        return "llama-vid-original"
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
    # Optional: (path, config, **options) -> raw tensors, for families whose weights are not all in the
    # folder's weight files (LLaMA-VID: eva_vit_g.pth beside config.json / --vision-weights). Default: load_weights.
    read_weights: Callable | None = field(default=None, repr=False)
    # Optional: (source folder, output folder, model) -> None, run by convert after the side files are copied,
    # to write what load() needs and the source keeps elsewhere (LLaMA-VID: bert/, preprocessor_config.json).
    write_side_files: Callable | None = field(default=None, repr=False)


def _onevision_build(config: dict):
    from .onevision import Model, OneVisionConfig

    return Model(OneVisionConfig.from_hf(config))


def _onevision_processor(path, model):
    from .onevision import OneVisionProcessor

    return OneVisionProcessor.from_pretrained(path, model.config)


# config.json fields that mark LLaVA-Video (the original format has them; a transformers conversion has them only
# if its converter kept them: nothing else tells a -hf LLaVA-Video from a OneVision-7B checkpoint).
LLAVA_VIDEO_MARKERS = ("add_time_instruction", "force_sample", "mm_newline_position")


def is_original_llava_qwen(config: dict) -> bool:
    """An original LLaVA-NeXT checkpoint (mm_* fields, top-level decoder fields) with a Qwen2 decoder."""
    archs = config.get("architectures") or []
    return "mm_vision_tower" in config and ("LlavaQwenForCausalLM" in archs or config.get("model_type") == "llava_qwen")


def is_llava_video(config: dict) -> bool:
    """LLaVA-Video: original LLaVA-NeXT format, or a transformers `llava_onevision` one with LLaVA-Video fields."""
    if not any(k in config for k in LLAVA_VIDEO_MARKERS):
        return False
    return config.get("model_type") == "llava_onevision" or is_original_llava_qwen(config)


def _llava_video_build(config: dict):
    from .llava_video import build

    return build(config)


def _llava_video_processor(path, model):
    from .llava_video import processor

    return processor(path, model)


def _video_llava_build(config: dict):
    from .video_llava import Model, VideoLlavaConfig

    return Model(VideoLlavaConfig.from_hf(config))


def _video_llava_processor(path, model):
    from .video_llava import VideoLlavaProcessor

    return VideoLlavaProcessor.from_pretrained(path, model.config)


def is_llama_vid(config: dict) -> bool:
    """LLaMA-VID: a LLaVA-style Llama config with the QFormer fields (bert_type) or its architecture name."""
    return config.get("model_type") in ("llava", "llama_vid") and (
        "bert_type" in config or "LlavaLlamaAttForCausalLM" in (config.get("architectures") or []))


def _llama_vid_build(config: dict):
    from .llama_vid import LlamaVidConfig, Model

    return Model(LlamaVidConfig.from_hf(config))


def _llama_vid_processor(path, model):
    from .llama_vid import LlamaVidProcessor

    return LlamaVidProcessor.from_pretrained(path, model)


def _llama_vid_read_weights(path, config, **options):
    from .llama_vid import read_weights

    return read_weights(path, config, **options)


def _llama_vid_side_files(src, out, model):
    from .llama_vid import write_side_files

    write_side_files(src, out, model)


FAMILIES: list[Family] = [
    Family(
        name="llava_onevision",
        description="LLaVA-OneVision (SigLIP + Qwen2), transformers format",
        detect=lambda c: c.get("model_type") == "llava_onevision" and not is_llava_video(c),
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
    Family(
        name="llava_video",
        description="LLaVA-Video (SigLIP + Qwen2, grid video layout, time instruction), original LLaVA-NeXT "
                    "and transformers formats",
        detect=is_llava_video,
        key_rules=LLAVA_KEYS,
        build=_llava_video_build,
        processor=_llava_video_processor,
    ),
    Family(
        name="llama_vid",
        description="LLaMA-VID (EVA-ViT-G + text-guided QFormer, 2 tokens per frame, Vicuna), released "
                    "PyTorch format (.bin shards + eva_vit_g.pth)",
        detect=is_llama_vid,
        key_rules=LLAMA_VID_KEYS,
        build=_llama_vid_build,
        processor=_llama_vid_processor,
        read_weights=_llama_vid_read_weights,
        write_side_files=_llama_vid_side_files,
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
