"""DP-trainable self-attention for the ViT trunk's trainable tail.

Opacus trains attention through ``DPMultiheadAttention``, whose q/k/v/out projections are
plain ``nn.Linear`` layers (``qlinear``, ``klinear``, ``vlinear``, ``out_proj``) that its
per-sample-gradient hooks support; ``vit_b_16``'s LoRA targets name them. In opacus 1.6.0
its ``batch_first=True`` path reshapes the attention output wrongly (head outputs spliced
into token positions; fixed upstream in meta-pytorch/opacus#825), and torchvision's ViT
blocks use ``batch_first=True``, so a block converted with ``ModuleValidator.fix`` computes
different features (max |diff| ~1.3 per block on random inputs). :func:`to_dp_attention`
converts with the reshape done right; the projections see batch-first inputs, as Opacus'
hooks assume.
"""

from __future__ import annotations

import torch
from opacus.layers import DPMultiheadAttention
from torch import nn


class BatchFirstDPMultiheadAttention(DPMultiheadAttention):
    """``DPMultiheadAttention`` whose batch-first forward matches ``nn.MultiheadAttention``
    (the unmasked case torchvision's ``EncoderBlock`` uses; anything else: Opacus' own)."""

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        is_causal=False,
    ):
        plain = key_padding_mask is None and attn_mask is None and not is_causal
        if not (self.batch_first and plain and not self.add_bias_kv and not self.add_zero_attn):
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
            )
        n, length, dim = query.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.qlinear(query).view(n, length, heads, head_dim).transpose(1, 2)
        k = self.klinear(key).view(n, -1, heads, head_dim).transpose(1, 2)
        v = self.vlinear(value).view(n, -1, heads, head_dim).transpose(1, 2)
        weights = torch.softmax((q * head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
        weights = self.dropout(weights)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(n, length, dim))
        return out, (weights.mean(dim=1) if need_weights else None)


def to_dp_attention(mha: nn.MultiheadAttention) -> BatchFirstDPMultiheadAttention:
    """The same attention (same weights, same outputs) as Opacus-trainable Linear layers."""
    dp = BatchFirstDPMultiheadAttention(
        embed_dim=mha.embed_dim,
        num_heads=mha.num_heads,
        dropout=mha.dropout,
        bias=mha.in_proj_bias is not None,
        add_bias_kv=mha.bias_k is not None,
        add_zero_attn=mha.add_zero_attn,
        kdim=mha.kdim,
        vdim=mha.vdim,
        batch_first=mha.batch_first,
    )
    dp.load_state_dict(dict(mha.state_dict()))
    return dp.train(mha.training)
