"""Evaluation helpers shared by the example scripts: predictions, metrics, reports, plots."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .data_labelformer import MultiLabelCollator
from .label_names_labelformer import named_labels
from .lexical_labelformer import LEXICAL_LOGIT_WEIGHTS
from .multilabel_labelformer import LABEL_NAME_BIASES, prior_label_bias
from .multilabel_metrics.multilabel_metrics import compute_multilabel_metrics, per_label_scores
from .set_search_labelformer import SET_SEARCH_LABEL_BIASES, SET_SEARCH_ROUNDS

logger = logging.get_logger(__name__)

METRIC_KEYS = ("micro_f1", "macro_f1", "example_f1", "subset_accuracy", "hamming_loss", "jaccard")


def predict_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    num_beams: int = 1,
    batch_size: int = 64,
    max_length: int | None = None,
    progress: Callable[[int], None] | None = None,
    return_scores: bool = False,
) -> list:
    """`predict_labels` over many texts (empty texts allowed), in chunks so ``progress(n)`` can tick."""
    predictions: list = []
    chunk = max(batch_size * 4, 1)
    for start in range(0, len(texts), chunk):
        part = list(texts[start : start + chunk])
        predictions.extend(
            model.predict_labels(
                part,
                tokenizer=tokenizer,
                num_beams=num_beams,
                batch_size=batch_size,
                max_length=max_length,
                allow_empty=True,
                return_scores=return_scores,
            )
        )
        if progress is not None:
            progress(len(part))
    return predictions


def evaluate_predictions(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]], labels: Sequence[str]
) -> dict[str, float]:
    """The six metrics of `compute_multilabel_metrics` over the model's label vocabulary."""
    return compute_multilabel_metrics(predictions, references, labels=labels)


