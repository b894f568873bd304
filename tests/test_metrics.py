"""Multi-label metrics: a worked example, scikit-learn agreement, offline evaluate loading."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest

from modeling import METRIC_PATH, compute_multilabel_metrics

PRED = [["a", "b"], ["c"], [], ["a"]]
GOLD = [["a"], ["c"], ["b"], ["a", "c"]]


def test_worked_example_by_hand():
    m = compute_multilabel_metrics(PRED, GOLD)
    # labels a, b, c. tp: a=2, c=1; pred counts a=2, b=1, c=1; gold counts a=2, b=1, c=2
    assert m["micro_f1"] == pytest.approx(2 * 3 / (4 + 5))
    f1 = {"a": 2 * 2 / 4, "b": 0.0, "c": 2 * 1 / 3}
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert m["example_f1"] == pytest.approx((2 / 3 + 1 + 0 + 2 / 3) / 4)
    assert m["subset_accuracy"] == pytest.approx(1 / 4)
    assert m["hamming_loss"] == pytest.approx((1 + 0 + 1 + 1) / 12)
    assert m["jaccard"] == pytest.approx((1 / 2 + 1 + 0 + 1 / 2) / 4)


def test_gold_labels_outside_the_model_vocabulary_count_as_misses():
    """A label the model cannot predict (unseen in training) still costs recall, micro and macro."""
    known = compute_multilabel_metrics([["a"], ["a"]], [["a"], ["a"]], labels=["a"])
    unseen = compute_multilabel_metrics([["a"], ["a"]], [["a", "zzz"], ["a"]], labels=["a"])
    assert known["micro_f1"] == 1.0
    assert unseen["micro_f1"] == pytest.approx(2 * 2 / (2 + 3))
    assert unseen["macro_f1"] == pytest.approx((1.0 + 0.0) / 2)
    assert unseen["subset_accuracy"] == pytest.approx(1 / 2)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_scikit_learn(seed):
    sklearn = pytest.importorskip("sklearn.metrics")
    from sklearn.preprocessing import MultiLabelBinarizer

    rng = random.Random(seed)
    names = [f"l{i}" for i in range(7)]
    gold = [rng.sample(names, rng.randint(0, 3)) for _ in range(40)]
    pred = [rng.sample(names, rng.randint(0, 3)) for _ in range(40)]
    binarizer = MultiLabelBinarizer(classes=names).fit([names])
    y, p = binarizer.transform(gold), binarizer.transform(pred)
    m = compute_multilabel_metrics(pred, gold, labels=names)
    assert m["micro_f1"] == pytest.approx(sklearn.f1_score(y, p, average="micro", zero_division=0))
    assert m["macro_f1"] == pytest.approx(sklearn.f1_score(y, p, average="macro", zero_division=0))
    assert m["example_f1"] == pytest.approx(sklearn.f1_score(y, p, average="samples", zero_division=1))
    assert m["subset_accuracy"] == pytest.approx(sklearn.accuracy_score(y, p))
    assert m["hamming_loss"] == pytest.approx(sklearn.hamming_loss(y, p))
    assert m["jaccard"] == pytest.approx(sklearn.jaccard_score(y, p, average="samples", zero_division=1))


def test_loads_offline_with_evaluate():
    metric = evaluate.load(METRIC_PATH)
    result = metric.compute(predictions=PRED, references=GOLD)
    assert result == pytest.approx(compute_multilabel_metrics(PRED, GOLD))


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_multilabel_metrics([["a"], ["b"]], [["a"]])


def test_macro_f1_is_bit_identical_across_hash_seeds():
    """Per-label F1s are summed in a fixed order: set order (string hashes) would move the last bits."""
    code = (
        "import importlib.util, random, sys\n"
        "spec = importlib.util.spec_from_file_location('m', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "rng = random.Random(0)\n"
        "labels = [f'l{i}' for i in range(300)]\n"
        "refs = [rng.sample(labels, rng.randint(1, 3)) for _ in range(2000)]\n"
        "preds = [rng.sample(labels, rng.randint(1, 3)) for _ in range(2000)]\n"
        "print(repr(module.compute_multilabel_metrics(preds, refs, labels=labels)['macro_f1']))\n"
    )
    script = Path(__file__).resolve().parent.parent / "modeling" / "multilabel_metrics" / "multilabel_metrics.py"
    values = set()
    for seed in (0, 3, 7):  # three different sums under the old set-order code
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        proc = subprocess.run([sys.executable, "-c", code, str(script)], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        values.add(proc.stdout)
    assert len(values) == 1, values
