"""Multi-label classification metrics on label-name sets, as an `evaluate` module.

Load it offline with ``evaluate.load("<path to this folder>")``. Predictions and references are
lists of label names per example. Labels are the union of all labels seen in references and
predictions, plus any given in ``labels`` (pass the label vocabulary to count never-predicted,
never-seen labels in macro-F1 and Hamming loss).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import datasets
import evaluate

_DESCRIPTION = """Micro-F1, macro-F1, example-based F1, subset accuracy (exact match), Hamming loss and
Jaccard index for multi-label classification, computed on sets of label names."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of lists of predicted label names.
    references: list of lists of gold label names.
    labels: optional list of all label names (the label vocabulary).
Returns:
    micro_f1: F1 of all (example, label) decisions pooled.
    macro_f1: unweighted mean over labels of per-label F1 (0 for a label with no true and no predicted
        positives is not possible: such labels are only counted when passed in `labels`, scoring 0).
    example_f1: mean over examples of 2|P & G| / (|P| + |G|) (1 when both are empty).
    subset_accuracy: fraction of examples whose predicted set equals the gold set.
    hamming_loss: fraction of wrong (example, label) decisions.
    jaccard: mean over examples of |P & G| / |P | G| (1 when both are empty).
Examples:
    >>> metric = evaluate.load("modeling/multilabel_metrics")
    >>> metric.compute(predictions=[["a"], ["b", "c"]], references=[["a"], ["b"]])["subset_accuracy"]
    0.5
"""


def _f1(true_positive: int, predicted: int, gold: int) -> float:
    return 2 * true_positive / (predicted + gold) if predicted + gold else 0.0


def compute_multilabel_metrics(
    predictions: Sequence[Iterable[str]], references: Sequence[Iterable[str]], labels: Iterable[str] | None = None
) -> dict[str, float]:
    """All metrics as a dict (see the module docstring for the definitions)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("Cannot compute metrics on zero examples.")
    pred_sets = [set(p) for p in predictions]
    gold_sets = [set(r) for r in references]
    # sorted: summing per-label F1 in set order would change macro-F1's last bits from run to run (hash seeds)
    vocabulary = sorted(set(labels or ()) | set().union(*pred_sets, *gold_sets))
    tp = dict.fromkeys(vocabulary, 0)
    n_pred = dict.fromkeys(vocabulary, 0)
    n_gold = dict.fromkeys(vocabulary, 0)
    example_f1 = jaccard = exact = wrong = 0.0
    for pred, gold in zip(pred_sets, gold_sets):
        both = pred & gold
        for label in both:
            tp[label] += 1
        for label in pred:
            n_pred[label] += 1
        for label in gold:
            n_gold[label] += 1
        example_f1 += 2 * len(both) / (len(pred) + len(gold)) if pred or gold else 1.0
        jaccard += len(both) / len(pred | gold) if pred or gold else 1.0
        exact += pred == gold
        wrong += len(pred ^ gold)
    n = len(pred_sets)
    return {
        "micro_f1": _f1(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values())),
        "macro_f1": sum(_f1(tp[x], n_pred[x], n_gold[x]) for x in vocabulary) / max(len(vocabulary), 1),
        "example_f1": example_f1 / n,
        "subset_accuracy": exact / n,
        "hamming_loss": wrong / (n * max(len(vocabulary), 1)),
        "jaccard": jaccard / n,
    }


def per_label_scores(
    predictions: Sequence[Iterable[str]], references: Sequence[Iterable[str]], labels: Iterable[str]
) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each label in ``labels``."""
    scores = {}
    pred_sets = [set(p) for p in predictions]
    gold_sets = [set(r) for r in references]
    for label in labels:
        tp = sum(label in p and label in g for p, g in zip(pred_sets, gold_sets))
        n_pred = sum(label in p for p in pred_sets)
        n_gold = sum(label in g for g in gold_sets)
        scores[label] = {
            "precision": tp / n_pred if n_pred else 0.0,
            "recall": tp / n_gold if n_gold else 0.0,
            "f1": _f1(tp, n_pred, n_gold),
            "support": n_gold,
        }
    return scores


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MultilabelMetrics(evaluate.Metric):
    """`evaluate` wrapper around `compute_multilabel_metrics`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, labels=None) -> dict[str, float]:
        return compute_multilabel_metrics(predictions, references, labels)
