"""The one-hour reproduction, as a smoke run: every row, the saved models, and the reload check.

Runs ``examples/reproduce_reuters.py`` with ``--preset tiny`` on a 240/80-document slice of the
embedded Reuters-21578; the full recipe's figures are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from modeling.data_labelformer import REUTERS_DIR

ROOT = Path(__file__).resolve().parent.parent
METRICS = {"micro_f1", "macro_f1", "example_f1", "subset_accuracy", "hamming_loss"}


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_reuters", ROOT / "examples" / "reproduce_reuters.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture(scope="module")
def reuters_slice(tmp_path_factory) -> list[str]:
    """``--train_file``/``--test_file`` flags of the first 240 training and 80 test documents."""
    folder = tmp_path_factory.mktemp("reuters_slice")
    flags = []
    for split, n in (("train", 240), ("test", 80)):
        with gzip.open(REUTERS_DIR / f"{split}.jsonl.gz", "rt") as f:
            (folder / f"{split}.jsonl").write_text("".join(itertools.islice(f, n)))
        flags += [f"--{split}_file", str(folder / f"{split}.jsonl")]
    return flags


def test_reproduction_writes_every_row_and_models_that_reload_to_their_rows(tmp_path: Path, reuters_slice) -> None:
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), *reuters_slice, "--members", "2", "--extra", "--preset", "tiny", "--epochs", "1"]
    assert load_script().main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {"transformer", "shipped", "threshold", "threshold_alone", "svm", "ensemble",
                                    "transformer_lexical", "transformer_seed43"}  # fmt: skip
    for name, row in results["rows"].items():
        assert set(row) >= METRICS, name
        assert all(0.0 <= row[key] <= 1.0 for key in METRICS), (name, row)
    assert results["rows"]["svm"]["micro_f1"] > 0.3  # tf-idf + LinearSVC learns Reuters from 216 documents
    assert results["data"] == "train.jsonl"
    for name in ("transformer", "shipped"):  # the script reloaded each through AutoModelForSeq2SeqLM
        assert results["rows"][name]["reloaded_micro_f1"] == results["rows"][name]["micro_f1"]
    assert results["seconds"]["total"] >= results["seconds"]["generation"] > 0
    assert results["recipe"][:2] == ["--preset", "reproduce"] and "tiny" in results["recipe"]
    assert set(results["seconds"]) == {"member1", "generation", "threshold", "svm", "total"}
    # The Transformer alone has no lexical part; the shipped model and the threshold head carry theirs.
    configs = {name: AutoConfig.from_pretrained(out / name, trust_remote_code=True) for name in
               ("transformer", "shipped", "threshold")}  # fmt: skip
    assert not configs["transformer"].lexical_scorer
    assert configs["shipped"].lexical_scorer and configs["threshold"].lexical_scorer
    # The shipped model holds both Transformers (seeds 42 and 43, one split, one tokenizer); the rows differ.
    assert configs["shipped"].ensemble_size == 2 and configs["transformer"].ensemble_size == 1
    assert configs["shipped"].architectures == ["LabelformerEnsembleForMultiLabelGeneration"]
    member = json.loads((out / "runs" / "member1" / "training_args.json").read_text())
    main = json.loads((out / "runs" / "generation" / "training_args.json").read_text())
    assert (member["seed"], member["split_seed"], main["seed"], main["split_seed"]) == (43, 42, 42, 42)
    assert main["ensemble_with"] == [str(out.resolve() / "runs" / "member1" / "best_model")]
    assert not (out / "shipped" / "test_metrics.json").exists()  # the run's records stay in runs/
    for head in ("generation", "threshold"):  # the flags after --extra won over the recipe's
        trained = json.loads((out / "runs" / head / "training_args.json").read_text())
        assert (trained["d_model"], trained["epochs"], trained["head"]) == (32, 1, head)
        assert results["commands"][head][-3:] == ["tiny", "--epochs", "1"]
    with pytest.raises(SystemExit):  # the saved models are never replaced without --overwrite_output_dir
        load_script().main(argv)
    assert json.loads((out / "results.json").read_text()) == results


def test_reproduction_stops_with_the_failing_step_named(tmp_path: Path) -> None:
    argv = ["--output_dir", str(tmp_path), "--systems", "generation", "--extra", "--preset", "tiny", "--epochs", "0"]
    with pytest.raises(SystemExit, match="train_multilabel.py failed.*generation.log"):  # no member run by default
        load_script().main(argv)


@pytest.mark.parametrize(
    "argv, message",
    [(["--train_file", "train.jsonl"], "go together"), (["--extra", "--output_dir", "elsewhere"], "--output_dir")],
)
def test_reproduction_refuses_contradictory_flags(tmp_path: Path, argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        load_script().main(["--output_dir", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
