"""LLaMA-VID's text-guided QFormer ("vlm_att"): the LAVIS / InstructBLIP Q-Former.

BERT-base layout (12 layers, width 768, 12 heads, FFN 3072, exact GELU, LayerNorm
eps 1e-12, absolute positions, no token-type embeddings). The input is
[32 learned queries ; question tokens], LayerNorm'ed; every layer runs
bidirectional self-attention over all of it, then (every 2nd layer, starting at
0) cross-attention from the query positions only to the image features, and
separate feed-forward networks for query and text positions. The image
features are `ln_vision(EVA output)` (LayerNorm eps 1e-5). The output is the
hidden state of the query positions.

Every visual input is an independent batch item with the same question, so the
text never needs padding and no attention mask is applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .blocks import activation


@dataclass
class QFormerConfig:
    # bert-base-uncased + [DEC] (LAVIS Qformer as LLaMA-VID builds it).
    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408  # = the config's mm_hidden_size
    num_query_tokens: int = 32
    vision_layer_norm_eps: float = 1e-5  # vlm_att_ln is a default nn.LayerNorm


class BertAttention(nn.Module):
    """Multi-head attention + output dense + residual LayerNorm (BertSelfAttention + BertSelfOutput)."""

    def __init__(self, dims: int, num_heads: int, kv_dims: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.query = nn.Linear(dims, dims)
        self.key = nn.Linear(kv_dims, dims)
        self.value = nn.Linear(kv_dims, dims)
        self.dense = nn.Linear(dims, dims)
        self.norm = nn.LayerNorm(dims, eps=eps)

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        ctx = x if context is None else context
        B, L, D = x.shape

        def heads(t):
            return t.reshape(B, t.shape[1], self.num_heads, -1).transpose(0, 2, 1, 3)

        out = mx.fast.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(ctx)), heads(self.value(ctx)), scale=self.scale)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, D)
        return self.norm(self.dense(out) + x)


class BertFeedForward(nn.Module):
    """BertIntermediate (fc1 + act) and BertOutput (fc2 + residual LayerNorm)."""

    def __init__(self, dims: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden)
        self.fc2 = nn.Linear(hidden, dims)
        self.norm = nn.LayerNorm(dims, eps=eps)
        self.act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.norm(self.fc2(self.act(self.fc1(x))) + x)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        d, h, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.layer_norm_eps
        self.attention = BertAttention(d, h, d, eps)
        self.has_cross_attention = index % cfg.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = BertAttention(d, h, cfg.encoder_hidden_size, eps)
        self.ffn = BertFeedForward(d, cfg.intermediate_size, cfg.hidden_act, eps)
        self.ffn_query = BertFeedForward(d, cfg.intermediate_size, cfg.hidden_act, eps)

    def __call__(self, x: mx.array, image: mx.array, num_query: int) -> mx.array:
        x = self.attention(x)
        query = x[:, :num_query]
        if self.has_cross_attention:
            query = self.crossattention(query, image)
        query = self.ffn_query(query)
        if x.shape[1] == num_query:
            return query
        return mx.concatenate([query, self.ffn(x[:, num_query:])], axis=1)


class QFormer(nn.Module):
    """(question ids, image features) -> query outputs (B, num_query, hidden)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        self.query_tokens = mx.zeros((1, cfg.num_query_tokens, cfg.hidden_size))
        self.ln_vision = nn.LayerNorm(cfg.encoder_hidden_size, eps=cfg.vision_layer_norm_eps)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = [QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers)]

    def __call__(self, input_ids: mx.array, encoder_states: mx.array) -> mx.array:
        """input_ids (L,) shared by the batch, or (B, L); encoder_states (B, N, enc) already `ln_vision`-ed.

        Returns the full last hidden state (B, num_query + L, hidden)."""
        B = encoder_states.shape[0]
        ids = input_ids if input_ids.ndim == 2 else input_ids[None]
        L = ids.shape[1]
        if L > self.config.max_position_embeddings:
            raise ValueError(f"QFormer text has {L} tokens, more than {self.config.max_position_embeddings} positions")
        text = self.word_embeddings(ids) + self.position_embeddings.weight[:L]
        text = mx.broadcast_to(text, (B, L, text.shape[-1]))
        dtype = self.embed_norm.weight.dtype
        queries = mx.broadcast_to(self.query_tokens, (B,) + self.query_tokens.shape[1:])
        x = self.embed_norm(mx.concatenate([queries.astype(dtype), text.astype(dtype)], axis=1))
        Q = self.config.num_query_tokens
        image = encoder_states.astype(dtype)
        for layer in self.layers:
            x = layer(x, image, Q)
        return x

    def query_outputs(self, input_ids: mx.array, image_features: mx.array) -> mx.array:
        """The text-guided queries for raw vision features: ln_vision, QFormer, first num_query positions."""
        enc = self.ln_vision(image_features.astype(self.ln_vision.weight.dtype))
        return self(input_ids, enc)[:, :self.config.num_query_tokens]
