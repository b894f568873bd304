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
from .lexical_labelformer import LEXICAL_SCALES
from .multilabel_metrics.multilabel_metrics import compute_multilabel_metrics, per_label_scores

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


def micro_f1(chosen: torch.Tensor, targets: torch.Tensor) -> float:
    """Micro-F1 of boolean decisions ``[n, L]`` against 0/1 targets ``[n, L]``."""
    gold = targets.bool()
    denominator = int(chosen.sum() + gold.sum())
    return 2 * int((chosen & gold).sum()) / denominator if denominator else 1.0


@torch.no_grad()
def calibrate_threshold_head(
    model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], max_length: int | None, batch_size: int = 64
) -> dict[str, float]:
    """Fit the threshold head's decision on validation ``rows`` (``{"text", "labels"}``) and fold it in.

    Tries every threshold in 0.05..0.95 with every lexical scale (`LEXICAL_SCALES`, when the model
    has the lexical part; 0 always), keeps the best validation micro-F1 (ties: the smaller scale, the
    threshold nearest 0.5), sets the scale and folds the threshold into the classifier's bias
    (`fold_threshold`). Returns ``{"threshold", "lexical_scale", "validation_micro_f1"}``.
    """
    collator = MultiLabelCollator(tokenizer, model.config, max_length, head="classification")
    scorer = model.lexical_scorer
    logits, margins, targets = [], [], []
    for start in range(0, len(rows), batch_size):
        batch = collator(list(rows[start : start + batch_size]))
        ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        out = model(input_ids=ids, attention_mask=mask).logits.float()
        lexical = scorer.margins(ids) if scorer is not None else torch.zeros_like(out)
        if scorer is not None:
            out = out - scorer(ids)  # the network's own logits
        logits.append(out.cpu())
        margins.append(lexical.cpu())
        targets.append(batch["labels"])
    logits, margins, targets = torch.cat(logits), torch.cat(margins), torch.cat(targets)
    scales = (0.0, *LEXICAL_SCALES) if scorer is not None else (0.0,)
    thresholds = [round(0.05 * k, 2) for k in range(1, 20)]
    best = max(
        (micro_f1(torch.sigmoid(logits + s * margins) > t, targets), -s, -abs(t - 0.5), s, t)
         for s in scales for t in thresholds
    )  # fmt: skip
    f1, _, _, scale, threshold = best
    if scorer is not None:
        scorer.scale.fill_(scale)
    model.fold_threshold(threshold)
    return {"threshold": threshold, "lexical_scale": scale, "validation_micro_f1": f1}


@torch.no_grad()
def calibrate_lexical_scale(
    model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], max_length: int | None, batch_size: int = 64
) -> dict[str, float]:
    """Choose the generation head's lexical scale on validation ``rows`` by greedy micro-F1 and set it.

    Scale 0 (the Transformer alone) is always tried and wins ties. Returns ``{"lexical_scale",
    "validation_micro_f1", "transformer_validation_micro_f1"}``.
    """
    texts = [row["text"] for row in rows]
    references = [row["labels"] for row in rows]
    labels = list(model.config.id2label.values())
    results = []
    for scale in (0.0, *LEXICAL_SCALES):
        model.lexical_scorer.scale.fill_(scale)
        predictions = predict_texts(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
        results.append((evaluate_predictions(predictions, references, labels)["micro_f1"], -scale))
    f1, scale = max(results)
    model.lexical_scorer.scale.fill_(-scale)
    return {"lexical_scale": -scale, "validation_micro_f1": f1, "transformer_validation_micro_f1": results[0][0]}


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")  # see `recover_directories`
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
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def replace_directory(new: Path, target: Path) -> None:
    """Move the complete folder ``new`` to ``target``, replacing an existing ``target`` by two renames.

    A kill between the renames leaves the old copy as ``.old-<name>`` beside a missing ``target``;
    `recover_directories` puts it back (the training script calls it at start).
    """
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def recover_directories(folder: Path) -> list[str]:
    """Undo what a kill inside `atomic_directory` / `replace_directory` left in ``folder``.

    An ``.old-<name>`` whose ``<name>`` is missing is renamed back; other ``.old-*`` and every
    half-written ``.tmp-*`` are deleted. Returns the names restored or removed.
    """
    touched = []
    for entry in sorted(folder.glob(".old-*")):
        target = folder / entry.name[len(".old-") :]
        if target.exists():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            os.replace(entry, target)
        touched.append(entry.name)
    for entry in sorted(folder.glob(".tmp-*")):
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
        touched.append(entry.name)
    return touched


__all__ = [
    "METRIC_KEYS",
    "atomic_directory",
    "evaluate_predictions",
    "per_label_table",
    "plot_training_curve",
    "predict_texts",
    "recover_directories",
    "replace_directory",
    "calibrate_lexical_scale",
    "calibrate_threshold_head",
    "micro_f1",
    "write_json",
]
