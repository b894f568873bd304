"""The model card describes the run's own data: a user's CSV, a Hub data set or the embedded Reuters."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from modeling import LabelformerForMultiLabelGeneration
from modeling.hub_labelformer import TRAINING_DATA_FILE, build_model_card, describe_training_data, training_data_of

from .synthetic import synthetic_config
from .test_hub_labelformer import code_warning
from .textdata import make_texts

ROOT = Path(__file__).resolve().parent.parent


def write_csv(path: Path, rows: list[dict]) -> str:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["body", "tags"])
        writer.writerows([row["text"], ";".join(row["labels"])] for row in rows)
    return str(path)


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          env=env, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory) -> Path:
    """A real `--preset tiny` run of the training script on a user's CSV files (3 labels, no licence given)."""
    folder = tmp_path_factory.mktemp("csv_run")
    train = write_csv(folder / "my_train.csv", make_texts(200, seed=1))
    test = write_csv(folder / "my_test.csv", make_texts(40, seed=2))
    out = folder / "run"
    run_example("train_multilabel.py", "--preset", "tiny", "--no_progress", "--epochs", "1", "--num_beams", "1",
                "--train_file", train, "--test_file", test, "--text_column", "body", "--label_column", "tags",
                "--label_delimiter", ";", "--output_dir", str(out))  # fmt: skip
    return out


def test_the_training_card_of_a_csv_run_describes_that_csv(csv_run):
    card = ModelCard.load(csv_run / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "unknown" and "license_name" not in data
    assert "datasets" not in data  # a local file is no Hub data set
    [result] = {(r.dataset_name, r.dataset_type) for r in card.data.eval_results}
    assert result == ("my_train.csv", "custom")
    text = card.text
    assert "reuters" not in text.lower() and "newswire" not in text.lower() and "1980s" not in text
    assert "Trained on: my_train.csv" in text
    # 200 training rows, 10% held out; 40 test rows; 3 labels
    assert "`my_train.csv` and `my_test.csv`" in text
    assert "180 train, 20 validation, 40 test documents, 3 labels" in text
    assert "Licence of the training data: unknown" in text
    assert code_warning(text) == {p.name for p in csv_run.glob("*.py")}
    recorded = json.loads((csv_run / TRAINING_DATA_FILE).read_text())
    assert recorded["name"] == "my_train.csv" and recorded["license"] == "unknown"


@pytest.mark.parametrize(
    "given, metadata",
    [("CC-BY-4.0", {"license": "cc-by-4.0"}),
     ("Acme internal terms", {"license": "other", "license_name": "acme-internal-terms"})],
)  # fmt: skip
def test_the_pushed_card_keeps_the_run_data_and_takes_a_licence(csv_run, tmp_path, given, metadata):
    from examples.push_to_hub import main

    target = tmp_path / "hub"
    args = ["--model_dir", str(csv_run), "--repo_id", "someone/mine", "--dry_run", str(target)]
    assert main([*args, "--dataset_license", given]) == 0
    card = ModelCard.load(target / "README.md")
    data = card.data.to_dict()
    assert {k: data.get(k) for k in metadata} == metadata
    assert f"Licence of the training data: {given}." in card.text
    assert "180 train, 20 validation, 40 test documents" in card.text and "reuters" not in card.text.lower()
    assert code_warning(card.text) == {p.name for p in target.glob("*.py")}


def test_a_reuters_card_names_reuters_its_licence_and_citation(tmp_path):
    model = LabelformerForMultiLabelGeneration(synthetic_config()).eval()
    data = describe_training_data(split_sizes={"train": 6993, "validation": 777, "test": 3019}, num_labels=90,
                                  labels_per_document=1.24)  # fmt: skip
    build_model_card(model, {"micro_f1": 0.87}, data=data).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    meta = card.data.to_dict()
    assert (meta["license"], meta["license_name"], meta["datasets"]) == (
        "other", "reuters-21578-research-only", ["reuters21578"]
    )  # fmt: skip
    assert card.data.eval_results[0].dataset_name == "Reuters-21578 ApteMod"
    assert "Reuters-21578, Distribution 1.0" in card.text and "1980s" in card.text
    assert "6,993 train, 777 validation, 3,019 test documents, 90 labels (1.24 per training document)" in card.text


def test_a_hub_data_set_is_named_in_the_metadata_and_old_runs_are_not_called_reuters(tmp_path):
    data = describe_training_data(dataset_name="someone/tickets", dataset_license="MIT")
    assert (data.hub_id, data.license) == ("someone/tickets", "MIT")
    model = LabelformerForMultiLabelGeneration(synthetic_config()).eval()
    meta = build_model_card(model, data=data).data.to_dict()
    assert meta["datasets"] == ["someone/tickets"] and meta["license"] == "mit"
    # a folder from before training_data.json: its training_args.json names the file; nothing at all: not recorded
    (tmp_path / "training_args.json").write_text(json.dumps({"train_file": "/data/tickets.jsonl"}))
    assert training_data_of(tmp_path).name == "tickets.jsonl" and training_data_of(tmp_path).license == "unknown"
    assert training_data_of(tmp_path / "empty").name == "(not recorded)"
    card = build_model_card(model)
    assert "reuters" not in card.text.lower() and card.data.to_dict()["license"] == "unknown"


def test_the_card_says_how_many_transformers_decide():
    from modeling import LabelformerEnsembleForMultiLabelGeneration

    members = [LabelformerForMultiLabelGeneration(synthetic_config()).eval() for _ in range(3)]
    ensemble = LabelformerEnsembleForMultiLabelGeneration.from_members(members)
    assert "| Transformers in the model | 3 (trained separately; their mean probability decides) |" in (
        build_model_card(ensemble).text
    )
    assert "| Transformers in the model | 1 |" in build_model_card(members[0]).text
