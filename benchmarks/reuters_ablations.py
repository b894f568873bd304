#!/usr/bin/env python
"""Ablations of the Reuters recipe, scored on the validation split only (the test set is not read).

Each variant is `examples/reproduce_reuters.py`'s recipe with one change, trained with
`examples/train_multilabel.py --skip_test`; the table reports the best epoch's validation metrics.
Variants run ``--jobs`` at a time (several fit on one GPU).

    python benchmarks/reuters_ablations.py --output_dir runs/ablations --jobs 4
    python benchmarks/reuters_ablations.py --output_dir runs/ablations --only baseline label_order=random

``--from_threshold DIR`` ablates the two-stage recipe instead: generator variants start from the
encoder of a finished threshold-head run (e.g. ``runs/reuters/threshold`` of `reproduce_reuters.py`),
with its tokenizer and the recipe's generator settings (dropout 0, 4 epochs), which is affordable
on a CPU:

    python benchmarks/reuters_ablations.py --output_dir runs/ablations2 --from_threshold runs/reuters/threshold \
        --only baseline scheduled_sampling=0.2 "decoder_layers=2"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from examples.reproduce_reuters import (  # noqa: E402
    RECIPE,
    SEED,
    VALIDATION_FRACTION,
    system_settings,
    train_arguments,
)
from modeling import load_multilabel_dataset, train_tokenizer  # noqa: E402
from modeling.tokenization_labelformer import save_tokenizer  # noqa: E402

# name -> (head, changes to the recipe)
VARIANTS: dict[str, tuple[str, dict]] = {
    "baseline": ("generation", {}),
    "threshold head": ("threshold", {}),
    "parallel head": ("parallel", {}),
    "no weight averaging": ("generation", {"ema_decay": 0.0}),
    "threshold, no weight averaging": ("threshold", {"ema_decay": 0.0}),
    "label_order=random": ("generation", {"label_order": "random"}),
    "label_order=alphabetical": ("generation", {"label_order": "alphabetical"}),
    "dropout=0.2": ("generation", {"dropout": 0.2}),
    "dropout=0.0": ("generation", {"dropout": 0.0}),
    "label_smoothing=0.1": ("generation", {"label_smoothing": 0.1}),
    "scheduled_sampling=0.2": ("generation", {"scheduled_sampling": 0.2}),
    "d_model=384, 3+2 layers": ("generation", {"d_model": 384, "encoder_layers": 3, "decoder_layers": 2,
                                               "attention_heads": 6, "ffn_dim": 1536}),
    "d_model=128": ("generation", {"d_model": 128, "ffn_dim": 512}),
    "learning_rate=5e-4": ("generation", {"learning_rate": 5e-4}),
    "learning_rate=2e-3": ("generation", {"learning_rate": 2e-3}),
    "epochs=24": ("generation", {"epochs": 24, "early_stopping_patience": 6}),
    "max_length=512": ("generation", {"max_length": 512}),
    "max_length=128": ("generation", {"max_length": 128}),
    "threshold, max_length=128": ("threshold", {"max_length": 128}),
    "auxiliary_bce_weight=1": ("generation", {"auxiliary_bce_weight": 1.0}),
    "auxiliary_bce_weight=1, dropout=0": ("generation", {"auxiliary_bce_weight": 1.0, "dropout": 0.0}),
    "dropout=0, label_smoothing=0.1": ("generation", {"dropout": 0.0, "label_smoothing": 0.1}),
    "dropout=0, 2 decoder layers": ("generation", {"dropout": 0.0, "decoder_layers": 2}),
    "dropout=0, learning_rate=2e-3": ("generation", {"dropout": 0.0, "learning_rate": 2e-3}),
    "max_length=128, dropout=0": ("generation", {"max_length": 128, "dropout": 0.0}),
    "max_length=128, auxiliary_bce_weight=1": ("generation", {"max_length": 128, "auxiliary_bce_weight": 1.0}),
    "max_length=128, dropout=0, auxiliary_bce_weight=1": (
        "generation", {"max_length": 128, "dropout": 0.0, "auxiliary_bce_weight": 1.0}),
    "threshold, max_length=128, dropout=0": ("threshold", {"max_length": 128, "dropout": 0.0}),
    "dropout=0.1": ("generation", {"dropout": 0.1}),
    "decoder_layers=2": ("generation", {"decoder_layers": 2}),
    "epochs=6": ("generation", {"epochs": 6}),
    "seed=43": ("generation", {"seed": 43}),
    "threshold, learning_rate=2e-3": ("threshold", {"learning_rate": 2e-3}),
    "encoder_lr_scale=0.3": ("generation", {"encoder_lr_scale": 0.3}),
}  # fmt: skip


def variant_settings(head: str, changes: dict, from_threshold: Path | None) -> dict:
    """The recipe with ``changes``; two-stage generator variants start from ``from_threshold``'s encoder."""
    if from_threshold is None or head == "threshold":
        return {**RECIPE, **changes}
    system = "seq2seq" if head == "generation" else head
    return {**system_settings(system, from_threshold), **changes}


