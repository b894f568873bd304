#!/usr/bin/env python
"""Reproduce the README's one-hour results: the Transformer alone, the shipped model, the threshold head and
the linear SVM on Reuters-21578 (ApteMod), from scratch, in one command on 2 CPU cores.

    python examples/reproduce_reuters.py --output_dir runs/reuters
    python examples/reproduce_reuters.py --output_dir runs/debtags --data debtags   # the second data set

Each system trains in its own process, one after the other, on the same split (10% of train is
validation, seed 42 by default); each system is scored on the test set once, by its best epoch on
validation:

- ``transformer``: the generation head of ``train_multilabel.py --preset reproduce``, nothing but its
  own layers deciding (saved in ``DIR/transformer``);
- ``shipped``: the same model with its hybrid lexical part, scale chosen on validation (``DIR/shipped``);
  with ``--members N`` > 1, an ensemble of N such Transformers (seeds ``--seed``, ``--seed`` + 1, ...; one
  split and tokenizer) whose mean probability decides, with the lexical part; then also reported:
  ``ensemble`` (the members alone), ``transformer_lexical`` (the one Transformer with the lexical part)
  and each other member alone (``transformer_seed<N>``). Measured in benchmarks/RESULTS.md ("Several
  Transformers in one model"): it lifts the Transformers alone on both data sets but not the shipped
  model's Reuters micro-F1, so the default is 1;
- ``threshold``: the threshold head on the same recipe, with its lexical part (``DIR/threshold``);
- ``svm``: tf-idf + one-vs-rest LinearSVC, C chosen on validation (``benchmarks/svm_baseline.py``).

``DIR/results.json`` holds the rows ``transformer``, ``shipped``, ``threshold`` (and
``threshold_alone``, the threshold head without its lexical part), ``svm``, and with ``--members`` > 1
``ensemble``, ``transformer_lexical`` and ``transformer_seed<N>`` (micro_f1, macro_f1,
example_f1, subset_accuracy, hamming_loss), the seconds each took, the commands that ran and the
machine; it is written after every step. The training runs (logs, curves,
checkpoints, per-label tables) stay in ``DIR/runs/``. At the end both generation models are reloaded
the way users load them (``AutoModelForSeq2SeqLM``, ``trust_remote_code=True``) and their
``predict_labels`` answers are scored again: a different micro-F1 is an error (on the training device's
numbers: run it where it trained). Folders that hold models already are refused unless
``--overwrite_output_dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modeling import load_multilabel_dataset  # noqa: E402
from modeling.evaluation_labelformer import METRIC_KEYS, evaluate_predictions, write_json  # noqa: E402

logger = logging.getLogger("reproduce_reuters")

DATA = {  # name -> (train file, test file); None: the embedded Reuters-21578 ApteMod split
    "reuters": None,
    "debtags": (str(ROOT / "data/debtags/train.jsonl.gz"), str(ROOT / "data/debtags/test.jsonl.gz")),
}
#: Files of a training run's output folder that are not part of the shipped model.
RUN_RECORDS = ("test_metrics.json", "history.json", "training_args.json", "per_label_metrics.md", "training_curve.png")


def run(command: list[str], log: Path) -> float:
    """Run ``command`` from the repository root, its output to ``log``; return its wall-clock seconds."""
    start = time.time()
    with open(log, "w") as stream:
        done = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"error: {Path(command[1]).name} failed (exit {done.returncode}); see {log}")
    return round(time.time() - start, 1)


def copy_model(source: Path, target: Path) -> None:
    """Copy a saved model folder's files (not its sub-folders nor the run's records) to ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in RUN_RECORDS:
            shutil.copy2(path, target / path.name)


