"""Labelformer: the Transformer encoder-decoder of "Attention Is All You Need" (Vaswani et al., 2017).

One small module per concept of the paper (section numbers in the docstrings refer to it), then
`LabelformerModel` (bare encoder-decoder) and `LabelformerForConditionalGeneration` (LM head).

Mask convention: users pass the usual 1/0 ``attention_mask`` (1 = real token, 0 = padding) of
shape ``[batch, length]``. Each stack converts it exactly once, at its entry, with
``transformers.masking_utils`` into what the configured attention backend expects (``None`` when
nothing is masked, a boolean or an additive float mask otherwise); layers pass it down unchanged.

This file is copied into saved model folders and must only import our own code relatively.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_labelformer import LabelformerConfig
from .decoding_labelformer import (
    CACHE_OUTPUT_FIELD,
    FastGenerationMixin,
    StaticDecodingCache,
    generation_cache,
    output_cache,
)
from .loading_labelformer import StrictLoadingMixin
from .packing_labelformer import TokenPacking, packed_self_attention, token_packing

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------
# Embeddings and positions (section 3.4, 3.5)
# ---------------------------------------------------------------------------------------------


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    Args:
        positions: ``[length]`` integer positions.
        dim: model width ``d``.

    Returns:
        ``[length, dim]`` float32 table, sines on even and cosines on odd channels.
    """
    half = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)  # 2i
    inv_freq = torch.exp(-math.log(10000.0) * half / dim)  # 1 / 10000^(2i/d)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [L, ceil(d/2)]
    table = torch.zeros(positions.numel(), dim, dtype=torch.float32, device=positions.device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return table


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal positions (paper 3.5); any length works, past the precomputed table too.

    The table is a non-persistent buffer: it is not saved, and `_init_weights` rebuilds it after
    `from_pretrained` (which otherwise leaves non-persistent buffers uninitialised).
    """

    def __init__(self, config: LabelformerConfig) -> None:
        super().__init__()
        self.dim = config.d_model
        self.register_buffer("table", self.build_table(config.max_position_embeddings), persistent=False)

    def build_table(self, length: int, device: torch.device | None = None) -> torch.Tensor:
        """``[length, d_model]`` encodings of positions ``0 .. length - 1``."""
        return sinusoidal_table(torch.arange(length, device=device), self.dim)

    def forward(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        """Encodings of positions ``offset .. offset + seq_len - 1``: ``[seq_len, d_model]``."""
        end = offset + seq_len
        if end <= self.table.shape[0]:
            return self.table[offset:end]
        # Longer than anything seen at construction: compute the rows directly (extrapolation).
        positions = torch.arange(offset, end, device=self.table.device)
        return sinusoidal_table(positions, self.dim).to(self.table.dtype)


class LearnedPositionalEmbedding(nn.Module):
    """Learned absolute positions (the paper's alternative in 3.5), up to ``max_position_embeddings``."""

    def __init__(self, config: LabelformerConfig) -> None:
        super().__init__()
        self.max_positions = config.max_position_embeddings
        self.weight = nn.Parameter(torch.empty(config.max_position_embeddings, config.d_model))

    def forward(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        """Embeddings of positions ``offset .. offset + seq_len - 1``: ``[seq_len, d_model]``."""
        if offset + seq_len > self.max_positions:
            raise ValueError(
                f"Sequence reaches position {offset + seq_len} but learned positions stop at "
                f"`max_position_embeddings`={self.max_positions}; truncate the input or use "
                "position_embedding_type='sinusoidal', which extrapolates."
            )
        return self.weight[offset : offset + seq_len]


class LabelformerEmbeddings(nn.Module):
    """Token embedding times sqrt(d_model) plus positional encoding, then dropout (paper 3.4)."""

    def __init__(self, config: LabelformerConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        positions_cls = (
            SinusoidalPositionalEncoding
            if config.position_embedding_type == "sinusoidal"
            else LearnedPositionalEmbedding
        )
        self.embed_positions = positions_cls(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, offset: int = 0
    ) -> torch.Tensor:
        """``[b, s]`` token ids (or ``[b, s, d]`` embeddings) -> ``[b, s, d]`` with positions from ``offset``."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = inputs_embeds * self.embed_scale
        hidden_states = hidden_states + self.embed_positions(hidden_states.shape[1], offset).to(hidden_states.dtype)
        return self.dropout(hidden_states)


# ---------------------------------------------------------------------------------------------
# Attention (section 3.2)
# ---------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention, softmax(Q K^T / sqrt(d_k)) V (paper 3.2.1, equation 1).

    Args:
        query: ``[b, h, q, d_k]``; key, value: ``[b, h, k, d_k]``.
        attention_mask: ``None``, a boolean ``[b, 1, q, k]`` mask (True = may attend) or an
            additive float mask of that shape (0 or a large negative number).
        scaling: ``1 / sqrt(d_k)``.

    Returns:
        ``[b, q, h, d_k]`` outputs and ``[b, h, q, k]`` attention probabilities.
    """
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [b, h, q, k]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    # Softmax in float32 so that half-precision scores do not overflow.
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()  # [b, q, h, d_k]
    return output, probs


class LabelformerAttention(nn.Module):
    """Multi-head attention (paper 3.2.2): h parallel heads of scaled dot-product attention.

    ``MultiHead(Q, K, V) = Concat(head_1..head_h) W^O`` with ``head_i = Attention(Q W^Q_i, K W^K_i, V W^V_i)``;
    the per-head projections are stored as one ``d_model x d_model`` matrix each (``q_proj``,
    ``k_proj``, ``v_proj``), then split into heads. The same module serves encoder self-attention,
    masked (causal) decoder self-attention and cross-attention (keys/values from the encoder).
    """

    def __init__(
        self, config: LabelformerConfig, num_heads: int, layer_idx: int | None = None, is_causal: bool = False
    ) -> None:
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = config.d_model // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.layer_idx = layer_idx
        # The SDPA integration assumes causal when this is missing, so always set it.
        self.is_causal = is_causal
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        """``[b, s, d_model]`` -> ``[b, h, s, d_k]``."""
        return states.view(*states.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def _keys_values(
        self, states: torch.Tensor, cache: EncoderDecoderCache | None, is_cross_attention: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project (or fetch from the cache) keys and values, each ``[b, h, k, d_k]``."""
        if cache is None:
            return self._split_heads(self.k_proj(states)), self._split_heads(self.v_proj(states))
        if is_cross_attention:
            layer_cache = cache.cross_attention_cache
            # Encoder keys/values never change during generation: project them once.
            if cache.is_updated.get(self.layer_idx):
                return layer_cache.layers[self.layer_idx].keys, layer_cache.layers[self.layer_idx].values
            cache.is_updated[self.layer_idx] = True
        else:
            layer_cache = cache.self_attention_cache
        key = self._split_heads(self.k_proj(states))
        value = self._split_heads(self.v_proj(states))
        return layer_cache.update(key, value, self.layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        packing: TokenPacking | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``hidden_states`` to itself, or to ``key_value_states`` (cross-attention).

        Args:
            hidden_states: queries' source, ``[b, q, d_model]``, or ``[n, d_model]`` packed real
                tokens when ``packing`` is given (self-attention only).
            key_value_states: encoder output ``[b, k, d_model]`` for cross-attention, else ``None``.
            attention_mask: the prepared mask for the configured backend (see module docstring).
            cache: the generation cache, or ``None``.
            packing: the `TokenPacking` of packed ``hidden_states``: projections run on the real
                tokens, attention on the padded ``[b, h, s, d_k]`` layout.

        Returns:
            ``[b, q, d_model]`` (``[n, d_model]`` when packed) and the attention probabilities
            (``None`` for fused kernels).
        """
        if packing is not None:
            return packed_self_attention(self, hidden_states, attention_mask, packing, **kwargs)
        is_cross_attention = key_value_states is not None
        query = self._split_heads(self.q_proj(hidden_states))  # [b, h, q, d_k]
        source = key_value_states if is_cross_attention else hidden_states
        key, value = self._keys_values(source, cache, is_cross_attention)  # [b, h, k, d_k]
        output, weights = self._attend(query, key, value, attention_mask, **kwargs)  # [b, q, h, d_k]
        output = output.reshape(*hidden_states.shape[:-1], -1).contiguous()  # concat heads: [b, q, d_model]
        return self.out_proj(output), weights

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The configured attention backend on ``[b, h, q|k, d_k]`` -> ``[b, q, h, d_k]`` and probabilities."""
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )


# ---------------------------------------------------------------------------------------------
# Feed-forward, Add & Norm (sections 3.3, 3.1)
# ---------------------------------------------------------------------------------------------


class LabelformerFeedForward(nn.Module):
    """Position-wise FFN(x) = act(x W_1 + b_1) W_2 + b_2 with act = ReLU (paper 3.3) or GELU."""

    def __init__(self, config: LabelformerConfig, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, ffn_dim)
        self.activation = nn.ReLU() if config.activation_function == "relu" else nn.GELU()
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.fc2 = nn.Linear(ffn_dim, config.d_model)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[b, s, d_model]`` -> ``[b, s, d_model]``."""
        return self.fc2(self.activation_dropout(self.activation(self.fc1(hidden_states))))


class SublayerConnection(nn.Module):
    """Residual connection and LayerNorm around one sub-layer (paper 3.1 and 5.4).

    Post-norm (the paper): ``LayerNorm(x + Dropout(Sublayer(x)))``.
    Pre-norm (option, trains deep stacks more stably): ``x + Dropout(Sublayer(LayerNorm(x)))``.
    The unused position is an ``nn.Identity``, so the forward has no branch on the option.
    """

    def __init__(self, config: LabelformerConfig) -> None:
        super().__init__()
        pre = config.norm_position == "pre"
        self.pre_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if pre else nn.Identity()
        self.post_norm = nn.Identity() if pre else nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor, sublayer: Callable[[torch.Tensor], Any]) -> tuple[torch.Tensor, Any]:
        """Apply ``sublayer`` to ``[b, s, d]``; a sub-layer may return ``(output, extra)``, extra is passed back."""
        output = sublayer(self.pre_norm(hidden_states))
        output, extra = output if isinstance(output, tuple) else (output, None)
        return self.post_norm(hidden_states + self.dropout(output)), extra


# ---------------------------------------------------------------------------------------------
# Layers and stacks (section 3.1)
# ---------------------------------------------------------------------------------------------


class LabelformerEncoderLayer(GradientCheckpointingLayer):
    """Encoder block: self-attention, then the feed-forward network, each inside Add & Norm."""

    def __init__(self, config: LabelformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LabelformerAttention(config, config.encoder_attention_heads, layer_idx, is_causal=False)
        self.self_attn_sublayer = SublayerConnection(config)
        self.feed_forward = LabelformerFeedForward(config, config.encoder_ffn_dim)
        self.feed_forward_sublayer = SublayerConnection(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        packing: TokenPacking | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[b, s, d]`` (or ``[n, d]`` packed, see `TokenPacking`) -> same shape, plus self-attention probabilities."""
        hidden_states, attn = self.self_attn_sublayer(
            hidden_states, lambda x: self.self_attn(x, attention_mask=attention_mask, packing=packing, **kwargs)
        )
        hidden_states, _ = self.feed_forward_sublayer(hidden_states, self.feed_forward)
        return hidden_states, attn


class LabelformerDecoderLayer(GradientCheckpointingLayer):
    """Decoder block: masked self-attention, cross-attention to the encoder, feed-forward.

    ``causal=False`` gives the non-autoregressive variant (all positions see each other).
    """

    def __init__(self, config: LabelformerConfig, layer_idx: int, causal: bool = True) -> None:
        super().__init__()
        heads = config.decoder_attention_heads
        self.self_attn = LabelformerAttention(config, heads, layer_idx, is_causal=causal)
        self.self_attn_sublayer = SublayerConnection(config)
        self.cross_attn = LabelformerAttention(config, heads, layer_idx, is_causal=False)
        self.cross_attn_sublayer = SublayerConnection(config)
        self.feed_forward = LabelformerFeedForward(config, config.decoder_ffn_dim)
        self.feed_forward_sublayer = SublayerConnection(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``[b, t, d]`` decoder states and ``[b, s, d]`` encoder states -> ``[b, t, d]`` plus both attentions."""
        hidden_states, self_attn = self.self_attn_sublayer(
            hidden_states,
            lambda x: self.self_attn(x, attention_mask=attention_mask, cache=cache, **kwargs),
        )
        hidden_states, cross_attn = self.cross_attn_sublayer(
            hidden_states,
            lambda x: self.cross_attn(x, encoder_hidden_states, attention_mask=encoder_attention_mask, cache=cache),
        )
        hidden_states, _ = self.feed_forward_sublayer(hidden_states, self.feed_forward)
        return hidden_states, self_attn, cross_attn


def _final_norm(config: LabelformerConfig) -> nn.Module:
    """Pre-norm stacks end with a LayerNorm (the residual stream is otherwise never normalised)."""
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.norm_position == "pre" else nn.Identity()


class LabelformerEncoder(nn.Module):
    """N encoder layers over embedded source tokens (paper figure 1, left)."""

    def __init__(self, config: LabelformerConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.config = config
        self.embeddings = LabelformerEmbeddings(config, embed_tokens)
        self.layers = nn.ModuleList(LabelformerEncoderLayer(config, i) for i in range(config.encoder_layers))
        self.final_norm = _final_norm(config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> BaseModelOutput:
        """``[b, s]`` ids and 1/0 mask -> ``last_hidden_state`` ``[b, s, d]``.

        With a padded batch, the layers run on the real tokens only
        (`TokenPacking`); padding positions of the outputs are then zeros.
        """
        hidden_states = self.embeddings(input_ids, inputs_embeds)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
        packing = token_packing(attention_mask)
        padded = packing.unpack if packing is not None else (lambda states: states)
        if packing is not None:
            hidden_states = packing.pack(hidden_states)  # [n, d]
        all_hidden, all_attn = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(padded(hidden_states))
            hidden_states, attn = layer(hidden_states, mask, packing=packing, **kwargs)
            all_attn.append(attn)
        hidden_states = padded(self.final_norm(hidden_states))
        all_hidden.append(hidden_states)
        return BaseModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )


class LabelformerDecoder(nn.Module):
    """N decoder layers: causal self-attention, cross-attention, FFN (paper figure 1, right).

    With ``causal=False`` self-attention is bidirectional: the parallel (non-autoregressive) label
    decoder feeds it slot ids instead of previous tokens.
    """

    def __init__(self, config: LabelformerConfig, embed_tokens: nn.Embedding, causal: bool = True) -> None:
        super().__init__()
        self.config = config
        self.causal = causal
        self.embeddings = LabelformerEmbeddings(config, embed_tokens)
        self.layers = nn.ModuleList(
            LabelformerDecoderLayer(config, i, causal=causal) for i in range(config.decoder_layers)
        )
        self.final_norm = _final_norm(config)

    def decode_step(self, input_ids: torch.Tensor, cache: StaticDecodingCache, step: int) -> torch.Tensor:
        """Decoding step ``step`` with a `StaticDecodingCache`: ``[b, 1]`` token ids -> ``[b, d]`` final states.

        Runs the same layers as `forward` with fixed shapes and no mask construction (self-attention
        writes cache slot ``step`` and reads the first ``step + 1`` slots; cross-attention uses the
        cached padding mask). Supports the eager and SDPA attention backends.
        """
        if self.config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError(
                f"decode_step supports the 'eager' and 'sdpa' attention backends, not "
                f"{self.config._attn_implementation!r}; use generate() instead."
            )
        cache.step = step
        hidden_states = self.embeddings(input_ids, offset=step)
        for layer in self.layers:
            hidden_states, _, _ = layer(hidden_states, cache.encoder_states, None, cache.cross_mask, cache)
        return self.final_norm(hidden_states)[:, -1]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        cache: EncoderDecoderCache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """``[b, t]`` target ids attending to ``[b, s, d]`` encoder states -> ``[b, t, d]``.

        With a cache (``cache``, or ``past_key_values`` as transformers < 5.24 names it),
        ``input_ids`` holds only the new tokens; their positions continue after the cached ones.
        """
        cache = generation_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        # sized by this decoder's own first layer (an ensemble's members share one cache, each with its own layers)
        first_layer = self.layers[0].self_attn.layer_idx
        past_length = cache.get_seq_length(first_layer) if cache is not None else 0
        hidden_states = self.embeddings(input_ids, inputs_embeds, offset=past_length)
        if attention_mask is None and past_length > 0:
            attention_mask = torch.ones(
                hidden_states.shape[0], past_length + hidden_states.shape[1], device=hidden_states.device
            )
        if self.causal:
            # The cache is positional: its keyword is `past_key_values` before 5.24 and `cache` after.
            self_mask = create_causal_mask(
                self.config, hidden_states, attention_mask, cache.self_attention_cache if cache is not None else None,
                layer_idx=first_layer,
            )  # fmt: skip
        else:
            self_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
            )
        cross_mask = create_bidirectional_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=encoder_attention_mask,
            encoder_hidden_states=encoder_hidden_states,
        )
        all_hidden, all_self, all_cross = [], [], []
        for layer in self.layers:
            all_hidden.append(hidden_states)
            hidden_states, self_attn, cross_attn = layer(
                hidden_states, encoder_hidden_states, self_mask, cross_mask, cache, **kwargs
            )
            all_self.append(self_attn)
            all_cross.append(cross_attn)
        hidden_states = self.final_norm(hidden_states)
        all_hidden.append(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            **{CACHE_OUTPUT_FIELD: cache if use_cache else None},
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_self) if output_attentions else None,
            cross_attentions=tuple(all_cross) if output_attentions else None,
        )


# ---------------------------------------------------------------------------------------------
# Hugging Face models
# ---------------------------------------------------------------------------------------------


class LabelformerPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    """Weight initialisation, backend support flags and weight tying shared by all heads."""

    config_class = LabelformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LabelformerEncoderLayer", "LabelformerDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False
    # Trainer must not pass `num_items_in_batch`: our losses are means over the batch's tokens.
    accepts_loss_kwargs = False
    #: Whether this class holds ``config.ensemble_size`` Transformers (every other class holds one).
    holds_ensemble = False

    def __init__(self, config: LabelformerConfig, *args: Any, **kwargs: Any) -> None:
        if config.ensemble_size != 1 and not self.holds_ensemble:
            raise ValueError(
                f"This config describes an ensemble of {config.ensemble_size} Transformers: load it with "
                "AutoModelForSeq2SeqLM (LabelformerEnsembleForMultiLabelGeneration); member k alone is model.member(k)."
            )
        super().__init__(config, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LearnedPositionalEmbedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, SinusoidalPositionalEncoding):
            # Non-persistent: never in a checkpoint, so rebuild it here after loading.
            init.copy_(module.table, module.build_table(module.table.shape[0], module.table.device))

    def quantize_int8(self) -> LabelformerPreTrainedModel:
        """A copy for CPU inference whose encoder and decoder linear layers compute in int8.

        PyTorch's dynamic quantization: each ``nn.Linear`` inside the encoder and decoder stacks gets
        int8 weights (one scale per matrix, computed once here) and quantizes its input per call with
        one scale for the whole batch (VNNI / AVX-512 kernels where the CPU has them), so a text's
        probabilities can move in the third decimal with the texts it is batched with. Embeddings,
        the output projection and the head's own layers (label attention, classifiers, the lexical
        part) stay fp32. This model is left unchanged; the copy runs on the CPU in fp32 only (no bf16
        on top) and cannot be saved (save the model it was made from). What it gains and costs in
        quality is in the README's Speed section.
        """
        devices = {p.device.type for p in self.parameters()}
        if devices != {"cpu"}:
            raise ValueError(
                f"quantize_int8 makes a CPU model; this one has weights on {sorted(devices)}. Quantize a CPU copy: "
                "copy.deepcopy(model).cpu().quantize_int8()."
            )
        dtypes = {p.dtype for p in self.parameters()}
        if dtypes != {torch.float32}:
            raise ValueError(
                f"quantize_int8 quantizes fp32 weights; this model has {sorted(map(str, dtypes))}. Quantize an fp32 "
                "copy: copy.deepcopy(model).float().quantize_int8()."
            )
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError as error:  # deprecated in torch 2.10, still present in 2.13
            raise RuntimeError(
                f"quantize_int8 needs torch.ao.quantization.quantize_dynamic, which torch {torch.__version__} "
                "does not have; use bf16 instead: predict_labels(..., dtype=torch.bfloat16)."
            ) from error
        if torch.backends.quantized.engine == "none":
            raise RuntimeError(
                "This PyTorch build has no quantized CPU engine (torch.backends.quantized.engine is 'none'), so "
                "int8 cannot run here; use bf16 instead: predict_labels(..., dtype=torch.bfloat16)."
            )
        clone = copy.deepcopy(self).eval()
        stacks = [m for m in clone.modules() if isinstance(m, (LabelformerEncoder, LabelformerDecoder))]
        with warnings.catch_warnings():  # torch.ao's own deprecation notices: the API is what this method wraps
            warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
            for stack in stacks:
                quantize_dynamic(stack, {nn.Linear}, dtype=torch.qint8, inplace=True)
        clone.is_int8_copy = True
        return clone


class LabelformerModel(LabelformerPreTrainedModel):
    """The bare encoder-decoder; returns the decoder's last hidden states (`Seq2SeqModelOutput`)."""

    def __init__(self, config: LabelformerConfig) -> None:
        super().__init__(config)
        encoder_embed = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        decoder_embed = (
            encoder_embed
            if config.share_embeddings
            else nn.Embedding(config.decoder_vocab_size, config.d_model, padding_idx=config.pad_token_id)
        )
        self.encoder = LabelformerEncoder(config, encoder_embed)
        self.decoder = LabelformerDecoder(config, decoder_embed)
        self.post_init()

    def _tied_keys(self) -> dict[str, str]:
        if self.config.share_embeddings:
            return {"decoder.embeddings.embed_tokens.weight": "encoder.embeddings.embed_tokens.weight"}
        return {}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embeddings.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embeddings.embed_tokens = value
        if self.config.share_embeddings:
            self.decoder.embeddings.embed_tokens = value

    def get_encoder(self, modality: str | None = None) -> LabelformerEncoder:
        return self.encoder

    def get_decoder(self) -> LabelformerDecoder:
        return self.decoder

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: EncoderDecoderCache | None = None,
        **kwargs: Any,
    ) -> Seq2SeqModelOutput:
        """Encode ``[b, s]`` source ids (unless ``encoder_outputs`` is given) and decode ``[b, t]`` target ids.

        Returns:
            `Seq2SeqModelOutput` with ``last_hidden_state`` ``[b, t, d_model]`` and
            ``encoder_last_hidden_state`` ``[b, s, d_model]``.
        """
        output_attentions = bool(output_attentions if output_attentions is not None else self.config.output_attentions)
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids, attention_mask, inputs_embeds,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            )  # fmt: skip
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError(
                "LabelformerModel needs `decoder_input_ids` (or `labels` on a head, which builds them by shifting)."
            )
        decoder_outputs = self.decoder(
            decoder_input_ids, encoder_outputs.last_hidden_state, attention_mask=decoder_attention_mask,
            encoder_attention_mask=attention_mask, cache=generation_cache(cache, past_key_values),
            inputs_embeds=decoder_inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state, **{CACHE_OUTPUT_FIELD: output_cache(decoder_outputs)},
            decoder_hidden_states=decoder_outputs.hidden_states, decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions, encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state, encoder_attentions=encoder_outputs.attentions,
        )  # fmt: skip


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Teacher forcing inputs: ``[start, y_1, ..., y_{n-1}]`` from labels ``[y_1, ..., y_n]`` (``[b, t]``).

    Positions ignored by the loss (-100) become padding.
    """
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


def sequence_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy of ``[b, t, v]`` logits against ``[b, t]`` labels; -100 is ignored."""
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )


class LabelformerForConditionalGeneration(LabelformerPreTrainedModel, FastGenerationMixin, GenerationMixin):
    """Encoder-decoder with a linear + softmax output layer over the decoder vocabulary (paper 3.4).

    Trained with teacher forcing: give ``labels`` ``[b, t]`` (-100 = ignore) and the decoder
    inputs are the labels shifted right behind ``decoder_start_token_id``. Generates with
    ``generate()`` (greedy, beam search, sampling; with or without the KV cache).
    """

    def __init__(self, config: LabelformerConfig) -> None:
        super().__init__(config)
        self.model = LabelformerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.decoder_vocab_size, bias=False)
        #: Route plain greedy `generate()` calls through `greedy_generate` (same tokens, less overhead).
        self.fast_greedy_generate = True
        self.post_init()

    def _tied_keys(self) -> dict[str, str]:
        if not self.config.tie_word_embeddings:
            return {}
        source = "encoder" if self.config.share_embeddings else "decoder"
        return {"lm_head.weight": f"model.{source}.embeddings.embed_tokens.weight"}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_encoder(self, modality: str | None = None) -> LabelformerEncoder:
        return self.model.encoder

    def get_decoder(self) -> LabelformerDecoder:
        return self.model.decoder

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Used by `DataCollatorForSeq2Seq`: labels ``[b, t]`` -> decoder inputs ``[b, t]``."""
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: EncoderDecoderCache | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        """Returns ``logits`` ``[b, t, decoder_vocab_size]`` and, with ``labels``, the mean cross-entropy ``loss``."""
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        outputs = self.model(
            input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
            cache=generation_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            # Our own seq2seq loss: `self.loss_function` would be the causal-LM loss, which shifts.
            loss = sequence_cross_entropy(logits, labels, self.config.label_smoothing)
        return Seq2SeqLMOutput(
            loss=loss, logits=logits, **{CACHE_OUTPUT_FIELD: output_cache(outputs)},
            decoder_hidden_states=outputs.decoder_hidden_states, decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions, encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states, encoder_attentions=outputs.encoder_attentions,
        )  # fmt: skip


__all__ = [
    "LabelformerAttention",
    "LabelformerDecoder",
    "LabelformerDecoderLayer",
    "LabelformerEmbeddings",
    "LabelformerEncoder",
    "LabelformerEncoderLayer",
    "LabelformerFeedForward",
    "LabelformerForConditionalGeneration",
    "LabelformerModel",
    "LabelformerPreTrainedModel",
    "LearnedPositionalEmbedding",
    "SinusoidalPositionalEncoding",
    "SublayerConnection",
    "eager_attention_forward",
    "shift_tokens_right",
    "sinusoidal_table",
]
