"""examples/reproduce_reuters.py end to end on a slice of the embedded data with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ("--d_model 32 --ffn_dim 64 --attention_heads 2 --encoder_layers 1 --decoder_layers 1 --max_length 48 "
        "--eval_batch_size 128 --num_beams 2")  # fmt: skip


def run_reproduce(out: Path, *flags: str) -> subprocess.CompletedProcess:
    """reproduce_reuters.py on 300 training documents, one epoch, the tiny model; must succeed."""
    command = [
        sys.executable, str(ROOT / "examples" / "reproduce_reuters.py"), "--output_dir", str(out),
        "--max_train_samples", "300", "--epochs", "1", "--no_progress", "--train_args", TINY, *flags,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_reproduce_reuters_writes_the_comparison(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "reuters"
    proc = run_reproduce(out, "--seq2seq_init", "threshold")
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"seq2seq_greedy", "seq2seq_beam", "threshold", "svm"}
    for name, metrics in results.items():
        assert {"micro_f1", "macro_f1", "example_f1", "subset_accuracy", "hamming_loss"} <= set(metrics), name
        assert 0.0 <= metrics["micro_f1"] <= 1.0
    assert results["seq2seq_beam"]["num_beams"] == 2
    assert results["svm"]["micro_f1"] > 0.5  # 300 documents are plenty for tf-idf + SVM to beat chance
    for folder in ("seq2seq", "seq2seq_seed43", "threshold"):
        assert (out / folder / "model.safetensors").is_file() and (out / folder / "config.json").is_file()
    assert "encoder initialised from" in proc.stderr  # --seq2seq_init threshold: threshold first
    threshold_done = (out / "threshold" / "model.safetensors").stat().st_mtime
    assert threshold_done < (out / "seq2seq" / "model.safetensors").stat().st_mtime  # threshold head first
    info = json.loads((out / "run_info.json").read_text())
    assert {"tokenizer", "threshold", "seq2seq", "svm", "total"} <= set(info["seconds"])
    assert "seq2seq_beam" in proc.stdout and "Times (s)" in proc.stdout
    # three seq2seq seeds on one split: each member's own scores, the ensemble in results.json
    members = info["seq2seq_members"]
    assert [m["seed"] for m in members] == [42, 43, 44] and "seq2seq seed 44" in proc.stdout
    for folder in ("seq2seq", "seq2seq_seed43", "seq2seq_seed44"):
        member_args = json.loads((out / folder / "training_args.json").read_text())
        assert member_args["split_seed"] == 42 and member_args["tune_decoding_bias"] is False  # the ensemble's job
    assert 0.0 <= info["seq2seq_ensemble_validation"]["micro_f1"] <= 1.0
    tuned = info["seq2seq_ensemble_decoding_bias"]
    assert tuned["micro_f1"] >= tuned["unbiased_micro_f1"]
    assert tuned["micro_f1"] == pytest.approx(info["seq2seq_ensemble_validation"]["micro_f1"])

    # a generator variant on the finished run's threshold head and tokenizer: nothing of those retrained
    variant = tmp_path / "variant"
    run_reproduce(variant, "--threshold_from", str(out), "--set", "seq2seq.label_order=alphabetical",
                  "--set", "warmup_ratio=0.1", "--systems", "seq2seq", "--seq2seq_seeds", "1")  # fmt: skip
    assert not (variant / "threshold").exists() and not (variant / "tokenizer").exists()
    variant_results = json.loads((variant / "results.json").read_text())
    assert set(variant_results) == {"seq2seq_greedy", "seq2seq_beam", "threshold"}
    assert variant_results["threshold"] == {k: results["threshold"][k] for k in variant_results["threshold"]}
    variant_args = json.loads((variant / "seq2seq" / "training_args.json").read_text())
    assert variant_args["label_order"] == "alphabetical" and variant_args["warmup_ratio"] == 0.1
    assert json.loads((out / "seq2seq" / "training_args.json").read_text())["label_order"] == "frequency"
    assert Path(variant_args["init_encoder_from"]) == out / "threshold"
    assert Path(variant_args["tokenizer_name_or_path"]) == out / "tokenizer"
    variant_info = json.loads((variant / "run_info.json").read_text())
    assert variant_info["set"] == ["seq2seq.label_order=alphabetical", "warmup_ratio=0.1"]
    assert variant_info["threshold_from"] == str(out)


def test_two_stage_ablation_settings():
    """benchmarks/reuters_ablations.py --from_threshold: generator variants are the reproduction's
    two-stage generator settings (encoder from the given run, dropout 0, its epochs) plus the change."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.reuters_ablations import variant_settings
    from examples.reproduce_reuters import FROM_THRESHOLD, PER_SYSTEM, RECIPE

    folder = Path("runs/threshold")
    baseline = variant_settings("generation", {}, folder)
    assert baseline["init_encoder_from"] == folder
    assert baseline["dropout"] == PER_SYSTEM["seq2seq"]["dropout"] and baseline["epochs"] == FROM_THRESHOLD["epochs"]
    assert variant_settings("generation", {"decoder_layers": 2}, folder) == {**baseline, "decoder_layers": 2}
    assert variant_settings("threshold", {}, folder) == RECIPE  # the threshold head trains from scratch
    assert variant_settings("generation", {}, None) == RECIPE  # single-stage ablations, as before


