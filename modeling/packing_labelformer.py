"""Padding-free encoder: per-token work on the real tokens of a padded batch only (not in the paper).

This file is copied into saved model folders and must only import our own code relatively.
"""

from __future__ import annotations

from typing import Any

import torch


class TokenPacking:
    """Where the real tokens of a right- or left-padded batch are, to skip padding in per-token work.

    Every encoder computation except attention itself treats tokens independently (projections,
    feed-forward, LayerNorm, dropout, residuals), so the encoder runs them on the ``n`` real tokens
    of a ``[b, s]`` batch packed into ``[n, d]`` and scatters back to ``[b, s, ...]`` only around
    attention. Real positions get the same values as the padded computation (up to float rounding);
    padding positions come out as zeros. On Reuters batches of 128 tokens about a quarter of all
    positions are padding.

    Args:
        attention_mask: ``[b, s]``, 1 for real tokens and 0 for padding.
    """

    def __init__(self, attention_mask: torch.Tensor) -> None:
        self.batch, self.length = attention_mask.shape
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1)  # [n] into the flat b * s positions

    @property
    def num_tokens(self) -> int:
        """``n``, the number of real tokens."""
        return self.index.numel()

    def pack(self, states: torch.Tensor) -> torch.Tensor:
        """``[b, s, ...]`` -> ``[n, ...]`` (the real tokens, in row-major order)."""
        return states.reshape(self.batch * self.length, *states.shape[2:]).index_select(0, self.index)

    def unpack(self, states: torch.Tensor) -> torch.Tensor:
        """``[n, ...]`` -> ``[b, s, ...]`` with zeros at padding positions (differentiable)."""
        flat = states.new_zeros(self.batch * self.length, *states.shape[1:]).index_copy(0, self.index, states)
        return flat.view(self.batch, self.length, *states.shape[1:])


def token_packing(attention_mask: torch.Tensor | None) -> TokenPacking | None:
    """A `TokenPacking` when the ``[b, s]`` mask has padding, else ``None``.

    Off while compiling, tracing or capturing a CUDA graph: the number of real tokens is data
    dependent, which those need to be static.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    if attention_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    packing = TokenPacking(attention_mask)
    return packing if packing.num_tokens < attention_mask.numel() else None


def packed_self_attention(
    attention: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    packing: TokenPacking,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`LabelformerAttention` self-attention of packed ``[n, d_model]`` tokens: project packed, attend padded
    ``[b, h, s, d_k]``, project packed. Returns ``[n, d_model]`` and the attention probabilities."""
    query, key, value = (
        attention._split_heads(packing.unpack(proj(hidden_states)))  # [b, h, s, d_k]
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    output, weights = attention._attend(query, key, value, attention_mask, **kwargs)  # [b, s, h, d_k]
    output = packing.pack(output.reshape(packing.batch, packing.length, -1))  # [n, d_model]
    return attention.out_proj(output), weights


__all__ = ["TokenPacking", "packed_self_attention", "token_packing"]