@torch.no_grad()
def threshold_validation_inputs(
    model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], max_length: int | None, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What a threshold head (or an ensemble of them) fits its decision rule on (`tune_decision_rule`).

    ``rows`` (``{"text", "labels"}``) are batched by the training collator. Returns the probabilities
    ``[n, L]`` (``model.label_probabilities``), the 0/1 targets ``[n, L]``, which labels each text
    names ``[n, L]`` when the config holds label names (else ``None``) and the lexical scorer's
    margins ``[n, L]`` when the model has one (`lexical_margins`, else ``None``); all on the CPU.
    """
    collator = MultiLabelCollator(tokenizer, model.config, max_length, head="classification")
    names = model.config.label_name_token_ids
    lexical = getattr(model, "lexical_label_scorer", None) is not None
    device = model.device
    probs, targets, named, margins = [], [], [], []
    for start in range(0, len(rows), batch_size):
        batch = collator(list(rows[start : start + batch_size]))
        ids = batch["input_ids"]
        probs.append(model.label_probabilities(ids.to(device), batch["attention_mask"].to(device)).cpu())
        targets.append(batch["labels"])
        if names is not None:
            named.append(named_labels(ids, names))
        if lexical:
            margins.append(model.lexical_margins(ids.to(device)).cpu())
    return (
        torch.cat(probs),
        torch.cat(targets),
        torch.cat(named) if names is not None else None,
        torch.cat(margins) if lexical else None,
    )


#: The grid `tune_decoding_bias` searches by default.
EOS_BIASES = (-1.0, -0.5, 0.0, 0.5)
PRIOR_WEIGHTS = (0.0, 0.1, 0.2)


def tune_decoding_bias(
    model: Any,
    predict: Callable[[Any], list[list[str]]],
    references: Sequence[Sequence[str]],
    label_counts: Mapping[str, int],
    eos_biases: Sequence[float] = EOS_BIASES,
    prior_weights: Sequence[float] = PRIOR_WEIGHTS,
    metric: str = "micro_f1",
    label_name_biases: Sequence[float] | None = None,
    lexical_weights: Sequence[float] | None = None,
    set_search_rounds: int = SET_SEARCH_ROUNDS,
    set_search_label_biases: Sequence[float] = SET_SEARCH_LABEL_BIASES,
) -> dict[str, Any]:
    """Fit a generation head's decoding bias on validation data, like the threshold head's threshold.

    Tries every ``eos_logit_bias`` in ``eos_biases`` with every logit-adjustment weight in
    ``prior_weights`` (label biases ``prior_label_bias(label_counts, weight)``), scores
    ``predict(model)`` against ``references`` and keeps the best ``metric``; no bias wins ties.
    Then, when the config holds ``label_name_token_ids``, it tries every ``label_name_bias`` of
    ``label_name_biases`` (default `LABEL_NAME_BIASES`) with every EOS bias, at the best prior
    weight (the EOS bias is tried again because naming labels makes longer label sets). Last, when
    the model has a lexical scorer, it tries every ``lexical_logit_weight`` of ``lexical_weights``
    (default `LEXICAL_LOGIT_WEIGHTS`) with every EOS bias, at the best prior weight and label-name
    bias. A model trained with stacked lexical margins (``config.lexical_training_weight`` > 0) is
    searched at that weight in the first two stages (its network expects the margins), and the
    last stage tries the other weights, 0 included. All of these decode step by step; last, with
    ``set_search_rounds`` > 0, it tries set search (`modeling.set_search_labelformer`) at the best
    setting so far with every per-label reward of ``set_search_label_biases``, and keeps it only if
    it scores higher. The winner stays set on ``model`` (a `LabelformerForMultiLabelGeneration` or an
    ensemble of them), so `save_pretrained` keeps it.

    Args:
        predict: decodes the validation texts with ``model`` as it is set now (greedy is enough).
        label_counts: training documents per label name (labels missing here count as 1).
        label_name_biases: label-name biases to try; ``()`` leaves ``label_name_bias`` at 0.
        lexical_weights: lexical logit weights to try; ``()`` leaves ``lexical_logit_weight`` at 0.
        set_search_rounds: rounds of set search to try; 0 leaves it off.
        set_search_label_biases: the per-label rewards (``set_search_label_bias``) to try with it.

    Returns:
        ``{"eos_logit_bias", "prior_weight", "label_name_bias", "lexical_logit_weight",
        "set_search_rounds", "set_search_label_bias", metric, "unbiased_" + metric, "grid": [...]}``.
    """
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    counts = [label_counts.get(label, 0) for label in labels]
    label_biases = {w: prior_label_bias(counts, w) if w else None for w in (0.0, *prior_weights)}
    if model.config.label_name_token_ids is None:
        label_name_biases = ()
    elif label_name_biases is None:
        label_name_biases = LABEL_NAME_BIASES
    lexical = getattr(model, "lexical_label_scorer", None) is not None
    if not lexical:
        lexical_weights = ()
    elif lexical_weights is None:
        lexical_weights = LEXICAL_LOGIT_WEIGHTS
    grid: list[dict[str, Any]] = []

    def apply(eos: float, weight: float, name_bias: float, lexical_weight: float, rounds: int, reward: float) -> None:
        model.set_decoding_bias(eos, label_biases[weight])
        if model.config.label_name_token_ids is not None:
            model.set_label_name_bias(name_bias)
        if lexical:
            model.set_lexical_logit_weight(lexical_weight)
        model.configure_set_search(rounds, reward)

    def score(eos: float, weight: float, name_bias: float, lexical_weight: float = 0.0, rounds: int = 0,
              reward: float = 0.0) -> None:  # fmt: skip
        apply(eos, weight, name_bias, lexical_weight, rounds, reward)
        value = evaluate_predictions(predict(model), references, labels)[metric]
        grid.append({"eos_logit_bias": eos, "prior_weight": weight, "label_name_bias": name_bias,
                     "lexical_logit_weight": lexical_weight, "set_search_rounds": rounds,
                     "set_search_label_bias": reward, metric: value})  # fmt: skip
        logger.info(
            "decoding bias: EOS %+.2f, prior weight %.2f, label names %.2f, lexical %.2f, set search %d (reward "
            "%.2f) -> validation %s %.4f",
            eos, weight, name_bias, lexical_weight, rounds, reward, metric, value,
        )  # fmt: skip

    # A network trained beside lexical margins (stacking) decides with them: the first two stages
    # keep its training weight, and the last one tries the others (0 included).
    base = float(model.config.lexical_training_weight) if lexical else 0.0
    settings = [(0.0, 0.0)] + [(e, w) for w in prior_weights for e in eos_biases if (e, w) != (0.0, 0.0)]
    for eos, weight in settings:
        score(eos, weight, 0.0, base)
    prior = max(grid, key=lambda row: row[metric])["prior_weight"]  # first best: no bias wins ties
    for name_bias in sorted({float(b) for b in label_name_biases} - {0.0}):
        for eos in eos_biases:
            score(eos, prior, name_bias, base)
    names = max(grid, key=lambda row: row[metric])["label_name_bias"]
    tried = {0.0, *map(float, lexical_weights)} if lexical_weights else set()
    for lexical_weight in sorted(tried - {base}):
        for eos in eos_biases:
            score(eos, prior, names, lexical_weight)
    if set_search_rounds:  # whole-set search from the best step-by-step setting
        step = max(grid, key=lambda row: row[metric])
        for reward in set_search_label_biases:
            score(step["eos_logit_bias"], prior, names, step["lexical_logit_weight"], set_search_rounds, float(reward))
    best = max(grid, key=lambda row: row[metric])
    apply(*(best[key] for key in ("eos_logit_bias", "prior_weight", "label_name_bias", "lexical_logit_weight",
                                  "set_search_rounds", "set_search_label_bias")))  # fmt: skip
    return {**best, f"unbiased_{metric}": grid[0][metric], "grid": grid}


def per_label_table(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]], labels: Sequence[str]
) -> str:
    """A markdown table of precision, recall, F1 and support per label (most frequent first)."""
    scores = per_label_scores(predictions, references, labels)
    lines = ["| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for label in sorted(labels, key=lambda x: -scores[x]["support"]):
        s = scores[label]
        lines.append(f"| {label} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |")
    return "\n".join(lines) + "\n"


def plot_training_curve(history: list[dict[str, float]], path: str | os.PathLike) -> bool:
    """Loss per step and validation micro/macro-F1 per epoch as a PNG; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no training curve written (pip install matplotlib).")
        return False
    steps = [h for h in history if "loss" in h]
    evals = [h for h in history if "validation_micro_f1" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([h["step"] for h in steps], [h["loss"] for h in steps], lw=1)
    left.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    for key in ("validation_micro_f1", "validation_macro_f1", "validation_subset_accuracy"):
        right.plot([h["epoch"] for h in evals], [h[key] for h in evals], marker="o", label=key.split("_", 1)[1])
    right.set(xlabel="epoch", ylabel="score", title="Validation")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_json(data: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def atomic_directory(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create ``target`` by ``write(tmp_dir)`` then a rename, so a crash never leaves it half-written.

    An existing ``target`` is replaced only once the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".old-{target.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


__all__ = [
    "METRIC_KEYS",
    "atomic_directory",
    "evaluate_predictions",
    "per_label_table",
    "plot_training_curve",
    "predict_texts",
    "tune_decoding_bias",
    "write_json",
]