def run_variant(name: str, head: str, changes: dict, args, tokenizer_dir: Path) -> dict:
    settings = variant_settings(head, changes, args.from_threshold)
    settings.pop("vocab_size")  # the shared tokenizer fixes it
    seed = settings.pop("seed", SEED)
    out = Path(args.output_dir) / name.replace(" ", "_").replace(",", "").replace("=", "-").replace("+", "p")
    command = [
        sys.executable, *train_arguments(head, out, tokenizer_dir, settings, seed), "--skip_test", "--no_progress"
    ]  # fmt: skip
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        return {"variant": name, "error": proc.stderr[-2000:]}
    history = json.loads((out / "history.json").read_text())
    epochs = [h for h in history if "validation_micro_f1" in h]
    best = max(epochs, key=lambda h: h["validation_micro_f1"])
    row = {
        "variant": name,
        "head": head,
        "best_epoch": best["epoch"],
        "epochs_run": len(epochs),
        "seconds": round(seconds, 1),
        **{k.removeprefix("validation_"): v for k, v in best.items() if k.startswith("validation_")},
    }
    print(json.dumps(row), flush=True)  # progress: one line per finished variant
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="Run these variants only.")
    p.add_argument("--from_threshold", type=Path,
                   help="A finished threshold-head run: generator variants start from its encoder and use its "
                        "tokenizer (the two-stage recipe).")  # fmt: skip
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_threshold is not None and not (args.from_threshold / "model.safetensors").is_file():
        p.error(f"--from_threshold {args.from_threshold}: no model.safetensors there (a finished threshold run).")
    data = load_multilabel_dataset(validation_fraction=VALIDATION_FRACTION, seed=SEED)
    tokenizer_dir = args.from_threshold or out / "tokenizer"
    if not tokenizer_dir.is_dir():
        tokenizer = train_tokenizer(list(data["train"]["text"]), vocab_size=RECIPE["vocab_size"],
                                    model_max_length=RECIPE["max_length"])  # fmt: skip
        save_tokenizer(tokenizer, tokenizer_dir)
    names = args.only or list(VARIANTS)
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda n: run_variant(n, *VARIANTS[n], args, tokenizer_dir), names))
    (out / "ablations.json").write_text(json.dumps(rows, indent=2))
    header = f"{'variant (validation split)':34s} {'micro-F1':>9s} {'macro-F1':>9s} {'subset':>7s}"
    print(f"{header} {'epoch':>6s} {'s':>6s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:34s} failed: {r['error'][-300:]}")
            continue
        print(f"{r['variant']:34s} {r['micro_f1']:9.4f} {r['macro_f1']:9.4f} {r['subset_accuracy']:7.4f} "
              f"{r['best_epoch']:>3d}/{r['epochs_run']:<2d} {r['seconds']:6.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
