"""The language decoder comes from mlx-lm (Qwen2, Llama): its attention uses
`mx.fast.scaled_dot_product_attention` with mask="causal", its KV caches and
samplers are reused as they are. This module only turns a Hugging Face
`text_config` into mlx-lm's ModelArgs, loudly."""

from __future__ import annotations

import warnings
from typing import Any

import mlx.nn as nn
from mlx_lm.utils import _get_classes

from . import cpu_kernels

# Keys of a transformers config that change nothing at inference time.
GENERIC_CONFIG_KEYS = {
    "_name_or_path", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "attention_dropout", "hidden_dropout", "dropout", "attention_probs_dropout_prob",
    "hidden_dropout_prob", "output_attentions", "output_hidden_states", "return_dict",
    "id2label", "label2id", "problem_type", "tokenizer_class", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "pruned_heads", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "output_router_logits", "pretraining_tp", "mlp_bias_dropout", "layer_types",
    "use_sliding_window", "sliding_window", "max_window_layers", "initializer_factor",
    "attention_bias_dropout", "embd_pdrop", "resid_pdrop", "classifier_dropout",
}


def warn_unused_keys(section: str, config: dict, used: set[str]) -> None:
    """An unknown config key is a warning, never silently dropped: it may change the numbers."""
    for key in sorted(set(config) - used - GENERIC_CONFIG_KEYS):
        warnings.warn(
            f"config.json: {section}.{key}={config[key]!r} is not used by mlx-vidllm",
            stacklevel=3,
        )


# text_config keys that mlx-lm's ModelArgs consume (plus those handled below).
DECODER_KEYS = {
    "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings",
    "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "hidden_act",
    "head_dim", "attention_bias", "mlp_bias", "rope_traditional",
}


def decoder_args(text_config: dict, tie_word_embeddings: bool | None = None) -> dict[str, Any]:
    """Normalize a transformers text_config (v4 or v5 style) for mlx-lm."""
    cfg = dict(text_config)
    warn_unused_keys("text_config", cfg, DECODER_KEYS)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"text_config.hidden_act={cfg['hidden_act']!r}: only silu decoders are supported")
    # transformers v5 moved rope_theta/rope_scaling into rope_parameters.
    rope = cfg.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" and not cfg.get("rope_scaling"):
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "rope_theta" not in cfg:
        raise ValueError("text_config has neither rope_theta nor rope_parameters.rope_theta")
    if tie_word_embeddings is not None:
        cfg["tie_word_embeddings"] = tie_word_embeddings
    return cfg


def build_decoder(text_config: dict, tie_word_embeddings: bool | None = None) -> nn.Module:
    cfg = decoder_args(text_config, tie_word_embeddings)
    model_class, args_class = _get_classes(cfg)
    decoder = model_class(args_class.from_dict(cfg))
    cpu_kernels.install_decoder_kernels(decoder)  # MLX's CPU backend: see cpu_kernels.py
    return decoder
