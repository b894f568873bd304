#!/usr/bin/env python
"""The linear baseline of the results table: tf-idf + one-vs-rest LinearSVC, C chosen on validation.

Uses the same data loading and validation split (10% of train, seed 42) as `train_multilabel.py`,
so its row compares like for like with the Transformer's:

    python benchmarks/svm_baseline.py                       # embedded Reuters-21578
    python benchmarks/svm_baseline.py --train_file data/debtags/train.jsonl.gz --test_file data/debtags/test.jsonl.gz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402
from sklearn.multiclass import OneVsRestClassifier  # noqa: E402
from sklearn.preprocessing import MultiLabelBinarizer  # noqa: E402
from sklearn.svm import LinearSVC  # noqa: E402

from modeling import build_label_vocabulary, load_multilabel_dataset  # noqa: E402
from modeling.evaluation_labelformer import evaluate_predictions  # noqa: E402

C_GRID = (0.25, 1.0, 4.0, 16.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train_file")
    p.add_argument("--test_file")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_train_samples", type=int, help="Fewer training documents (a smoke run).")
    p.add_argument("--json", help="Also write the row to this file.")
    args = p.parse_args(argv)
    start = time.time()
    data = load_multilabel_dataset(
        train_file=args.train_file, test_file=args.test_file, seed=args.seed, max_train_samples=args.max_train_samples
    )
    labels = build_label_vocabulary(data["train"]["labels"])
    binarizer = MultiLabelBinarizer(classes=labels)
    y_train = binarizer.fit_transform([[x for x in row if x in set(labels)] for row in data["train"]["labels"]])
    vectorizer = TfidfVectorizer(sublinear_tf=True)
    x_train = vectorizer.fit_transform(list(data["train"]["text"]))

    def predict(c: float, split: str) -> list[list[str]]:
        model = OneVsRestClassifier(LinearSVC(C=c, max_iter=20_000, random_state=args.seed)).fit(x_train, y_train)
        return [
            list(row) for row in binarizer.inverse_transform(model.predict(vectorizer.transform(data[split]["text"])))
        ]

    validation = {c: evaluate_predictions(predict(c, "validation"), data["validation"]["labels"], labels)["micro_f1"]
                  for c in C_GRID}  # fmt: skip
    best_c = max(validation, key=validation.get)
    row = {
        "svm": evaluate_predictions(predict(best_c, "test"), data["test"]["labels"], labels),
        "C": best_c,
        "validation_micro_f1_by_C": validation,
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(row, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
