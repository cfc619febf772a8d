"""Transformer encoder layers run on the attended tokens only.

``nn.TransformerEncoder`` computes every position of a padded batch: the layer norms, the
query/key/value and output projections and the feed-forward network also run on padding, which
changes nothing. :func:`encoder_on_attended` runs the same layers (the same modules and weights,
so checkpoints are unchanged) with every per-token part on the attended tokens alone; only the
attention itself sees the padded layout. After packing, about 40% of the fusion's sequence is
still padding; on a batch of 64 rows of 30 to 115 tokens (two threads) the two default fusion
layers' forward + backward went from 72 to 57 ms and their inference from 36 to 20 ms.

It also calls the output projection as a module, so LoRA adapters on ``self_attn.out_proj``
take effect: ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly and bypassed them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meddx.errors import ModelError


def encoder_on_attended(encoder: nn.TransformerEncoder, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
    """``encoder(x, src_key_padding_mask=~attend)`` for pre-norm, batch-first layers; padding comes out 0.

    Args:
        encoder: layers built with ``norm_first=True`` and ``batch_first=True``.
        x: ``(B, L, D)`` tokens.
        attend: bool ``(B, L)``, True where a token takes part; every row needs at least one.

    Returns:
        ``(B, L, D)``: the encoder's output at attended positions, zeros elsewhere.
    """
    B, L, d = x.shape
    positions = attend.flatten().nonzero().flatten()  # (N,) attended positions in the flattened batch
    tokens = x.reshape(B * L, d).index_select(0, positions)  # (N, D); index_select: a cheaper backward than [ ]
    key_mask = attend[:, None, None, :]  # (B, 1, 1, L): queries may look at attended keys only
    for layer in encoder.layers:
        if not layer.norm_first or not layer.self_attn._qkv_same_embed_dim:
            raise ModelError("encoder_on_attended needs pre-norm layers with one input projection")
        attended = _self_attention(layer.self_attn, layer.norm1(tokens), positions, key_mask, (B, L))
        tokens = tokens + layer.dropout1(attended)
        feed_forward = layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(tokens)))))
        tokens = tokens + layer.dropout2(feed_forward)
    if encoder.norm is not None:
        tokens = encoder.norm(tokens)
    return tokens.new_zeros(B * L, tokens.shape[-1]).index_copy(0, positions, tokens).view(B, L, -1)


def _self_attention(
    attention: nn.MultiheadAttention,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    key_mask: torch.Tensor,
    shape: tuple[int, int],
) -> torch.Tensor:
    """Multi-head self-attention of attended ``tokens`` ``(N, D)`` placed at ``positions`` of a ``(B, L)`` batch."""
    B, L = shape
    heads = attention.num_heads
    qkv = F.linear(tokens, attention.in_proj_weight, attention.in_proj_bias)  # (N, 3D)
    padded = qkv.new_zeros(B * L, qkv.shape[-1]).index_copy(0, positions, qkv)
    q, k, v = padded.view(B, L, 3, heads, -1).permute(2, 0, 3, 1, 4)  # each (B, H, L, D / H)
    dropout = attention.dropout if attention.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)  # (B, H, L, D / H)
    return attention.out_proj(out.transpose(1, 2).reshape(B * L, -1).index_select(0, positions))  # (N, D)
