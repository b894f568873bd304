"""The label-generation head: multi-label classification as label-sequence generation (SGM, Yang et al. 2018).

The decoder vocabulary is the label set plus pad/bos/eos (label ``k`` is token ``k + 3``); the target
is the document's labels in ``config.label_order`` followed by EOS, so the model decides how many
labels a document gets. One decision path: ``forward()`` computes the label logits (the decoder's,
plus the document's own label logits, `LabelEncoderOutput.label_logits`: a linear classifier of the
mean encoder state, label-wise attention over the encoder states, and the optional lexical part),
``generate()`` decodes them under `LabelSetLogitsProcessor`, and `predict_labels`, the pipeline and
Trainer's ``predict_with_generate`` all read their answers off that path.

This file is copied into saved model folders and must only import our own code relatively.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

from .configuration_labelformer import NUM_SPECIAL_DECODER_TOKENS, LabelformerConfig
from .decoding_labelformer import (
    LabelSetLogitsProcessor,
    allowed_label_tokens,
    greedy_label_decoder,
    plain_greedy_request,
)
from .modeling_labelformer import LabelformerForConditionalGeneration, sequence_cross_entropy, shift_tokens_right
from .prediction_labelformer import MultiLabelPredictionMixin, lexical_scorer_of, masked_mean


@dataclass
class LabelEncoderOutput(BaseModelOutput):
    """`BaseModelOutput` plus ``label_logits`` ``[b, num_labels]``: what the head adds to every
    decoding step's label logits for this document (its document classifier's and its label attention's
    logits, plus the lexical part's scaled margins when it has one). `generate()` carries it with the
    encoder states and expands it for beam search."""

    label_logits: torch.FloatTensor | None = None


class LabelAttention(nn.Module):
    """Label-wise attention over the encoder states: label ``k`` pools the document with its own query and
    scores the pooled vector with its own weights (as in LAAT, Vu et al. 2020). ``[b, s, d]`` -> ``[b, L]``."""

    #: Labels read per chunk: at inference the ``[b, s, labels]`` scores stay bounded for label sets in the
    #: thousands (10,000 labels x 1,024 tokens x 16 documents would be 650 MB per tensor); the result is the
    #: same. (Training keeps every chunk's activations for the backward pass.)
    chunk_size = 2048

    def __init__(self, d_model: int, num_labels: int) -> None:
        super().__init__()
        self.query = nn.Linear(d_model, num_labels, bias=False)
        self.value = nn.Linear(d_model, num_labels)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``[b, s, d]`` states and ``[b, s]`` 1/0 mask -> ``[b, L]`` logits."""
        padding = None if attention_mask is None else attention_mask[:, :, None] == 0  # [b, s, 1]
        chunks = []
        for start in range(0, self.query.out_features, self.chunk_size):
            labels = slice(start, start + self.chunk_size)
            scores = nn.functional.linear(states, self.query.weight[labels])  # [b, s, labels of this chunk]
            if padding is not None:
                scores = scores.masked_fill(padding, torch.finfo(scores.dtype).min)
            weights = scores.softmax(dim=1)
            if padding is not None:  # exact zeros already, except in a row of padding only: it reads nothing
                weights = weights.masked_fill(padding, 0.0)
            values = nn.functional.linear(states, self.value.weight[labels], self.value.bias[labels])
            chunks.append((weights * values).sum(dim=1))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)


def label_row_bias(label_logits: torch.Tensor) -> torch.Tensor:
    """A document's label logits ``[b, num_labels]`` -> what they add to each decoding step's logits
    ``[b, decoder_vocab_size]`` (float; 0 at pad/bos/eos)."""
    return nn.functional.pad(label_logits.float(), (NUM_SPECIAL_DECODER_TOKENS, 0))


class _LabelEncoding:
    """What a label-generation model's ``get_encoder`` returns: its ``encode()`` (the encoder, or every
    member's, plus the label evidence).

    `generate()` encodes once through it, so the document's label logits travel in ``encoder_outputs``
    to every decoding step. Holds no state of its own.
    """

    def __init__(self, head: LabelformerForMultiLabelGeneration) -> None:
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> LabelEncoderOutput:
        return self.head.encode(input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states)

    __call__ = forward


