"""Parallel (non-autoregressive) label decoding: all label slots in one decoder pass.

`LabelformerForParallelLabelGeneration` keeps the encoder and the decoder stack of Labelformer,
but the decoder reads K learned *slot* embeddings (``config.effective_num_label_slots``) instead
of previous tokens, with bidirectional self-attention and cross-attention to the encoder. Each
slot predicts a distribution over the decoder vocabulary (labels plus pad/bos/eos).

Training: slot k predicts the k-th label of the ordered target, the slot after the last label
predicts EOS, later slots are ignored. Decoding (`decode_slots`) reads the slots in order under the
label-set rules and stops at the first EOS.

This file is copied into saved model folders and must only import our own code relatively.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import Seq2SeqLMOutput

from .configuration_labelformer import EOS_TOKEN_ID, NUM_SPECIAL_DECODER_TOKENS, LabelformerConfig
from .decoding_labelformer import label_rules
from .modeling_labelformer import LabelformerDecoder, LabelformerEncoder, LabelformerPreTrainedModel
from .prediction_labelformer import MultiLabelPredictionMixin


def slot_targets(labels: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Ordered slot targets ``[b, K]`` from label sequences ``[b, t]`` (labels, EOS, -100 padding)."""
    targets = labels.new_full((labels.shape[0], num_slots), -100)
    width = min(num_slots, labels.shape[1])
    targets[:, :width] = labels[:, :width]
    return targets


class LabelformerForParallelLabelGeneration(MultiLabelPredictionMixin, LabelformerPreTrainedModel):
    """Predicts a document's label set with K parallel slots in a single decoder pass.

    ``labels`` ``[b, t]`` are the same label sequences as for the autoregressive head (labels in
    frequency order, EOS, -100 padding). ``logits`` are ``[b, K, decoder_vocab_size]``.
    """

    base_model_prefix = "encoder"

    def __init__(self, config: LabelformerConfig) -> None:
        if not config.is_label_model or config.lexical_scorer:
            raise ValueError(
                "The parallel head needs a config built with LabelformerConfig.from_labels(labels, ...) and "
                "without `lexical_scorer`."
            )
        super().__init__(config)
        self.num_slots = config.effective_num_label_slots
        embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = LabelformerEncoder(config, embed_tokens)
        self.decoder = LabelformerDecoder(config, nn.Embedding(self.num_slots, config.d_model), causal=False)
        self.classifier = nn.Linear(config.d_model, config.decoder_vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embeddings.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embeddings.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        """``[b, s]`` source ids -> slot ``logits`` ``[b, K, v]``; with ``labels`` also the loss."""
        encoded = self.encoder(input_ids, attention_mask, inputs_embeds)
        batch = encoded.last_hidden_state.shape[0]
        slots = torch.arange(self.num_slots, device=encoded.last_hidden_state.device).expand(batch, -1)  # [b, K]
        decoded = self.decoder(slots, encoded.last_hidden_state, encoder_attention_mask=attention_mask)
        logits = self.classifier(decoded.last_hidden_state)  # [b, K, v]
        loss = None
        if labels is not None:
            targets = slot_targets(labels, self.num_slots)
            loss = nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                label_smoothing=self.config.label_smoothing,
            )
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=encoded.last_hidden_state)

    def decode_slots(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Label-set decoding of slot logits ``[b, K, v]`` -> chosen tokens and their probabilities ``[b, K]``.

        Slots are read in order; a label already chosen is never chosen again, EOS is allowed only
        after ``min_labels`` labels, and nothing but EOS after ``max_labels``. Chosen tokens after
        the first EOS are EOS. A score is the slot's softmax probability of its token.
        """
        batch, num_slots, vocab = logits.shape
        probs = logits.float().softmax(-1)
        used = torch.zeros(batch, vocab, dtype=torch.bool, device=logits.device)
        used[:, :NUM_SPECIAL_DECODER_TOKENS] = True
        count = torch.zeros(batch, dtype=torch.long, device=logits.device)
        done = torch.zeros(batch, dtype=torch.bool, device=logits.device)
        max_labels = self.config.effective_max_labels
        tokens = torch.full((batch, num_slots), EOS_TOKEN_ID, dtype=torch.long, device=logits.device)
        scores = torch.zeros(batch, num_slots, device=logits.device)
        for k in range(num_slots):
            allowed = label_rules(used, count, self.config.min_labels, max_labels)
            best = probs[:, k].masked_fill(~allowed, -1.0).argmax(-1)
            best = torch.where(done, torch.full_like(best, EOS_TOKEN_ID), best)
            is_label = best >= NUM_SPECIAL_DECODER_TOKENS
            tokens[:, k] = best
            scores[:, k] = probs[:, k].gather(-1, best[:, None]).squeeze(-1)
            used.scatter_(1, best[:, None], True)
            used[:, :NUM_SPECIAL_DECODER_TOKENS] = True
            count += is_label.long()
            done |= ~is_label
        return tokens, scores

    def predict_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int = 1
    ) -> list[dict[str, float]]:
        """One decoder pass for a tokenized batch ``[b, s]``; ``num_beams`` is ignored (no search)."""
        tokens, scores = self.decode_slots(self(input_ids=input_ids, attention_mask=attention_mask).logits)
        id2label = self.config.id2label
        results = []
        for row_tokens, row_scores in zip(tokens.tolist(), scores.tolist()):
            scored = {}
            for token, score in zip(row_tokens, row_scores):
                if token >= NUM_SPECIAL_DECODER_TOKENS:
                    scored[id2label[token - NUM_SPECIAL_DECODER_TOKENS]] = score
            results.append(scored)
        return results


__all__ = ["LabelformerForParallelLabelGeneration", "slot_targets"]
