"""`Seq2SeqTrainer` recipe for the label generator: a preprocessing function for `Dataset.map` and a
``compute_metrics`` built on the model's own `decode_labels` and the metric module.

    preprocess = label_sequence_preprocessor(tokenizer, model.config, label_column="tags", label_delimiter=";")
    encoded = data.map(preprocess, batched=True, remove_columns=data["train"].column_names)
    trainer = Seq2SeqTrainer(model=model, args=Seq2SeqTrainingArguments(..., predict_with_generate=True),
                             train_dataset=encoded["train"], eval_dataset=encoded["validation"],
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                             compute_metrics=multilabel_compute_metrics(model))

The mapped rows hold only model inputs (``input_ids``, ``attention_mask``, ``labels``), so Trainer's
default ``remove_unused_columns=True`` keeps them and `DataCollatorForSeq2Seq` pads them (labels with -100).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .configuration_labelformer import LabelformerConfig
from .data_labelformer import label_target, normalize_labels, order_labels
from .multilabel_metrics import compute_multilabel_metrics

logger = logging.get_logger(__name__)


def label_sequence_preprocessor(
    tokenizer: Any,
    config: LabelformerConfig,
    text_column: str = "text",
    label_column: str = "labels",
    label_delimiter: str | None = None,
    max_length: int | None = None,
) -> Callable[[dict[str, list]], dict[str, list]]:
    """A function for ``Dataset.map(..., batched=True)``: rows -> ``input_ids``, ``attention_mask`` and
    ``labels``, the label-sequence target (the row's labels in ``config.label_order``, then EOS).

    Args:
        tokenizer: the model's tokenizer; texts are truncated to ``max_length`` (default: its limit).
        config: the model's config (its label vocabulary and label order).
        label_column: a list of label names per row, or a string split at ``label_delimiter``.

    Labels the model has no token for are left out of the targets, with one warning at the first batch that
    has any (scored against raw label sets, `multilabel_compute_metrics` still counts them as misses).
    """
    if not config.label2id:
        raise ValueError("The config has no labels: this is not a Labelformer multi-label model.")
    warned = []

    def preprocess(rows: dict[str, list]) -> dict[str, list]:
        missing = [c for c in (text_column, label_column) if c not in rows]
        if missing:
            raise ValueError(f"The data has no column {missing[0]!r}; its columns are {sorted(rows)}.")
        features = tokenizer(rows[text_column], truncation=True, max_length=max_length)
        unknown: Counter[str] = Counter()
        targets = []
        for i, value in enumerate(rows[label_column]):
            names = normalize_labels(value, label_delimiter, f"row {i} of a batch")
            unknown.update(name for name in names if name not in config.label2id)
            known = [name for name in names if name in config.label2id]
            targets.append(label_target(order_labels(known, config.label2id, config.label_order)))
        if unknown and not warned:
            warned.append(True)
            logger.warning(
                "Labels the model has no token for are left out of the targets (first batch: %s; not repeated).",
                ", ".join(f"{k} ({v})" for k, v in unknown.most_common(10)),
            )
        return {"input_ids": features["input_ids"], "attention_mask": features["attention_mask"], "labels": targets}

    return preprocess


def multilabel_compute_metrics(
    model: Any, references: Sequence[Sequence[str]] | None = None
) -> Callable[[Any], dict[str, float]]:
    """Trainer's ``compute_metrics`` for ``predict_with_generate=True``: generated ids ``[n, t]`` -> label names
    with the model's own `decode_labels`, scored with `compute_multilabel_metrics`.

    Args:
        model: the label generator being trained (its `decode_labels` and label vocabulary).
        references: the evaluation split's raw label sets, in order. Labels the model cannot predict then
            count as misses; by default the references are the encoded targets (``label_ids``), decoded.
    """
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    gold_sets = [list(row) for row in references] if references is not None else None

    def compute_metrics(prediction: Any) -> dict[str, float]:
        # rows are padded with -100 where Trainer joined batches of different lengths: decode_labels skips it
        predicted = model.decode_labels(torch.as_tensor(np.asarray(prediction.predictions)))
        gold = gold_sets
        if gold is None:
            gold = model.decode_labels(torch.as_tensor(np.asarray(prediction.label_ids)))
        return compute_multilabel_metrics(predicted, gold, labels=labels)

    return compute_metrics


__all__ = ["label_sequence_preprocessor", "multilabel_compute_metrics"]