class LabelGenerationMixin:
    """What every label-generation model shares, on top of its own ``encode()``, ``forward()``,
    ``greedy_labels()`` and ``label_decoders()``: `generate()` under the label-set rules, its fast greedy
    path, rescoring, decoding ids to names and `predict_batch` (used by `predict_labels` and the pipeline).
    """

    config: LabelformerConfig

    def get_encoder(self, modality: str | None = None) -> _LabelEncoding:
        return _LabelEncoding(self)

    def label_processor(self) -> LabelSetLogitsProcessor:
        """The decoding constraints of this model's config."""
        return LabelSetLogitsProcessor(self.config.min_labels, self.config.effective_max_labels)

    def generate(self, *args: Any, logits_processor: LogitsProcessorList | None = None, **kwargs: Any) -> Any:
        """`GenerationMixin.generate` under the label-set rules, with room for ``max_labels`` + EOS by default.

        Plain greedy calls take the fast path (`greedy_generate`): the same tokens as the generic loop.
        """
        if "max_new_tokens" not in kwargs and "max_length" not in kwargs:
            kwargs["max_new_tokens"] = self.config.effective_max_labels + 1
        if logits_processor is None:
            fast = plain_greedy_request(self, args, kwargs)
            if fast is not None and fast["min_new_tokens"] <= self.config.min_labels:
                return self.greedy_generate(**fast)
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(self.label_processor())
        return GenerationMixin.generate(self, *args, logits_processor=processors, **kwargs)

    @torch.no_grad()
    def greedy_generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 20, min_new_tokens: int = 0
    ) -> torch.Tensor:
        """Constrained greedy decoding, fast: ``[b, s]`` -> ``[b, 1 + t]`` (start token first), as `generate()`."""
        tokens, _ = self.greedy_labels(input_ids, attention_mask)
        written = (tokens != self.config.pad_token_id).any(0).nonzero()  # a CUDA graph always runs every step
        tokens = tokens[:, : min(max_new_tokens, int(written.max()) + 1 if written.numel() else 1)]
        start = torch.full_like(tokens[:, :1], self.config.decoder_start_token_id)
        return torch.cat([start, tokens], dim=1)

    def constrained_logits(
        self, decoder_input_ids: torch.Tensor, encoder_outputs: Any, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Teacher-forced ``forward()`` logits ``[b, t, v]`` (float) with the tokens the label rules forbid at -inf."""
        logits = self(
            attention_mask=attention_mask, encoder_outputs=encoder_outputs, decoder_input_ids=decoder_input_ids
        ).logits.float()  # what `forward()` returns (with every row bias, members combined), as decoding sees it
        allowed = allowed_label_tokens(
            decoder_input_ids, logits.shape[-1], self.config.min_labels, self.config.effective_max_labels
        )
        return logits.masked_fill(~allowed, float("-inf"))

    def label_scores(self, sequences: torch.Tensor, encoder_outputs: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        """Constrained probability of each token of ``sequences`` ``[n, 1 + t]`` (start token first): ``[n, t]``."""
        logits = self.constrained_logits(sequences[:, :-1], encoder_outputs, attention_mask)
        return logits.log_softmax(-1).gather(-1, sequences[:, 1:, None]).squeeze(-1).exp().nan_to_num(0.0)

    def decode_labels(self, sequences: torch.Tensor) -> list[list[str]]:
        """Generated ids ``[n, t]`` (with or without the start token) -> label names up to the first EOS."""
        return [list(scored) for scored in self._scored_labels(sequences, torch.zeros(sequences.shape))]

    def _scored_labels(self, tokens: torch.Tensor, scores: torch.Tensor) -> list[dict[str, float]]:
        """``[n, t]`` decoded tokens and their scores -> per row ``{label: score}`` up to the first EOS
        (other non-label tokens, e.g. the start token, padding or Trainer's -100, are skipped)."""
        id2label = self.config.id2label
        results = []
        for row_tokens, row_scores in zip(tokens.tolist(), scores.tolist()):
            scored = {}
            for token, score in zip(row_tokens, row_scores):
                if token == self.config.eos_token_id:
                    break
                if token >= NUM_SPECIAL_DECODER_TOKENS:
                    scored[id2label[token - NUM_SPECIAL_DECODER_TOKENS]] = score
            results.append(scored)
        return results

    @torch.no_grad()
    def predict_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int = 1
    ) -> list[dict[str, float]]:
        """Label sets for a tokenized batch ``[b, s]``, with each label's constrained step probability.

        Greedy decoding takes the fast path `greedy_labels`; beam search goes through `generate()` and
        scores the chosen sequences with one teacher-forced pass (`label_scores`).
        """
        if num_beams == 1:
            tokens, scores = self.greedy_labels(input_ids, attention_mask)
        else:
            sequences = self.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=num_beams,
                                      do_sample=False)  # fmt: skip
            tokens = sequences[:, 1:]
            scores = self.label_scores(sequences, self.encode(input_ids, attention_mask), attention_mask)
        return self._scored_labels(tokens, scores)


