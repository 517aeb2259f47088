"""LLaMA-VID: EVA-ViT-G -> text-guided QFormer -> two tokens per frame -> Vicuna (mlx-lm Llama).

Every visual input (an image or a video frame) becomes [context, content...]:

* context: the QFormer turns the question into 32 queries; they are projected
  to the vision width (`text_proj`), attend over the projected patch features
  (`key_proj`, scores / sqrt(vision width), softmax over patches) with the raw
  patch features as values, the 32 results are averaged and `value_proj`
  maps the average to one decoder token. It depends on the question, so it
  is recomputed for every new question.
* content: the patch features (CLS dropped), compressed by `compress_type`
  (None: all patches; "grid:N": N*N average-pooled cells; "mean...": their
  mean, one token), through the mlp2x_gelu projector.

The QFormer sees the EVA output with CLS, after `ln_vision`; key, value and
content paths use the patches only. A video's frames are sampled at 1 fps
(every round(avg_fps)-th frame, uncapped) and fill one `<image>` with
[ctx1, cont1, ctx2, cont2, ...]. Video files are decoded frame by frame and
their EVA features cached on disk (`media/feature_cache.py`), so memory stays
flat in the video's length and a second question only runs the QFormer, the
token step and the decoder. Every video, on every checkpoint (the long-video one
included), follows `llamavid/serve/cli.py`; `run_llamavid_movie.py`'s path over
pre-extracted features (a "Below is a movie..." wrapper interleaved with
subtitles, two `<image>` per frame, the QFormer fed no CLS) is not reproduced.

Checkpoints: the released `YanweiLi/llama-vid-*` folders (PyTorch `.bin`
shards + `eva_vit_g.pth` + `tokenizer.model`), or the MLX folder `convert`
writes from them. The config stores neither EVA's nor the QFormer's sizes:
the released values are the defaults, and `vision_config` / `qformer_config`
dicts in config.json override them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from ..errors import InputError, ModelError
from ..media import image as imgops
from ..processing import ImageLike, NormalizeConfig, Processor, VideoLike, load_image, read_json
from .blocks import MLPProjector, merge_placeholders
from .decoder import build_decoder, warn_unused_keys
from .eva import EVAConfig, EVAVisionModel
from .qformer import QFormer, QFormerConfig

# LLaVA's sentinel for "<image>" in input_ids; its positions receive the visual tokens.
IMAGE_TOKEN_INDEX = -200
# Frames per vision-encoder / QFormer batch: bounds memory on long videos.
VISION_CHUNK = 16

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Llama keys of the flat LLaVA-style config that go to the decoder.
_TEXT_KEYS = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "rms_norm_eps", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
    "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias", "head_dim",
}
# LLaMA-VID keys read here.
_USED_KEYS = {
    "mm_hidden_size", "mm_projector_type", "mm_vision_select_feature", "bert_type", "num_query", "num_qformer",
    "compress_type", "max_token", "mm_use_im_start_end", "mm_use_im_patch_token", "vision_config",
    "qformer_config", "image_processor",
}
# Keys of the released configs that change nothing at inference (training switches, local paths,
# settings that LLaMA-VID ignores for EVA or that only its benchmark loaders use).
_INERT_KEYS = {
    "mm_vision_tower", "mm_vision_select_layer", "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "use_mm_proj",
    "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length",
    "model_max_length", "video_fps", "mm_projector_lr", "pretrain_qformer", "freeze_backbone",
    "mm_patch_merge_type", "pretrain_mm_mlp_adapter", "mm_vision_tower_lr", "unfreeze_mm_vision_tower",
}


def _subconfig(cls, values: dict | None, section: str):
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    warn_unused_keys(section, values, known | {"model_type"})
    return cls(**{k: v for k, v in values.items() if k in known})


def _image_size(config: dict) -> int:
    """EVA's input size: vision_config.image_size, else from the processor path ("clip-patch14-336"), else 224."""
    vc = config.get("vision_config") or {}
    if "image_size" in vc:
        return int(vc["image_size"])
    m = re.search(r"(224|336)", Path(str(config.get("image_processor") or "")).name)
    return int(m.group(1)) if m else 224