def reload_micro_f1(folder: Path, texts: list[str], references: list[list[str]]) -> float:
    """Test micro-F1 of the model in ``folder`` loaded as users load it, answering through `predict_labels`."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    predictions = model.predict_labels(texts, tokenizer, batch_size=64, allow_empty=True)
    return evaluate_predictions(predictions, references, list(model.config.id2label.values()))["micro_f1"]


#: Flags the script sets itself; in ``--extra`` they would make it read the wrong folders.
RESERVED_FLAGS = ("--output_dir", "--head", "--train_file", "--test_file", "--overwrite_output_dir", "--seed",
                  "--split_seed", "--ensemble_with")  # fmt: skip
MODEL_FOLDERS = ("transformer", "shipped", "threshold")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--data", choices=sorted(DATA), default="reuters", help="reuters, or the second data set.")
    p.add_argument("--train_file", help="Your own data instead of --data (jsonl/csv/... with text and labels).")
    p.add_argument("--test_file", help="With --train_file: its test split.")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--members", type=int, default=1,
                   help="Transformers in the shipped model (2: an ensemble of two, +15 min on Reuters).")  # fmt: skip
    p.add_argument("--systems", nargs="+", choices=["generation", "threshold", "svm"],
                   default=["generation", "threshold", "svm"],
                   help="What to train (generation: the transformer and shipped rows).")  # fmt: skip
    p.add_argument("--max_train_samples", type=int, help="Fewer training documents (a smoke run).")
    p.add_argument("--overwrite_output_dir", action="store_true", help="Retrain over the runs of an earlier call.")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="More train_multilabel.py flags, after the recipe's (e.g. --extra --epochs 8).")  # fmt: skip
    args = p.parse_args(argv)
    if args.members < 1:
        p.error(f"--members must be >= 1 (got {args.members}).")
    if bool(args.train_file) != bool(args.test_file):
        p.error("--train_file and --test_file go together (the rows are test-set scores).")
    reserved = [flag for flag in args.extra if flag.split("=")[0] in RESERVED_FLAGS]
    if reserved:
        p.error(f"{', '.join(reserved)} cannot go in --extra: use this script's own flags.")
    out = Path(args.output_dir).resolve()
    taken = [out / name for name in MODEL_FOLDERS if (out / name).is_dir() and any((out / name).iterdir())]
    if taken and not args.overwrite_output_dir:
        p.error(f"{', '.join(map(str, taken))} already hold models: pass --overwrite_output_dir to replace "
                "them, or choose another --output_dir.")  # fmt: skip
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    data: dict = {"train_file": None, "test_file": None, "max_train_samples": args.max_train_samples}
    if args.train_file:  # absolute: the training runs start in the repository root
        data.update(train_file=str(Path(args.train_file).resolve()), test_file=str(Path(args.test_file).resolve()))
        args.data = Path(args.train_file).name
    elif DATA[args.data]:
        data.update(train_file=DATA[args.data][0], test_file=DATA[args.data][1])
    data_flags = [f"--{key}={value}" for key, value in data.items() if value is not None]
    train = [sys.executable, "examples/train_multilabel.py", "--preset", "reproduce", "--num_beams", "1",
             "--no_progress", "--split_seed", str(args.seed), *data_flags]  # fmt: skip
    if args.overwrite_output_dir:
        train.append("--overwrite_output_dir")
    start = time.time()
    results: dict = {
        "data": args.data,
        "seed": args.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "recipe": ["--preset", "reproduce", *args.extra],
        "commands": {},
        "rows": {},
        "seconds": {},
    }

    def save() -> None:  # after every step: a late failure keeps what was measured
        results["seconds"]["total"] = round(time.time() - start, 1)
        write_json(results, out / "results.json")

    steps = [
        (f"member{k}", "generation", args.seed + k)
        for k in range(1, args.members if "generation" in args.systems else 1)
    ]
    steps += [(head, head, args.seed) for head in args.systems if head != "svm"]
    for name, head, seed in steps:
        folder = runs / name
        logger.info("training %s (the %s head, seed %d; log: %s)", name, head, seed, runs / f"{name}.log")
        command = [*train, "--seed", str(seed), "--head", head, "--output_dir", str(folder)]
        if name.startswith("member"):  # the Transformer alone: its lexical part would be the ensemble's
            command.append("--no-lexical_scorer")
        elif head == "generation" and args.members > 1:
            command += ["--ensemble_with", *(str(runs / f"member{k}" / "best_model") for k in range(1, args.members))]
        command += args.extra
        results["commands"][name] = command[1:]
        seconds = run(command, runs / f"{name}.log")
        metrics = json.loads((folder / "test_metrics.json").read_text())
        if name.startswith("member"):
            results["rows"][f"transformer_seed{seed}"] = metrics["transformer"]
        elif head == "generation":
            copy_model(folder / "best_model", out / "transformer")
            copy_model(folder, out / "shipped")
            results["rows"].update(transformer=metrics["transformer"], shipped=metrics["shipped"])
            results["rows"].update({key: metrics[key] for key in ("ensemble", "transformer_lexical") if key in metrics})
        else:
            copy_model(folder, out / "threshold")
            results["rows"].update(threshold=metrics["shipped"], threshold_alone=metrics["transformer"])
        results["seconds"][name] = seconds
        save()
        logger.info("%s: %s (%.0f s)", name, json.dumps({k: round(v, 4) for k, v in metrics["shipped"].items()}),
                    seconds)  # fmt: skip
    if "svm" in args.systems:
        svm_file = runs / "svm.json"
        command = [sys.executable, "benchmarks/svm_baseline.py", *data_flags, "--seed", str(args.seed),
                   "--json", str(svm_file)]  # fmt: skip
        results["commands"]["svm"] = command[1:]
        results["seconds"]["svm"] = run(command, runs / "svm.log")
        results["rows"]["svm"] = json.loads(svm_file.read_text())["svm"]
        save()

    mismatch = []
    if "generation" in args.systems:  # the saved models answer as the rows say
        test = load_multilabel_dataset(**data, seed=args.seed)["test"]
        for name in ("transformer", "shipped"):
            again = reload_micro_f1(out / name, list(test["text"]), list(test["labels"]))
            results["rows"][name]["reloaded_micro_f1"] = again
            if abs(again - results["rows"][name]["micro_f1"]) > 1e-9:
                mismatch.append(f"{out / name} reloaded scores micro-F1 {again:.4f}, its row "
                                f"{results['rows'][name]['micro_f1']:.4f}")  # fmt: skip
    save()
    if mismatch:
        raise SystemExit("error: " + "; ".join(mismatch))
    print(f"\n| {args.data} row | " + " | ".join(METRIC_KEYS) + " |")
    print("|---|" + "---:|" * len(METRIC_KEYS))
    for name, row in results["rows"].items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in METRIC_KEYS) + " |")
    print(f"\n{results['seconds']['total'] / 60:.1f} minutes; results and models in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
