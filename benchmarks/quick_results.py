#!/usr/bin/env python
"""The README's results table: the main job's recipe on a data set, per seed, beside the linear baseline.

For each seed it runs ``examples/train_multilabel.py --preset quick`` (generation head), which reports
the Transformer alone and the model as shipped (with the hybrid lexical part); then the threshold
head on the first seed and ``benchmarks/svm_baseline.py``. Each run is a separate process, one after
the other. Writes ``<output_dir>/results.json`` and prints the markdown rows.

    python benchmarks/quick_results.py --data reuters --output_dir runs/quick_reuters
    python benchmarks/quick_results.py --data debtags --output_dir runs/quick_debtags
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from reproduce_reuters import DATA as DATA_FILES  # noqa: E402  (name -> (train, test) files, or None)

#: The training script's data flags per data set (none: the embedded Reuters split).
DATA = {
    name: [] if files is None else ["--train_file", files[0], "--test_file", files[1]]
    for name, files in DATA_FILES.items()
}
KEYS = ("micro_f1", "macro_f1", "example_f1", "subset_accuracy", "hamming_loss")


def run(command: list[str]) -> float:
    """Run ``command`` from the repository root; return its wall-clock seconds."""
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    return round(time.time() - start, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=sorted(DATA), default="reuters")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More train_multilabel.py flags.")
    args = p.parse_args(argv)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"data": args.data, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                     "extra_flags": args.extra, "runs": {}}  # fmt: skip
    script = [sys.executable, "examples/train_multilabel.py", "--preset", "quick", "--no_progress", *DATA[args.data]]
    jobs = [("generation", seed) for seed in args.seeds] + [("threshold", args.seeds[0])]
    for head, seed in jobs:
        folder = out / f"{head}_seed{seed}"
        seconds = run([*script, "--head", head, "--seed", str(seed), "--output_dir", str(folder),
                       "--overwrite_output_dir", *args.extra])  # fmt: skip
        metrics = json.loads((folder / "test_metrics.json").read_text())
        results["runs"][f"{head}_seed{seed}"] = {"seconds": seconds, **metrics}
    svm_file = out / "svm.json"
    seconds = run([sys.executable, "benchmarks/svm_baseline.py", *DATA[args.data], "--json", str(svm_file)])
    results["runs"]["svm"] = {"seconds": seconds, **json.loads(svm_file.read_text())}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, row in results["runs"].items():
        for part in ("transformer", "shipped", "svm"):
            if part in row:
                cells = " | ".join(f"{row[part][k]:.4f}" for k in KEYS)
                print(f"| {name} {part} | {cells} | {row['seconds']:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