@dataclass
class LlamaVidConfig:
    vision: EVAConfig
    qformer: QFormerConfig
    text_config: dict
    mm_hidden_size: int = 1408
    compress_type: str | None = None
    select_feature: str = "patch"

    @property
    def content_tokens(self) -> int:
        """Content tokens per image or frame."""
        c = self.compress_type
        if c and "grid" in c:
            n = int(c.split("grid:")[-1])
            k = self.patch_grid // n
            return (self.patch_grid // k) ** 2
        if c and "mean" in c:
            return 1
        return self.patch_tokens

    @property
    def tokens_per_visual(self) -> int:
        return 1 + self.content_tokens

    @property
    def drop_cls(self) -> bool:
        # LLaMA-VID: "if mm_vision_select_feature == 'patch' and the token count is odd, drop index 0"
        return self.select_feature == "patch" and self.vision.num_tokens % 2 == 1

    @property
    def patch_tokens(self) -> int:
        return self.vision.num_tokens - 1 if self.drop_cls else self.vision.num_tokens

    @property
    def patch_grid(self) -> int:
        return math.isqrt(self.patch_tokens)

    @classmethod
    def from_hf(cls, config: dict) -> "LlamaVidConfig":
        """Read a released LLaMA-VID config.json (a LlamaConfig with model_type "llava" and mm_* keys)."""
        bert_type = config.get("bert_type", "qformer_pretrain")
        if "qformer" not in bert_type or "pretrain" not in bert_type:
            raise ValueError(f"bert_type={bert_type!r}: only the QFormer variants ('qformer_pretrain*') are supported")
        if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
            raise ValueError("mm_use_im_start_end / mm_use_im_patch_token are not supported (no released "
                             "LLaMA-VID checkpoint uses them)")
        if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ValueError(f"mm_projector_type={config['mm_projector_type']!r}: only mlp2x_gelu is supported")
        compress = config.get("compress_type")
        if compress is not None and "grid" not in compress and "mean" not in compress:
            raise ValueError(f"compress_type={compress!r}: expected null, 'grid:N' or 'mean*'")
        warn_unused_keys("config", config, _TEXT_KEYS | _USED_KEYS | _INERT_KEYS)

        vision = _subconfig(EVAConfig, {"image_size": _image_size(config), **(config.get("vision_config") or {})},
                            "vision_config")
        mm_hidden = int(config.get("mm_hidden_size", vision.hidden_size))
        if mm_hidden != vision.hidden_size:
            raise ValueError(f"mm_hidden_size={mm_hidden} differs from the vision width {vision.hidden_size}")
        q = dict(config.get("qformer_config") or {})
        q.setdefault("num_query_tokens", config.get("num_query", config.get("num_qformer", 32)))
        q["encoder_hidden_size"] = mm_hidden  # the cross-attention width is mm_hidden_size
        if "layer" in bert_type:  # "qformer_pretrain_layer:N" keeps the first N BERT layers
            q["num_hidden_layers"] = int(bert_type.split(":")[-1])
        qformer = _subconfig(QFormerConfig, q, "qformer_config")

        text = {k: config[k] for k in _TEXT_KEYS if k in config}
        text["model_type"] = "llama"
        text.setdefault("hidden_act", "silu")
        text.setdefault("tie_word_embeddings", False)  # LlamaConfig's default (mlx-lm's is True)
        text.setdefault("max_position_embeddings", 2048)  # LlamaConfig's default
        if "rope_theta" not in text and "rope_theta" not in (text.get("rope_parameters") or {}):
            text["rope_theta"] = 10000.0
        scaling = text.get("rope_scaling") or {}
        if scaling.get("type", scaling.get("rope_type")) == "linear":
            # Positions are compressed by the factor: the context grows by it (64K for the long-video model).
            text["max_position_embeddings"] = int(text["max_position_embeddings"] * float(scaling["factor"]))
        return cls(vision=vision, qformer=qformer, text_config=text, mm_hidden_size=mm_hidden,
                   compress_type=compress, select_feature=config.get("mm_vision_select_feature", "patch"))


class ContextTokens(nn.Module):
    """vlm_att_projector / vlm_att_key_projector / vlm_att_val_projector."""

    def __init__(self, q_dims: int, v_dims: int, out_dims: int):
        super().__init__()
        self.text_proj = nn.Linear(q_dims, v_dims)
        self.key_proj = nn.Linear(v_dims, v_dims)
        self.value_proj = nn.Linear(v_dims, out_dims)

    def __call__(self, text_q: mx.array, vis: mx.array) -> mx.array:
        """text_q (F, Q, Dv) queries, vis (F, n, Dv) patch features -> one token per frame (F, D)."""
        keys = self.key_proj(vis)
        scores = (text_q @ keys.transpose(0, 2, 1)) / math.sqrt(vis.shape[-1])
        attn = mx.softmax(scores, axis=-1, precise=True)
        return self.value_proj((attn @ vis).mean(axis=1))  # raw features as values, mean over the queries


class Model(nn.Module):
    def __init__(self, config: LlamaVidConfig):
        super().__init__()
        self.config = config
        d_text = config.text_config["hidden_size"]
        self.vision_tower = EVAVisionModel(config.vision)
        self.qformer = QFormer(config.qformer)
        self.context = ContextTokens(config.qformer.hidden_size, config.mm_hidden_size, d_text)
        self.multi_modal_projector = MLPProjector(config.mm_hidden_size, d_text)
        self.language_model = build_decoder(json.loads(json.dumps(config.text_config)))  # mlx-lm edits nested dicts
        self._fingerprint = None

    # --- vision -------------------------------------------------------------------------

    def compress(self, vis: mx.array) -> mx.array:
        c = self.config.compress_type
        if c and "grid" in c:
            F, n, D = vis.shape
            side = math.isqrt(n)
            k = side // int(c.split("grid:")[-1])
            m = side // k  # avg_pool2d(kernel=stride=k, padding 0): trailing rows/cols that do not fill a cell drop
            grid = vis.reshape(F, side, side, D)[:, :m * k, :m * k]
            return grid.reshape(F, m, k, m, k, D).mean(axis=(2, 4)).reshape(F, m * m, D)
        if c and "mean" in c:
            return vis.mean(axis=1, keepdims=True)
        return vis

    def visual_tokens(self, feats: mx.array, qformer_ids: mx.array) -> mx.array:
        """EVA features (F, N, Dv) + question ids (L,) -> (F * tokens_per_visual, D): [ctx, content...] per frame."""
        text_q = self.context.text_proj(self.qformer.query_outputs(qformer_ids, feats))
        vis = feats[:, 1:] if self.config.drop_cls else feats
        ctx = self.context(text_q, vis.astype(text_q.dtype))
        content = self.multi_modal_projector(self.compress(vis))
        tokens = mx.concatenate([ctx[:, None].astype(content.dtype), content], axis=1)
        return tokens.reshape(-1, tokens.shape[-1])

    def features_to_tokens(self, chunks, qformer_ids: mx.array) -> mx.array:
        out = []
        for feats in chunks:
            tokens = self.visual_tokens(feats, qformer_ids)
            mx.eval(tokens)
            out.append(tokens)
        return mx.concatenate(out) if len(out) > 1 else out[0]

    def vision_fingerprint(self) -> str:
        """Identifies the vision tower's weights and geometry (part of the feature-cache key)."""
        if self._fingerprint is None:
            from mlx.utils import tree_flatten

            h = hashlib.sha256(json.dumps(asdict(self.config.vision), sort_keys=True).encode())
            tower = self.vision_tower
            parts = tree_flatten(tower.patch_embedding.parameters()) + tree_flatten(tower.layers[-1].parameters())
            for name, value in [("pos_embed", tower.pos_embed), ("cls_token", tower.cls_token)] + parts:
                h.update(name.encode() + str(value.dtype).encode())
                h.update(np.asarray(value.view(mx.uint8) if value.dtype != mx.uint8 else value).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # --- merge and decode -------------------------------------------------------------------

    def get_input_embeddings(
        self,
        input_ids: mx.array | np.ndarray,
        qformer_input_ids: mx.array | np.ndarray | None = None,
        pixel_values: mx.array | np.ndarray | None = None,
        pixel_values_videos: Sequence | None = None,
        **unused,
    ) -> mx.array:
        """Text embeddings with the `<image>` positions (IMAGE_TOKEN_INDEX) replaced by visual tokens: (L, D).

        Visual inputs fill the placeholders in order: the images, then the videos. A video is either
        preprocessed frames (T, S, S, 3) or `CachedFeatures` of a video file."""
        from ..media.feature_cache import CachedFeatures

        ids = np.asarray(input_ids).reshape(-1)
        embeds = self.language_model.model.embed_tokens(mx.array(np.where(ids < 0, 0, ids)))
        blocks = []
        has_images = pixel_values is not None and len(pixel_values)
        videos = list(pixel_values_videos) if pixel_values_videos is not None else []
        if has_images or videos:
            if qformer_input_ids is None:
                raise ValueError("LLaMA-VID needs qformer_input_ids (the question, BERT-tokenized) for visual input")
            qids = mx.array(np.asarray(qformer_input_ids).reshape(-1))
        if has_images:
            pix = mx.array(pixel_values)
            blocks.append(self.features_to_tokens(
                (self.vision_tower(pix[i:i + VISION_CHUNK]) for i in range(0, pix.shape[0], VISION_CHUNK)), qids))
        for video in videos:
            if isinstance(video, CachedFeatures):
                chunks = video.chunks(VISION_CHUNK)
            else:
                pix = mx.array(video)
                chunks = (self.vision_tower(pix[i:i + VISION_CHUNK]) for i in range(0, pix.shape[0], VISION_CHUNK))
            blocks.append(self.features_to_tokens(chunks, qids))
        features = mx.concatenate(blocks) if blocks else mx.zeros((0, embeds.shape[-1]), embeds.dtype)
        return merge_placeholders(embeds, ids, IMAGE_TOKEN_INDEX, features, "visual")

    def __call__(self, input_ids, cache=None, **media) -> mx.array:
        """Logits (1, L, vocab) for a processed prompt (the processor's output dict)."""
        ids = np.asarray(input_ids).reshape(1, -1)
        embeds = self.get_input_embeddings(ids, **media)
        return self.language_model(mx.array(np.where(ids < 0, 0, ids)), cache=cache, input_embeddings=embeds[None])

    @property
    def layers(self):
        return self.language_model.layers

    def sanitize(self, weights: dict) -> dict:
        """Weights under our names -> exactly this module's parameters."""
        weights = self.vision_tower.sanitize(weights)
        lm = {k[len("language_model."):]: v for k, v in weights.items() if k.startswith("language_model.")}
        lm = self.language_model.sanitize(lm) if hasattr(self.language_model, "sanitize") else lm
        out = {k: v for k, v in weights.items() if not k.startswith("language_model.")}
        out.update({f"language_model.{k}": v for k, v in lm.items()})
        return out


# ----------------------------------------------------------------------------------------- tokenizers


class VicunaTokenizer:
    """Llama's SentencePiece `tokenizer.model` with the slow `LlamaTokenizer(legacy=False)` semantics.

    The text gets one leading "▁"; special tokens (<s>, </s>, <unk>) are split out; a piece that starts
    with a space or "▁" is encoded with that space as a word start, any other piece (e.g. right after
    "</s>") without the dummy prefix. So "<image>\\nWhat" chunks encode "\\nWhat" as ["▁", "<0x0A>", ...],
    as LLaVA's `tokenizer_image_token` sees them. transformers 5's AutoTokenizer on a LLaMA-VID folder
    does not reproduce this, hence this small class. Exposes what mlx-lm's TokenizerWrapper needs.
    """

    chat_template = None
    clean_up_tokenization_spaces = False

    def __init__(self, model_file: str | os.PathLike, add_bos: bool = True):
        import sentencepiece as spm

        self.model_file = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        self.add_bos = add_bos
        self.sp_plain = self._without_dummy_prefix(self.sp)
        self.unk_token, self.bos_token, self.eos_token = "<unk>", "<s>", "</s>"
        self.unk_token_id = self.sp.piece_to_id(self.unk_token)
        self.bos_token_id = self.sp.piece_to_id(self.bos_token)
        self.eos_token_id = self.sp.piece_to_id(self.eos_token)
        self.pad_token_id = None
        self.special = {self.unk_token: self.unk_token_id, self.bos_token: self.bos_token_id,
                        self.eos_token: self.eos_token_id}
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in self.special) + ")")
        self._unk_len = len(self.sp_plain.encode(self.unk_token, out_type=str)) if self.sp_plain else 0

    @staticmethod
    def _without_dummy_prefix(sp):
        try:
            from sentencepiece import sentencepiece_model_pb2 as pb
        except ImportError:  # protobuf missing: encode() falls back to an equivalent for word-start pieces
            return None
        import sentencepiece as spm

        proto = pb.ModelProto.FromString(sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("LLaMA-VID has no chat template: use LlamaVidProcessor.format_prompt")

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(len(self))}

    def convert_ids_to_tokens(self, ids):
        return self.sp.id_to_piece(ids) if isinstance(ids, int) else [self.sp.id_to_piece(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        return self.sp.piece_to_id(tokens) if isinstance(tokens, str) else [self.sp.piece_to_id(t) for t in tokens]

    def _encode_piece(self, text: str) -> list[str]:
        """transformers' SentencePieceBackend._tokenize with legacy=False (the model's dummy prefix disabled)."""
        if self.sp_plain is not None:
            if text.startswith(("▁", " ")):  # the space is a word start: "<unk>" in front keeps it
                return self.sp_plain.encode(self.unk_token + text, out_type=str)[self._unk_len:]
            return self.sp_plain.encode(text, out_type=str)
        # Without protobuf the dummy prefix cannot be switched off: it stands in for a word-start space,
        # and is removed otherwise (exact unless that changes how the first word splits).
        if text.startswith(("▁", " ")):
            return self.sp.encode(text[1:], out_type=str)
        pieces = self.sp.encode(text, out_type=str)
        if pieces and pieces[0] == "▁":
            return pieces[1:]
        if pieces and pieces[0].startswith("▁") and self.sp.piece_to_id(pieces[0][1:]) != self.unk_token_id:
            return [pieces[0][1:]] + pieces[1:]
        return pieces

    def tokenize(self, text: str) -> list[str]:
        if not text:
            return []
        text = "▁" + text.replace("▁", " ")
        tokens = []
        for part in self._special_re.split(text):
            if part in self.special:
                tokens.append(part)
            elif part:
                tokens.extend(self._encode_piece(part))
        if len(tokens) > 1 and tokens[0] == "▁" and tokens[1] in self.special:
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.special[t] if t in self.special else self.sp.piece_to_id(t) for t in self.tokenize(text)]
        return ([self.bos_token_id] if add_special_tokens and self.add_bos else []) + ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False, **unused) -> str:
        if isinstance(ids, int):
            ids = [ids]
        special_ids = set(self.special.values())
        pieces = [self.sp.id_to_piece(int(i)) for i in ids
                  if not (skip_special_tokens and int(i) in special_ids)]
        if pieces and pieces[0].startswith("▁"):  # the prefix space added when encoding
            pieces[0] = pieces[0][1:]
        plain = self.sp_plain or self.sp
        out, current = [], []
        for p in pieces:
            if p in self.special:
                out.append(plain.decode_pieces(current) + p)
                current = []
            elif p:
                current.append(p)
        out.append(plain.decode_pieces(current))
        return "".join(out)