class LabelformerForMultiLabelGeneration(
    LabelGenerationMixin, MultiLabelPredictionMixin, LabelformerForConditionalGeneration
):
    """Writes a document's labels one by one and stops with EOS.

    Training: ``labels`` ``[b, t]`` are label tokens in the config's ``label_order`` then EOS, -100
    for padding (see `MultiLabelCollator`); teacher forcing with cross-entropy.

    Inference: ``generate()`` always applies the label-set rules and by default decodes up to
    ``max_labels`` + EOS; `decode_labels` turns its ids into names; `predict_labels` returns names
    and the constrained step probabilities (``exp`` of `compute_transition_scores` for greedy).
    """

    def __init__(self, config: LabelformerConfig) -> None:
        if not config.is_label_model:
            raise ValueError(
                f"`decoder_vocab_size` is {config.decoder_vocab_size} but a label decoder over {config.num_labels} "
                f"labels needs {config.num_labels + NUM_SPECIAL_DECODER_TOKENS} (labels + pad/bos/eos). Build the "
                "config with LabelformerConfig.from_labels(labels, ...)."
            )
        super().__init__(config)
        #: Label logits of the whole document (masked mean of the encoder states), added at every decoding
        #: step: the decoder then learns what to add to a bag-of-states classifier (which labels are
        #: already written, when to stop) instead of learning the document's evidence step by step.
        self.document_classifier = nn.Linear(config.d_model, config.num_labels)
        #: Label-wise attention: each label also reads the document with its own query, not only through the
        #: mean (benchmarks/RESULTS.md, 2026-12-04). Checkpoints saved before it existed lack its weights.
        self.label_attention = LabelAttention(config.d_model, config.num_labels)
        self.lexical_scorer = lexical_scorer_of(config)
        #: Replay the greedy label loop as a CUDA graph on GPUs (captured per batch shape).
        self.use_cuda_graphs = True
        self.post_init()

    def encode(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> LabelEncoderOutput:
        """``[b, s]`` ids -> encoder states ``[b, s, d]`` and the document's label logits ``[b, num_labels]``."""
        encoded = self.model.encoder(
            input_ids, attention_mask, inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        states = encoded.last_hidden_state
        label_logits = self.document_classifier(masked_mean(states, attention_mask))
        label_logits = label_logits + self.label_attention(states, attention_mask)
        if self.lexical_scorer is not None:
            if input_ids is None:
                raise ValueError("This model's lexical part reads `input_ids`: pass them instead of `inputs_embeds`.")
            label_logits = label_logits + self.lexical_scorer(input_ids).to(label_logits.dtype)
        return LabelEncoderOutput(
            last_hidden_state=encoded.last_hidden_state,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            label_logits=label_logits,
        )

    def row_bias(self, encoder_outputs: Any) -> torch.Tensor:
        """What ``forward()`` adds to every position: ``[b, decoder_vocab_size]`` (0 at pad/bos/eos)."""
        label_logits = getattr(encoder_outputs, "label_logits", None)
        if label_logits is None:
            raise ValueError(
                "This head adds the document's label logits to every step: pass `input_ids`, or `encoder_outputs` "
                "from `model.encode(input_ids, attention_mask)` (a plain encoder output lacks them)."
            )
        return label_row_bias(label_logits)

    def label_decoders(self) -> list[tuple[nn.Module, nn.Linear]]:
        """The ``(decoder, lm_head)`` whose steps `GreedyLabelDecoder` runs: this model's one."""
        return [(self.model.decoder, self.lm_head)]

    @torch.no_grad()
    def greedy_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained greedy decoding on a static cache (`GreedyLabelDecoder`): one encoder pass, one
        cached decoder step per label over the small label vocabulary, rules kept as running state.

        Returns:
            ``[b, t]`` chosen tokens (labels, then EOS, then padding) and ``[b, t]`` their probabilities.
        """
        encoded = self.encode(input_ids, attention_mask)
        states = encoded.last_hidden_state
        decoder = greedy_label_decoder(self, states, self.use_cuda_graphs)
        return decoder([states], attention_mask, [self.row_bias(encoded)])

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """As `LabelformerForConditionalGeneration.forward`, plus the document's extra label logits.

        Returns ``logits`` ``[b, t, decoder_vocab_size]``: the decoder's, plus `row_bias` (the lexical
        part, when the model has one) at every position; with ``labels`` ``[b, t]`` the loss is the
        mean cross-entropy of those logits.
        """
        if encoder_outputs is None:
            encoder_outputs = self.encode(
                input_ids, attention_mask, inputs_embeds, bool(output_attentions), bool(output_hidden_states)
            )
        bias = self.row_bias(encoder_outputs)  # [b, v] or None
        if labels is not None and decoder_input_ids is None and kwargs.get("decoder_inputs_embeds") is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        outputs = super().forward(
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            encoder_outputs=encoder_outputs,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        if bias is not None:
            outputs.logits = outputs.logits + bias[:, None, :].to(outputs.logits.dtype)
        if labels is not None:
            outputs.loss = sequence_cross_entropy(outputs.logits, labels, self.config.label_smoothing)
        return outputs


__all__ = [
    "LabelAttention",
    "LabelEncoderOutput",
    "LabelGenerationMixin",
    "LabelformerForMultiLabelGeneration",
    "label_row_bias",
]
