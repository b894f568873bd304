"""Several label-generation Transformers in one model: their averaged probabilities decide.

`LabelformerEnsembleForMultiLabelGeneration` holds ``config.ensemble_size`` encoder-decoders of one
shape (`LabelformerForMultiLabelGeneration` each, trained separately, e.g. with different seeds, on one
tokenizer and label set) and the optional lexical part. Its ``forward()`` returns, at every position,
the log of the members' mean probability (each member with its own document label logits) plus the
lexical part's scaled margins; ``generate()``, `predict_labels`, the pipeline and Trainer decode those
logits under the label-set rules, like the single model's. Build one with `from_members`; get one
member back, alone, with `member`.

This file is copied into saved model folders and must only import our own code relatively.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from .configuration_labelformer import LabelformerConfig
from .decoding_labelformer import (
    CACHE_OUTPUT_FIELD,
    FastGenerationMixin,
    ensemble_log_probs,
    generation_cache,
    greedy_label_decoder,
)
from .generation_labelformer import (
    LabelEncoderOutput,
    LabelformerForMultiLabelGeneration,
    LabelGenerationMixin,
    label_row_bias,
)
from .modeling_labelformer import LabelformerPreTrainedModel, sequence_cross_entropy, shift_tokens_right
from .prediction_labelformer import MultiLabelPredictionMixin, lexical_scorer_of

#: Config fields members may differ in: bookkeeping, and training-only settings that do not shape an answer.
MEMBER_FREE_FIELDS = frozenset({
    "architectures", "auto_map", "custom_pipelines", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
    "lexical_scorer", "ensemble_size", "init_std", "dropout", "attention_dropout", "activation_dropout",
    "label_smoothing",
})  # fmt: skip


@dataclass
class EnsembleEncoderOutput(BaseModelOutput):
    """What the ensemble's encoding step returns (`generate()` carries it to every step and expands it for
    beam search): ``last_hidden_state`` ``[b, s, K * d]`` (the members' encoder states side by side),
    ``label_logits`` ``[b, K, num_labels]`` (each member's document label logits) and ``lexical_logits``
    ``[b, num_labels]`` (the lexical part's scaled margins; ``None`` without one)."""

    label_logits: torch.FloatTensor | None = None
    lexical_logits: torch.FloatTensor | None = None


def member_config(config: LabelformerConfig) -> LabelformerConfig:
    """The config of one member of an ensemble with ``config``: one Transformer, no lexical part."""
    return LabelformerConfig.from_dict({**config.to_dict(), "ensemble_size": 1, "lexical_scorer": False})


class LabelformerEnsembleForMultiLabelGeneration(
    LabelGenerationMixin, MultiLabelPredictionMixin, LabelformerPreTrainedModel, FastGenerationMixin, GenerationMixin
):
    """``config.ensemble_size`` label-generation Transformers whose mean probability decides.

    Each member reads the document with its own encoder and adds its own document label logits (its
    document classifier and label attention) to its decoder's logits. At every position ``forward()``
    returns ``log(mean_k softmax(member_k logits))`` plus the lexical part's margins when the model has
    one, so ``softmax(logits)`` is the members' mean distribution reweighted by the lexical part (with one
    member this is exactly `LabelformerForMultiLabelGeneration`'s answer). Decoding applies the label-set
    rules to these logits; the greedy fast path runs every member's cached decoder step in one loop.

    Members are trained separately (`from_members`); a loss from ``labels`` is the cross-entropy of the
    combined logits (for evaluation: training the members jointly through it is not what they were
    measured with). Inputs are token ids: each member embeds them with its own embeddings.
    """

    base_model_prefix = "members"
    holds_ensemble = True
    _no_split_modules = ["LabelformerEncoderLayer", "LabelformerDecoderLayer"]

    def __init__(self, config: LabelformerConfig) -> None:
        if config.ensemble_size < 2:
            raise ValueError(
                f"An ensemble needs `ensemble_size` >= 2 (got {config.ensemble_size}); one Transformer is a "
                "LabelformerForMultiLabelGeneration."
            )
        super().__init__(config)
        single = member_config(config)
        single._attn_implementation = config._attn_implementation  # the backend asked for runs in every member
        self.members = nn.ModuleList(LabelformerForMultiLabelGeneration(single) for _ in range(config.ensemble_size))
        # One generation cache holds every member's decoder layers: member k's are layers k * L ... k * L + L - 1.
        for k, member in enumerate(self.members):
            for layer in member.model.decoder.layers:
                for attention in (layer.self_attn, layer.cross_attn):
                    attention.layer_idx += k * config.decoder_layers
        self._cache_config = LabelformerConfig.from_dict(
            {**single.to_dict(), "decoder_layers": config.ensemble_size * config.decoder_layers}
        )
        self.lexical_scorer = lexical_scorer_of(config)
        #: Replay the greedy label loop as a CUDA graph on GPUs (captured per batch shape).
        self.use_cuda_graphs = True
        #: Route plain greedy `generate()` calls through `greedy_generate` (same tokens, less overhead).
        self.fast_greedy_generate = True
        self.post_init()

    # ---- building and taking apart

    @classmethod
    def from_members(
        cls, members: Sequence[LabelformerForMultiLabelGeneration]
    ) -> LabelformerEnsembleForMultiLabelGeneration:
        """An ensemble of trained ``members`` (copied; the members are not changed).

        They must share one architecture, label set (names in id order), decoding limits and tokenizer
        (``config.tokenizer_fingerprint``): ``ValueError`` names the first field that differs. Their lexical
        parts are left out: fit the ensemble's own (the training script does). The ensemble is on the
        first member's device and dtype, in eval mode.
        """
        if len(members) < 2:
            raise ValueError(f"An ensemble needs at least 2 members, got {len(members)}.")
        for member in members:
            if type(member) is not LabelformerForMultiLabelGeneration:
                raise ValueError(
                    f"Ensemble members must be LabelformerForMultiLabelGeneration models, got {type(member).__name__}."
                )
        check_compatible_configs([member.config for member in members])
        config = LabelformerConfig.from_dict(
            {**members[0].config.to_dict(), "ensemble_size": len(members), "lexical_scorer": False}
        )
        config._attn_implementation = members[0].config._attn_implementation
        first = next(members[0].parameters())
        ensemble = cls(config).to(device=first.device, dtype=first.dtype)
        for target, member in zip(ensemble.members, members):
            state = {k: v for k, v in member.state_dict().items() if not k.startswith("lexical_scorer.")}
            target.load_state_dict(state, strict=True)
        return ensemble.eval()

    def member(self, index: int) -> LabelformerForMultiLabelGeneration:
        """Member ``index`` as a model of its own (a copy: the Transformer alone, without the lexical part)."""
        if not 0 <= index < len(self.members):
            raise IndexError(f"This ensemble has {len(self.members)} members; got index {index}.")
        alone = LabelformerForMultiLabelGeneration(copy.deepcopy(self.members[index].config))
        alone.load_state_dict(self.members[index].state_dict(), strict=True)
        first = next(self.parameters())
        return alone.to(device=first.device, dtype=first.dtype).train(self.training)

    def _tied_keys(self) -> dict[str, str]:
        return {
            f"members.{k}.{target}": f"members.{k}.{source}"
            for k, member in enumerate(self.members)
            for target, source in member._tied_keys().items()
        }

    def get_input_embeddings(self) -> nn.Embedding:
        """Member 0's input embeddings (each member has its own)."""
        return self.members[0].get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear:
        """Member 0's output layer (each member has its own)."""
        return self.members[0].get_output_embeddings()

    def label_decoders(self) -> list[tuple[nn.Module, nn.Linear]]:
        """Each member's ``(decoder, lm_head)``, in member order (what `GreedyLabelDecoder` steps)."""
        return [(member.model.decoder, member.lm_head) for member in self.members]

    # ---- the decision path

    def encode(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> EnsembleEncoderOutput:
        """``[b, s]`` ids -> every member's encoder states and document label logits, and the lexical logits."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("An ensemble reads `input_ids` (each member has its own embeddings), not `inputs_embeds`.")
        if output_attentions or output_hidden_states:
            raise ValueError(
                "An ensemble does not return attentions or hidden states; ask a member: model.member(k)(...)."
            )
        encoded = [member.encode(input_ids, attention_mask) for member in self.members]
        lexical = None
        if self.lexical_scorer is not None:
            lexical = self.lexical_scorer(input_ids).float()
        return EnsembleEncoderOutput(
            last_hidden_state=torch.cat([e.last_hidden_state for e in encoded], dim=-1),
            label_logits=torch.stack([e.label_logits for e in encoded], dim=1),
            lexical_logits=lexical,
        )

    def _member_encoding(self, encoder_outputs: Any, index: int) -> LabelEncoderOutput:
        """Member ``index``'s part of an `EnsembleEncoderOutput`: ``[b, s, d]`` states and ``[b, L]`` label logits."""
        label_logits = getattr(encoder_outputs, "label_logits", None)
        if label_logits is None or label_logits.dim() != 3:
            raise ValueError(
                "An ensemble's `encoder_outputs` must come from its own `encode(input_ids, attention_mask)`."
            )
        d = self.config.d_model
        states = encoder_outputs.last_hidden_state[..., index * d : (index + 1) * d]
        return LabelEncoderOutput(last_hidden_state=states, label_logits=label_logits[:, index])

    def new_cache(self) -> EncoderDecoderCache:
        """An empty generation cache with a layer for every member's decoder layers."""
        return EncoderDecoderCache(DynamicCache(config=self._cache_config), DynamicCache(config=self._cache_config))

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        """`GenerationMixin`'s, except that a cache it makes has room for every member's decoder layers."""
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                "An ensemble decodes with a dynamic cache; cache_implementation="
                f"{generation_config.cache_implementation!r} is not supported (leave it unset)."
            )
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_OUTPUT_FIELD)
        if isinstance(cache, EncoderDecoderCache) and not getattr(cache, "_is_user_defined", False):
            model_kwargs[CACHE_OUTPUT_FIELD] = self.new_cache()
        return result

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: EnsembleEncoderOutput | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: EncoderDecoderCache | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        """``[b, s]`` ids (or ``encoder_outputs`` from `encode`) and ``[b, t]`` decoder ids -> ``logits``
        ``[b, t, decoder_vocab_size]``: log of the members' mean probability plus the lexical logits; with
        ``labels`` ``[b, t]`` the ``loss`` is the cross-entropy of those combined logits."""
        unsupported = ("output_attentions", "output_hidden_states", "decoder_inputs_embeds")
        asked = [name for name in unsupported if kwargs.get(name) is not None and kwargs.get(name) is not False]
        if asked or kwargs.get("return_dict") is False:
            raise ValueError(
                "An ensemble returns a `Seq2SeqLMOutput` of logits (and loss, cache) only; "
                f"{asked or ['return_dict=False']} is not supported: ask a member, model.member(k)(...)."
            )
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask)
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        cache = generation_cache(cache, past_key_values)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = self.new_cache()
        member_logits = [
            member(
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                encoder_outputs=self._member_encoding(encoder_outputs, index),
                cache=cache,
                use_cache=use_cache,
            ).logits
            for index, member in enumerate(self.members)
        ]
        logits = ensemble_log_probs([member.float() for member in member_logits])
        if encoder_outputs.lexical_logits is not None:
            logits = logits + label_row_bias(encoder_outputs.lexical_logits)[:, None, :]
        loss = None
        if labels is not None:
            loss = sequence_cross_entropy(logits, labels, self.config.label_smoothing)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            **{CACHE_OUTPUT_FIELD: cache if use_cache else None},
        )

    @torch.no_grad()
    def greedy_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained greedy decoding of the ensemble on static caches (`GreedyLabelDecoder`, every member per
        step). Returns ``[b, t]`` chosen tokens (labels, EOS, padding) and ``[b, t]`` their probabilities."""
        encoded = self.encode(input_ids, attention_mask)
        parts = [self._member_encoding(encoded, k) for k in range(len(self.members))]
        states = [part.last_hidden_state for part in parts]
        decoder = greedy_label_decoder(self, states[0], self.use_cuda_graphs)
        shared = None if encoded.lexical_logits is None else label_row_bias(encoded.lexical_logits)
        return decoder(states, attention_mask, [label_row_bias(part.label_logits) for part in parts], shared)


def check_compatible_configs(configs: Sequence[LabelformerConfig]) -> None:
    """Raise ``ValueError`` naming the first config field in which ``configs`` differ (other than the fields
    that do not shape a member: `MEMBER_FREE_FIELDS`), e.g. another label set or tokenizer."""
    first = configs[0].to_dict()
    for index, config in enumerate(configs[1:], start=1):
        other = config.to_dict()
        for key in sorted((first.keys() | other.keys()) - MEMBER_FREE_FIELDS):
            if first.get(key) != other.get(key):
                hint = {
                    "tokenizer_fingerprint": "train every member with the same tokenizer (--ensemble_with does)",
                    "label_fingerprint": "train every member on the same split (same labels in the same order)",
                    "id2label": "train every member on the same split (same labels in the same order)",
                }.get(key, "members must have one architecture and decoding setup")
                raise ValueError(
                    f"Member {index} differs from member 0 in `{key}` ({other.get(key)!r} against "
                    f"{first.get(key)!r}): {hint}."
                )


__all__ = [
    "EnsembleEncoderOutput",
    "LabelformerEnsembleForMultiLabelGeneration",
    "check_compatible_configs",
    "member_config",
]