def load_qformer_tokenizer(path: Path, vocab_size: int):
    """bert/vocab.txt of the checkpoint (else bert-base-uncased from the Hub), lower-cased, truncated from
    the left, with [DEC] added as the last id (LLaMA-VID's init_bert)."""
    from transformers import BertTokenizer

    vocab = path / "bert" / "vocab.txt"
    try:
        if vocab.exists():
            tok = BertTokenizer(str(vocab), do_lower_case=True, truncation_side="left")
        else:
            tok = BertTokenizer.from_pretrained("bert-base-uncased", truncation_side="left")
    except Exception as e:  # noqa: BLE001 - offline, missing files: one message
        raise ModelError(f"{path}: no bert/vocab.txt and the bert-base-uncased tokenizer could not be loaded "
                         f"({type(e).__name__}: {e}); put bert-base-uncased's vocab.txt in {path / 'bert'}") from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    if len(tok) != vocab_size:
        raise ModelError(f"{vocab if vocab.exists() else 'bert-base-uncased'}: the QFormer tokenizer has {len(tok)} "
                         f"ids with [DEC], the checkpoint's QFormer embeds {vocab_size}")
    return tok


# ----------------------------------------------------------------------------------------- processor


class LlamaVidProcessor(Processor):
    """Vicuna v1 prompt, CLIP preprocessing (shortest edge, center crop), 1 fps video, BERT question ids.

    `processor(question, images=..., videos=[frames or path])` takes the bare question: it builds the
    Vicuna prompt and feeds the same question to the QFormer. A prompt already formatted by
    `format_prompt` works too (pass `question=`, or the last user turn is used). Video files are
    decoded, encoded by the model's EVA and cached on disk (needs the model: `load()` wires it).
    """

    image_token = "<image>"
    takes_question = True  # generate passes the bare question along with the formatted prompt
    question_dependent_media = True  # the context tokens change with every question: chat must not reuse them

    def __init__(self, tokenizer: VicunaTokenizer, qformer_tokenizer, eos_ids: set[int], model_config: LlamaVidConfig,
                 norm: NormalizeConfig, size: int, crop: int, resample: int, model: Model | None = None,
                 cache_dir: str | os.PathLike | None = None):
        super().__init__(tokenizer, None, eos_ids)
        self.qformer_tokenizer = qformer_tokenizer
        self.config = model_config
        self.norm = norm
        self.size = size
        self.crop = crop
        self.resample = Image.Resampling(resample)
        self.model = model
        self.cache_dir = cache_dir

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model: Model) -> "LlamaVidProcessor":
        path = Path(path)
        cfg = model.config
        sp_file = path / "tokenizer.model"
        if not sp_file.exists():
            raise ModelError(f"{path}: tokenizer.model (Vicuna's SentencePiece model) is missing")
        try:
            tokenizer = VicunaTokenizer(sp_file)
        except ImportError:
            raise ModelError("LLaMA-VID's tokenizer needs sentencepiece: pip install sentencepiece protobuf") from None
        except (OSError, RuntimeError) as e:
            raise ModelError(f"{sp_file}: not a SentencePiece model ({e})") from None
        qtok = load_qformer_tokenizer(path, cfg.qformer.vocab_size)
        S = cfg.vision.image_size
        pp = read_json(path / "preprocessor_config.json") if (path / "preprocessor_config.json").exists() else {}
        size = pp.get("size", S)
        size = size.get("shortest_edge", size.get("height", S)) if isinstance(size, dict) else int(size)
        crop = pp.get("crop_size", S)
        crop = crop.get("height", S) if isinstance(crop, dict) else int(crop)
        if crop != S:
            raise ModelError(f"{path / 'preprocessor_config.json'}: images come out {crop}x{crop}, "
                             f"EVA expects {S}x{S}")
        norm = NormalizeConfig(tuple(pp.get("image_mean", CLIP_MEAN)), tuple(pp.get("image_std", CLIP_STD)),
                               pp.get("rescale_factor", 1 / 255))
        eos = {tokenizer.eos_token_id}
        gen = path / "generation_config.json"
        if gen.exists():
            e = read_json(gen).get("eos_token_id")
            eos.update(e if isinstance(e, list) else [e] if e is not None else [])
        return cls(tokenizer, qtok, eos, cfg, norm, size, crop, pp.get("resample", 3), model)

    @property
    def tokens_per_frame(self) -> int:
        return self.config.tokens_per_visual

    # --- prompt ---------------------------------------------------------------------------

    def format_prompt(self, question: str, num_images: int = 0, num_videos: int = 0, system: str | None = None,
                      history: Sequence[tuple[str, str]] | None = None) -> str:
        """Vicuna v1: `{system} USER: <image>\\n{q} ASSISTANT:`. Earlier (user, assistant) turns in `history`
        come first (`USER: q ASSISTANT: a</s>`); the visual block sits in the latest user turn, as LLaMA-VID's
        CLI moves it there on every turn."""
        text = [system if system is not None else SYSTEM_PROMPT, " "]
        for user, answer in history or []:
            text.append(f"USER: {user} ASSISTANT: {answer}{self.tokenizer.eos_token}")
        media = f"{self.image_token}\n" * (num_images + num_videos)
        text.append(f"USER: {media}{question} ASSISTANT:")
        return "".join(text)

    def _last_question(self, prompt: str) -> str:
        turn = prompt.rsplit("USER:", 1)[-1]
        turn = turn.rsplit("ASSISTANT:", 1)[0] if turn.rstrip().endswith("ASSISTANT:") else turn
        return turn.replace(self.image_token, "").strip()

    def question_ids(self, question: str) -> np.ndarray:
        """The QFormer's text: BERT ids of the question, [CLS] ... [SEP], truncated from the left to 256."""
        ids = self.qformer_tokenizer(question, truncation=True, max_length=256)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    # --- pixels ---------------------------------------------------------------------------

    def _resize(self, image: np.ndarray) -> np.ndarray:
        return imgops.resize_shortest_edge(image, self.size, self.resample)

    def frame_transform(self, image: Image.Image) -> Image.Image:
        """Resize and crop while decoding, so frames are small from the start."""
        return Image.fromarray(imgops.center_crop(self._resize(np.asarray(image.convert("RGB"))), self.crop, self.crop))

    def preprocess_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (S, S, 3): resize shortest edge, center crop, rescale, normalize."""
        return self.norm(imgops.center_crop(self._resize(image), self.crop, self.crop))

    def preprocess_video(self, frames: np.ndarray) -> np.ndarray:
        return np.stack([self.preprocess_image(f) for f in frames])

    # --- video files: stream, encode, cache ---------------------------------------------------

    def video_indices(self, path, num_frames: int | None = None, fps: float | None = None,
                      max_frames: int | None = None) -> tuple[np.ndarray, str]:
        from ..media.video import VideoError, fps_indices, probe_video, uniform_indices

        info = probe_video(path)
        if num_frames is not None:
            return uniform_indices(info.num_frames, num_frames), f"uniform:{num_frames}"
        if info.avg_fps <= 0:
            raise VideoError(f"{info.path}: frame rate unknown, sample with num_frames instead of fps")
        fps = 1.0 if fps is None else fps
        return fps_indices(info.num_frames, info.avg_fps, fps, max_frames), f"fps:{fps}:{max_frames}"

    def load_video(self, path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None,
                   max_frames: int | None = None):
        """EVA features of a video file, from the cache or computed now (decoded frame by frame).

        LLaMA-VID's rule is every round(avg_fps)-th frame (1 fps), uncapped; `fps` / `max_frames` /
        `num_frames` (uniform) change it. Returns `CachedFeatures` for `processor(..., videos=[...])`."""
        from ..media.feature_cache import FeatureCache, file_digest, iter_frames
        from ..media.video import VideoError

        if self.model is None:
            raise ModelError("LLaMA-VID needs the model to encode video files: use the processor from load()")
        p = os.fspath(path)
        if not os.path.exists(p):
            raise VideoError(f"{p}: no such file")
        indices, rule = self.video_indices(p, num_frames, fps, max_frames)
        spec = {"video": file_digest(p), "rule": rule, "vision": self.model.vision_fingerprint(),
                "size": self.size, "crop": self.crop, "mean": self.norm.mean, "std": self.norm.std,
                "rescale": self.norm.rescale, "resample": int(self.resample)}
        key = spec["video"][:24] + "-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
        cache = FeatureCache(self.cache_dir)
        entry = cache.lookup(key)
        if entry is not None:
            return entry
        if num_frames is not None:
            # Uniform sampling over a stream that may end early is re-sampled from the real frame count by the
            # shared loader (num_frames bounds the memory anyway).
            from ..media.video import load_video

            decoded, _, used = load_video(p, num_frames=num_frames, rule="uniform", transform=self.frame_transform)
            stream = iter(zip(used.tolist(), decoded))
        else:
            stream = iter_frames(p, indices, self.frame_transform)

        def batches():
            while True:
                batch = [item for _, item in zip(range(VISION_CHUNK), stream)]
                if not batch:
                    return
                feats = self.model.vision_tower(mx.array(np.stack([self.norm(f) for _, f in batch])))
                mx.eval(feats)
                yield [i for i, _ in batch], feats

        return cache.build(key, batches(), {"source": p, "rule": rule})

    def _video(self, video) -> Any:
        from ..media.feature_cache import CachedFeatures

        if isinstance(video, CachedFeatures):
            return video
        if isinstance(video, (str, os.PathLike)):
            return self.load_video(video)
        return self.preprocess_video(self._frames(video))

    # --- text + media -> arrays -------------------------------------------------------------

    def tokenize_prompt(self, text: str, counts: Sequence[int]) -> np.ndarray:
        """LLaVA's tokenizer_image_token: each chunk between `<image>`s tokenized on its own (BOS kept only
        for the first), `counts[i]` IMAGE_TOKEN_INDEX placeholders for the i-th `<image>`."""
        chunks = text.split(self.image_token)
        if len(chunks) - 1 != len(counts):
            raise InputError(f"the prompt has {len(chunks) - 1} {self.image_token} placeholder(s) but "
                             f"{len(counts)} image(s)/video(s) were given")
        ids = self.tokenizer.encode(chunks[0])
        for n, chunk in zip(counts, chunks[1:]):
            ids += [IMAGE_TOKEN_INDEX] * n + self.tokenizer.encode(chunk)[1 if self.tokenizer.add_bos else 0:]
        return np.asarray(ids, dtype=np.int32)[None]

    def __call__(self, text: str, images: Sequence[ImageLike] | None = None,
                 videos: Sequence[VideoLike] | None = None, question: str | None = None,
                 history: Sequence[tuple[str, str]] | None = None, system: str | None = None) -> dict[str, Any]:
        """`text` is the bare question (the Vicuna prompt is built here), or a prompt formatted by
        `format_prompt` (then `question=` is the QFormer text; by default the last user turn)."""
        images = [load_image(i) for i in images or []]
        vids = [self._video(v) for v in videos or []]
        formatted = self.image_token in text or text.rstrip().endswith("ASSISTANT:")
        if not formatted:
            question = text if question is None else question
            text = self.format_prompt(text, len(images), len(vids), system, history)
        elif history or system is not None:
            raise InputError("history / system apply to a bare question; this prompt is already formatted")
        if question is None:
            question = self._last_question(text)
        out: dict[str, Any] = {}
        per = self.config.tokens_per_visual
        counts = [per] * len(images)
        if images:
            out["pixel_values"] = np.stack([self.preprocess_image(i) for i in images])
        if vids:
            out["pixel_values_videos"] = vids
            counts += [per * (v.num_frames if hasattr(v, "num_frames") else len(v)) for v in vids]
        out["input_ids"] = self.tokenize_prompt(text, counts)
        out["qformer_input_ids"] = self.question_ids(question)
        return out


# ----------------------------------------------------------------------------------------- checkpoint files

EVA_PREFIX = "model.vision_tower.vision_tower."


def _has_eva(keys) -> bool:
    return any(k.startswith((EVA_PREFIX, "vision_tower.", "blocks.")) or k == "cls_token" for k in keys)


def read_weights(path: Path, config: dict, vision_weights: str | os.PathLike | None = None) -> dict[str, mx.array]:
    """All tensors of a LLaMA-VID folder, EVA included (under their stored names).

    The decoder / QFormer / projectors come from the folder's weight files (an MLX folder's safetensors, or
    the released `.bin` shards). EVA comes from those when they hold it (`model.vision_tower.vision_tower.*`,
    or `vision_tower.*` in a converted folder), else from `eva_vit_g.pth` beside config.json, else from
    `vision_weights`. A LAVIS `eva_vit_g.pth` may hold more blocks than the model runs; the depth comes from
    the config and the extra blocks are dropped when the weights are applied."""
    from ..loading import load_torch_pickle, load_weights

    weights = load_weights(path)
    if _has_eva(weights):
        if vision_weights is not None:
            warnings.warn(f"{path}: the checkpoint holds the EVA weights; {vision_weights} is not used", stacklevel=2)
        return weights
    beside = path / "eva_vit_g.pth"
    source = beside if beside.exists() else Path(vision_weights).expanduser() if vision_weights is not None else None
    if source is None:
        raise ModelError(f"{path}: the checkpoint has no EVA-ViT-G weights (model.vision_tower.vision_tower.*) and "
                         f"there is no eva_vit_g.pth beside config.json; give the file with --vision-weights PATH")
    if not source.is_file():
        raise ModelError(f"{source}: no such file (EVA-ViT-G weights)")
    weights.update({EVA_PREFIX + k: v for k, v in load_torch_pickle(source).items()})
    return weights


def preprocessor_config(image_size: int) -> dict:
    """The CLIP image processor LLaMA-VID uses (llamavid/processor/clip-patch14-{224,336})."""
    return {
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD), "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": image_size},
    }


def write_side_files(src: Path, out: Path, model: Model) -> None:
    """What load() needs besides the copied tokenizer files: bert/vocab.txt (from the source's bert/, else the
    bert-base-uncased tokenizer) and preprocessor_config.json (the CLIP processor for EVA's input size)."""
    import shutil

    bert = out / "bert"
    bert.mkdir(exist_ok=True)
    if (src / "bert").is_dir():
        for f in (src / "bert").iterdir():
            if f.is_file():
                shutil.copyfile(f, bert / f.name)
    else:
        load_qformer_tokenizer(src, model.config.qformer.vocab_size).save_vocabulary(str(bert))
    if not (out / "preprocessor_config.json").exists():
        (out / "preprocessor_config.json").write_text(
            json.dumps(preprocessor_config(model.config.vision.image_size), indent=2) + "\n")