def test_recipe_overrides_are_checked():
    """--set: key=value for every neural head, system.key=value for one; typos are errors, not no-ops."""
    sys.path.insert(0, str(ROOT))
    from examples.reproduce_reuters import parse_overrides

    overrides = parse_overrides(["seq2seq.decoder_layers=2", "learning_rate=5e-4", "label_order=alphabetical"])
    assert overrides["seq2seq"] == {"decoder_layers": 2, "learning_rate": 5e-4, "label_order": "alphabetical"}
    assert overrides["threshold"] == {"learning_rate": 5e-4, "label_order": "alphabetical"}
    assert parse_overrides(["seq2seq.encoder_lr_scale=0.3"])["seq2seq"] == {"encoder_lr_scale": 0.3}  # not in RECIPE
    bad = [("decoder_layers", "key=value"), ("svm.C=4", "unknown system"),
           ("seq2seq.decoder_layer=2", "did you mean decoder_layers"), ("seq2seq.vocab_size=8000", "tokenizer"),
           ("seed=1", "sets --seed itself")]  # fmt: skip
    for item, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_overrides([item])


def test_threshold_seeds_vote_together(tmp_path):
    """--threshold_seeds 2: two threshold heads scored by their mean probabilities at a threshold fit on validation."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from examples.reproduce_reuters import VALIDATION_FRACTION
    from modeling import LabelformerEnsemble, compute_multilabel_metrics, load_multilabel_dataset

    out = tmp_path / "reuters"
    proc = run_reproduce(out, "--systems", "threshold", "seq2seq", "--threshold_seeds", "2", "--seq2seq_seeds", "3")
    info = json.loads((out / "run_info.json").read_text())
    assert [m["seed"] for m in info["threshold_members"]] == [42, 43] and "threshold seed 43" in proc.stdout
    assert json.loads((out / "threshold_seed43" / "training_args.json").read_text())["seed"] == 43
    # generator member k starts from threshold member k (mod 2): more diverse members
    for folder, source in (("seq2seq", "threshold"), ("seq2seq_seed43", "threshold_seed43"),
                           ("seq2seq_seed44", "threshold")):  # fmt: skip
        assert Path(json.loads((out / folder / "training_args.json").read_text())["init_encoder_from"]) == out / source
    # recompute the ensemble's test scores from the saved members and the recorded threshold
    ensemble = LabelformerEnsemble.from_pretrained([out / "threshold", out / "threshold_seed43"])
    ensemble.config.classifier_threshold = info["threshold_ensemble_threshold"]
    ensemble.set_label_name_bias(info["threshold_ensemble_label_name_bias"])
    ensemble.set_lexical_logit_weight(info["threshold_ensemble_lexical_logit_weight"])
    assert ensemble.lexical_label_scorer.is_fitted, "the recipe fits every neural head's lexical scorer"
    assert ensemble.config.label_name_token_ids, "the members were trained with label names"
    data = load_multilabel_dataset(validation_fraction=VALIDATION_FRACTION, seed=42, max_train_samples=300)
    labels = [ensemble.config.id2label[i] for i in range(len(ensemble.config.id2label))]
    tokenizer = AutoTokenizer.from_pretrained(out / "threshold")
    predictions = ensemble.predict_labels(list(data["test"]["text"]), tokenizer=tokenizer, max_length=48,
                                          allow_empty=True)  # fmt: skip
    expected = compute_multilabel_metrics(predictions, data["test"]["labels"], labels=labels)
    results = json.loads((out / "results.json").read_text())
    assert results["threshold"]["micro_f1"] == pytest.approx(expected["micro_f1"])
    assert results["threshold"]["subset_accuracy"] == pytest.approx(expected["subset_accuracy"])
    assert 0.0 <= info["threshold_ensemble_validation"]["micro_f1"] <= 1.0


def test_seed_counts_are_checked(tmp_path):
    script = str(ROOT / "examples" / "reproduce_reuters.py")
    old = tmp_path / "old"  # looks like a finished run to the argument checks
    for name in ("threshold/model.safetensors", "threshold/test_metrics.json", "tokenizer/tokenizer.json"):
        (old / name).parent.mkdir(parents=True, exist_ok=True)
        (old / name).write_text("{}")
    cases = ((["--threshold_seeds", "0"], "--threshold_seeds must be >= 1"),
             (["--seq2seq_seeds", "0"], "--seq2seq_seeds must be >= 1"),
             (["--threshold_from", str(old), "--threshold_seeds", "2"], "drop --threshold_seeds"))  # fmt: skip
    for flags, message in cases:
        proc = subprocess.run([sys.executable, script, "--output_dir", str(tmp_path / "x"), *flags],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
