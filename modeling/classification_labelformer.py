"""The threshold head: binary relevance, the baseline the label-generation head must beat.

A sigmoid per label on the pooled encoder (plus the optional lexical part's scaled margins), trained
with binary cross-entropy. The decision threshold tuned on validation data is folded into the
classifier's bias (`fold_threshold`), so ``sigmoid(model(**inputs).logits) > 0.5`` *is* the
decision, the stock ``text-classification`` pipeline (``function_to_apply="sigmoid"``) sees the same
scores, and `predict_labels` reports them.

This file is copied into saved model folders and must only import our own code relatively.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .configuration_labelformer import LabelformerConfig
from .modeling_labelformer import LabelformerEncoder, LabelformerPreTrainedModel
from .prediction_labelformer import MultiLabelPredictionMixin, lexical_scorer_of, masked_mean


class LabelformerForMultiLabelClassification(MultiLabelPredictionMixin, LabelformerPreTrainedModel):
    """Binary relevance: pooled encoder -> one logit per label; a label is predicted when its logit is > 0.

    ``labels`` is a ``[b, num_labels]`` 0/1 matrix.
    """

    base_model_prefix = "encoder"
    pipeline_auto_class = "AutoModelForSequenceClassification"

    def __init__(self, config: LabelformerConfig) -> None:
        config.problem_type = "multi_label_classification"
        super().__init__(config)
        embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = LabelformerEncoder(config, embed_tokens)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.lexical_scorer = lexical_scorer_of(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embeddings.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embeddings.embed_tokens = value

    def pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``[b, s, d]`` -> ``[b, d]``: mean over real tokens, or the first token."""
        if self.config.classifier_pooling == "first":
            return hidden_states[:, 0]
        return masked_mean(hidden_states, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """``[b, s]`` ids -> ``logits`` ``[b, num_labels]`` (> 0: predicted); with ``labels`` the mean BCE ``loss``."""
        encoded = self.encoder(
            input_ids, attention_mask, inputs_embeds,
            output_attentions=bool(output_attentions), output_hidden_states=bool(output_hidden_states),
        )  # fmt: skip
        logits = self.classifier(self.dropout(self.pool(encoded.last_hidden_state, attention_mask)))
        if self.lexical_scorer is not None:
            if input_ids is None:
                raise ValueError("This model's lexical part reads `input_ids`: pass them instead of `inputs_embeds`.")
            logits = logits + self.lexical_scorer(input_ids).to(logits.dtype)
        loss = None
        if labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.to(torch.float32))
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )

    @torch.no_grad()
    def fold_threshold(self, threshold: float) -> None:
        """Make ``sigmoid(logits) > 0.5`` decide as ``sigmoid(logits) > threshold`` did: subtract
        ``logit(threshold)`` from the classifier's bias. A calibration step after training (the training
        script tunes the threshold on validation data), never called at inference."""
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {threshold!r}.")
        self.classifier.bias -= math.log(threshold / (1.0 - threshold))

    @torch.no_grad()
    def predict_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int = 1
    ) -> list[dict[str, float]]:
        """Labels with ``sigmoid(logit) > 0.5`` for a tokenized batch ``[b, s]``, most probable first."""
        probs = torch.sigmoid(self(input_ids=input_ids, attention_mask=attention_mask).logits.float())
        id2label = self.config.id2label
        results = []
        for row in probs.tolist():
            picked = sorted(((p, i) for i, p in enumerate(row) if p > 0.5), reverse=True)
            results.append({id2label[i]: p for p, i in picked})
        return results


__all__ = ["LabelformerForMultiLabelClassification"]
