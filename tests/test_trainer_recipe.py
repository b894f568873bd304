"""The README's `Seq2SeqTrainer` recipe runs as written, with Trainer's defaults, on the user's CSV files."""

from __future__ import annotations

import ast
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

from .textdata import make_texts, trained_text_model

ROOT = Path(__file__).resolve().parent.parent
ALARMS = ("missing keys", "pin_memory", "Removed shared tensor", "to instantiate a model of type", "Traceback")


def readme_recipe() -> str:
    """The first ``python`` block after the README's "Your own `Seq2SeqTrainer` script" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Your own `Seq2SeqTrainer` script") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "tags"])
        writer.writerows([row["text"], ";".join(row["labels"])] for row in rows)


def test_the_readme_trainer_recipe_runs_verbatim(tmp_path):
    code = readme_recipe()
    assert 'load_dataset("csv"' in code and "Seq2SeqTrainer(" in code and "remove_unused_columns" not in code
    model, tokenizer = trained_text_model(steps=40)
    model.save_pretrained(tmp_path / "outputs" / "tiny")
    tokenizer.save_pretrained(tmp_path / "outputs" / "tiny")
    write_csv(tmp_path / "train.csv", make_texts(96, seed=5))
    validation = make_texts(32, seed=6)
    validation[0]["labels"].append("sports")  # a label the model has no token for
    write_csv(tmp_path / "validation.csv", validation)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = ast.literal_eval([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert {"eval_micro_f1", "eval_macro_f1", "eval_subset_accuracy", "eval_loss"} <= set(metrics)
    assert 0.5 < metrics["eval_micro_f1"] <= 1.0  # the toy task is learnt; a broken decode scores ~0
    assert sorted(p.name for p in (tmp_path / "outputs" / "trainer").glob("checkpoint-*"))
    printed = proc.stdout + proc.stderr
    assert not [alarm for alarm in ALARMS if alarm in printed], printed[-3000:]
    assert printed.count("left out of the targets") == 1  # the unknown label, said once
