"""The Accelerate training job: outputs per head, the shipped folder as remote code, exact resume,
multi-process equivalence, bad input.

Runs use ``--preset tiny`` (seconds of training) on the 160/40-document slice of Reuters in
``data_files``. Runs that must match bit for bit go through a small launcher that hands the
script one fixed tokenizer instead of training one, so they compare training alone.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from modeling import compute_multilabel_metrics
from modeling.evaluation_labelformer import atomic_directory
from modeling.loading_labelformer import verify_checksums
from modeling.prediction_labelformer import tokenizer_fingerprint

from .isolation import run_in_own_session, run_isolated

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_multilabel.py"
TINY = ["--preset", "tiny", "--no_progress"]
METRICS = {"micro_f1", "macro_f1", "example_f1", "subset_accuracy", "hamming_loss", "jaccard"}
STEPS_PER_EPOCH = 9  # 144 training documents (160 less 10% for validation) in batches of 16
LAUNCHER = """
import importlib.util, sys
from transformers import AutoTokenizer
spec = importlib.util.spec_from_file_location("train_multilabel", {script!r})
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


def fixed_tokenizer(texts, vocab_size, model_max_length):
    tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})
    tokenizer.model_max_length = model_max_length
    return tokenizer


script.train_tokenizer = fixed_tokenizer
sys.exit(script.main(sys.argv[1:]))
"""


def load_script():
    spec = importlib.util.spec_from_file_location("train_multilabel_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def run(
    args: list[str],
    launcher: list[str] | None = None,
    check: bool = True,
    timeout: float = 600,
    script: Path = SCRIPT,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    quiet = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env = {**os.environ, **quiet, **(env or {})}
    command = (launcher or [sys.executable]) + [str(script), *args]
    proc = run_in_own_session(command, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def data_args(files: dict[str, str]) -> list[str]:
    return ["--train_file", files["train"], "--test_file", files["test"], "--text_column", "body",
            "--label_column", "topics"]  # fmt: skip


@pytest.fixture(scope="module")
def fixed_tokenizer_script(tmp_path_factory, data_files) -> Path:
    """A launcher for the script whose runs all use one tokenizer (see the module docstring)."""
    from modeling import load_multilabel_dataset, train_tokenizer

    folder = tmp_path_factory.mktemp("fixed_tokenizer")
    texts = load_multilabel_dataset(train_file=data_files["train"], text_column="body", label_column="topics")
    train_tokenizer(texts["train"]["text"], vocab_size=500, model_max_length=32).save_pretrained(folder / "tokenizer")
    launcher = folder / "train_with_fixed_tokenizer.py"
    launcher.write_text(LAUNCHER.format(script=str(SCRIPT), tokenizer=str(folder / "tokenizer")))
    return launcher


def code_warning(card_text: str) -> set[str]:
    """The file names the card's remote-code warning lists."""
    match = re.search(r"\*\*custom code\*\*\s*\(([^)]*)\)", card_text)
    assert match, "the card has no remote-code warning"
    return set(re.findall(r"`([^`]+\.py)`", match.group(1)))


def losses(history: list[dict]) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


# ---------------------------------------------------------------------------------------------
# End to end, one run per head
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["generation", "threshold", "parallel", "ensemble"])
def trained(request, tmp_path_factory, data_files):
    """One real run per head (the script trains its own tokenizer): ``(head, output folder, process)``. The
    ``ensemble`` run is a generation run whose shipped model also holds an earlier run's Transformer."""
    out = tmp_path_factory.mktemp(request.param) / "run"
    flags = ["--head", request.param]
    if request.param == "ensemble":
        member = out.parent / "member"
        run([*TINY, *data_args(data_files), "--seed", "7", "--split_seed", "42", "--no-lexical_scorer",
             "--output_dir", str(member)])  # fmt: skip
        flags = ["--ensemble_with", str(member / "best_model")]
    proc = run([*TINY, *data_args(data_files), *flags, "--output_dir", str(out)])
    return request.param, out, proc


def test_training_writes_model_metrics_and_card(trained):
    head, out, proc = trained
    assert "Test metrics" in proc.stdout and "Example predictions" in proc.stdout and "Finished in" in proc.stdout
    last_checkpoint = f"checkpoints/checkpoint-{2 * STEPS_PER_EPOCH}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "history.json", "training_curve.png", "per_label_metrics.md", "test_metrics.json",
                 "training_args.json", "best_model/model.safetensors", "best_model/tokenizer.json",
                 "tokenizer/tokenizer.json", f"{last_checkpoint}/trainer_state.json"):  # fmt: skip
        assert (out / name).is_file(), name
    # model weights are safetensors only (Accelerate's checkpoints keep the optimizer state as it writes it)
    assert not [p for folder in (out, out / "best_model") for p in folder.iterdir() if p.suffix in (".bin", ".pt")]
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))

    # metrics: the Transformer alone and the shipped model (with its calibrated parts)
    results = json.loads((out / "test_metrics.json").read_text())
    assert set(results["transformer"]) == set(results["shipped"]) == METRICS
    shipped = results["shipped"]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history if "epoch" in h] == [1, 2]
    assert [step for step, _ in losses(history)] == list(range(1, 2 * STEPS_PER_EPOCH + 1))

    config = json.loads((out / "config.json").read_text())
    # the tokenizer's fingerprint (predict_labels refuses another one) and the weights' checksums
    assert config["tokenizer_fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(out))
    assert verify_checksums(out) and verify_checksums(out / "best_model")
    weights = load_file(out / "model.safetensors")
    calibration = results["calibration"]
    if head == "parallel":  # no hybrid part, nothing to calibrate: the Transformer is shipped as it is
        assert calibration == {} and results["shipped"] == results["transformer"]
        assert not config["lexical_scorer"] and not any(k.startswith("lexical_scorer.") for k in weights)
    else:  # the lexical part was fit after training and its scale chosen on validation
        assert config["lexical_scorer"]
        assert weights["lexical_scorer.idf"].count_nonzero() > 50 and weights["lexical_scorer.weight"].any()
        assert float(weights["lexical_scorer.scale"]) == calibration["lexical_scale"]
        assert "lexical_scorer.idf" not in load_file(out / "best_model" / "model.safetensors")
    if head == "ensemble":  # two Transformers on one tokenizer; the ensemble's gain is measured beside them
        assert config["architectures"] == ["LabelformerEnsembleForMultiLabelGeneration"]
        assert config["ensemble_size"] == 2
        member = out.parent / "member" / "best_model"
        assert (out / "tokenizer.json").read_text() == (member / "tokenizer.json").read_text()
        assert set(results["ensemble"]) == set(results["transformer_lexical"]) == METRICS
        single = calibration.pop("transformer_lexical")
        assert set(single) == {"lexical_scale", "validation_micro_f1", "transformer_validation_micro_f1"}
        assert set(calibration) == {"lexical_scale", "validation_micro_f1", "ensemble_validation_micro_f1"}
        assert json.loads((out / "training_args.json").read_text())["ensemble_with"] == [str(member)]
        assert "this run's Transformer and 1 more (seeds 7)" in (out / "README.md").read_text()
    if head == "generation":
        assert set(calibration) == {"lexical_scale", "validation_micro_f1", "transformer_validation_micro_f1"}
        assert calibration["validation_micro_f1"] >= calibration["transformer_validation_micro_f1"]
    if head in ("generation", "ensemble"):
        assert results["shipped_beam"]["num_beams"] == 3 and set(results["shipped_beam"]) == METRICS | {"num_beams"}
    else:
        assert "shipped_beam" not in results
    if head == "threshold":  # the validation threshold is folded into the classifier's bias
        assert set(calibration) == {"threshold", "lexical_scale", "validation_micro_f1"}
        threshold = calibration["threshold"]
        best = load_file(out / "best_model" / "model.safetensors")
        torch.testing.assert_close(
            weights["classifier.bias"], best["classifier.bias"] - math.log(threshold / (1 - threshold))
        )

    # the card: metadata with the shipped metrics, the head, and every code file of the folder
    card = (out / "README.md").read_text()
    assert "model-index" in card and f"{shipped['micro_f1']:.4f}" in card
    assert config["architectures"][0] in card
    named = code_warning(card)
    assert named == {p.name for p in out.glob("*.py")}
    assert {"configuration_labelformer.py", "modeling_labelformer.py", "prediction_labelformer.py"} <= named


def test_the_shipped_folder_reloads_as_remote_code_and_scores_its_metrics(trained, data_files, tmp_path):
    """A fresh process with only `transformers` and the folder predicts what test_metrics.json reports."""
    head, out, _ = trained
    auto = "AutoModelForSequenceClassification" if head == "threshold" else "AutoModelForSeq2SeqLM"
    result = run_isolated(
        f"""
        import json
        import torch
        from transformers import {auto}
        torch.set_num_threads(1)  # as the training run (OMP_NUM_THREADS=1): the same float rounding
        model = {auto}.from_pretrained({str(out)!r}, trust_remote_code=True)
        texts = [json.loads(line)["body"] for line in open({data_files["test"]!r})]
        predicted = model.predict_labels(texts, batch_size=64, allow_empty=True)
        print(json.dumps({{"class": type(model).__name__, "module": type(model).__module__, "predicted": predicted}}))
        """,
        cwd=tmp_path,
    )
    config = json.loads((out / "config.json").read_text())
    assert result["class"] == config["architectures"][0]
    assert not result["module"].startswith("modeling.")  # the folder's own code, not our package
    references = [json.loads(line)["topics"] for line in Path(data_files["test"]).read_text().splitlines()]
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    metrics = compute_multilabel_metrics(result["predicted"], references, labels=labels)
    shipped = json.loads((out / "test_metrics.json").read_text())["shipped"]
    assert metrics["micro_f1"] == shipped["micro_f1"]
    assert metrics == pytest.approx(shipped, rel=0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Exact resume and multi-process training
# ---------------------------------------------------------------------------------------------


def final_checkpoint(out: Path) -> Path:
    return max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def test_resume_reproduces_an_uninterrupted_run(tmp_path, data_files, fixed_tokenizer_script):
    # random label orders and dropout (0.1) draw random numbers; the weight average
    # (from epoch 1) must come back from the checkpoint, or epoch 2's mean and validation score would differ
    common = [*TINY, *data_args(data_files), "--save_every_steps", "3", "--label_order", "random",
              "--num_beams", "1", "--average_from_epoch", "1"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([*common, "--output_dir", str(straight)], script=fixed_tokenizer_script)
    # step 14 is mid-epoch 2; the newest checkpoint then is step 12, so steps 13-14 are run again
    run([*common, "--output_dir", str(resumed), "--stop_after_steps", "14"], script=fixed_tokenizer_script)
    assert not (resumed / "test_metrics.json").exists()
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-9"]
    # a half-written checkpoint (a kill during a save) is never picked up
    (resumed / "checkpoints" / ".tmp-checkpoint-15").mkdir()
    proc = run([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"],
               script=fixed_tokenizer_script)  # fmt: skip
    assert "resumed from" in proc.stderr and "checkpoint-12 (epoch 1, step 12)" in proc.stderr
    assert not (resumed / "checkpoints" / ".tmp-checkpoint-15").exists()  # removed at the start

    history = {out: json.loads((out / "history.json").read_text()) for out in (straight, resumed)}
    assert len(losses(history[straight])) == 2 * STEPS_PER_EPOCH
    assert history[resumed] == history[straight]  # every loss and validation score, exactly
    for name in ("model.safetensors", "averaged_model.safetensors"):
        a, b = load_file(final_checkpoint(straight) / name), load_file(final_checkpoint(resumed) / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)  # the shipped model
    assert json.loads((resumed / "test_metrics.json").read_text()) == json.loads(
        (straight / "test_metrics.json").read_text()
    )


def test_weight_average_is_the_mean_of_the_epochs_and_validation_keeps_it(tmp_path, data_files):
    out = tmp_path / "run"
    run([*TINY, *data_args(data_files), "--epochs", "3", "--average_from_epoch", "2", "--early_stopping_patience",
         "3", "--num_beams", "1", "--no-lexical_scorer", "--output_dir", str(out)])  # fmt: skip
    # per-epoch checkpoints (the newest two): the live weights after epochs 2 and 3, and the mean so far
    two, three = (out / "checkpoints" / f"checkpoint-{k * STEPS_PER_EPOCH}" for k in (2, 3))
    live = {k: load_file(folder / "model.safetensors") for k, folder in ((2, two), (3, three))}
    mean = {k: load_file(folder / "averaged_model.safetensors") for k, folder in ((2, two), (3, three))}
    # the average's keys are the model's, prefixed with `module.` (each file keeps one name of tied weights)
    keys = live[2].keys() & {key.removeprefix("module.") for key in mean[2]}
    assert len(keys) >= len(live[2]) - 1
    for key in keys:
        value = live[2][key]
        torch.testing.assert_close(mean[2][f"module.{key}"], value, rtol=0, atol=0)
        torch.testing.assert_close(mean[3][f"module.{key}"], (value + live[3][key]) / 2, rtol=1e-6, atol=1e-7)
    assert mean[3]["n_averaged"].item() == 2
    history = [h for h in json.loads((out / "history.json").read_text()) if "epoch" in h]
    assert [h["averaged_from"] for h in history] == [None, 2, 2]
    best = max(history, key=lambda h: h["validation_micro_f1"])  # the first of equals, as the script keeps
    shipped = load_file(out / "model.safetensors")
    if best["epoch"] == 1:  # the live weights of epoch 1 are no longer on disk; the mean is not what shipped
        assert any(not torch.equal(shipped[k], mean[3][f"module.{k}"]) for k in keys)
    else:
        expected = mean[best["epoch"]]
        assert all(torch.equal(shipped[k], expected[f"module.{k}"]) for k in keys)
    card = (out / "README.md").read_text()
    assert (f"mean of epochs 2 to {best['epoch']}" in card) == (best["epoch"] > 1)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, data_files, fixed_tokenizer_script):
    # fp32: bf16 autocast (the default where the CPU has bf16 kernels) rounds 1 and 2 processes differently
    common = [*TINY, *data_args(data_files), "--epochs", "1", "--dropout", "0", "--no-lexical_scorer",
              "--num_beams", "1", "--mixed_precision", "no"]  # fmt: skip
    single, double = tmp_path / "single", tmp_path / "double"
    run([*common, "--output_dir", str(single), "--batch_size", "16"], script=fixed_tokenizer_script)
    # torchrun starts 2 CPU processes; with ACCELERATE_USE_CPU (what `accelerate launch --cpu` sets)
    # Accelerate sees WORLD_SIZE=2 and trains with gloo (MULTI_CPU)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double_args = [*common, "--output_dir", str(double), "--batch_size", "8"]
    kwargs = dict(launcher=launcher, timeout=300, script=fixed_tokenizer_script, env={"ACCELERATE_USE_CPU": "true"})
    try:
        proc = run(double_args, **kwargs)
    except subprocess.TimeoutExpired:
        # the gloo teardown deadlock that quiesce_process_group guards against is rare and outside
        # our code; should it strike anyway, one more run tells a hang from a broken feature
        shutil.rmtree(double, ignore_errors=True)
        proc = run(double_args, **kwargs)
    assert "2 process(es) (DistributedType.MULTI_CPU)" in proc.stderr

    history = {out: json.loads((out / "history.json").read_text()) for out in (single, double)}
    assert [step for step, _ in losses(history[single])] == list(range(1, STEPS_PER_EPOCH + 1))
    assert [step for step, _ in losses(history[double])] == list(range(1, STEPS_PER_EPOCH + 1))
    assert [loss for _, loss in losses(history[double])] == pytest.approx(
        [loss for _, loss in losses(history[single])], rel=1e-4, abs=1e-5
    )
    a, b = (load_file(final_checkpoint(out) / "model.safetensors") for out in (single, double))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    # the test split, sharded over the two processes and gathered in order, is scored in full
    assert set(json.loads((double / "test_metrics.json").read_text())["shipped"]) == METRICS


# ---------------------------------------------------------------------------------------------
# Flags and failures (in this process: no subprocess start-up)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def script():
    """The script as a module; Accelerate's process-wide state is reset after each use."""
    yield load_script()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_presets_fill_in_what_the_flags_leave_open(script):
    args = script.parse_args(["--preset", "tiny", "--output_dir", "x", "--d_model", "48", "--epochs", "3"])
    assert (args.d_model, args.epochs) == (48, 3)  # flags win
    assert (args.vocab_size, args.encoder_layers, args.max_train_samples, args.batch_size) == (500, 1, 300, 16)
    assert args.dropout == 0.1  # from the defaults, which the tiny preset does not set
    plain = script.parse_args(["--output_dir", "x"])
    assert (plain.vocab_size, plain.d_model, plain.max_train_samples) == (16000, 256, None)
    assert plain.head == "generation" and plain.lexical_scorer and plain.num_beams == 3
    assert not script.parse_args(["--output_dir", "x", "--no-lexical_scorer"]).lexical_scorer
    assert plain.average_from_epoch == 0  # weight averaging is off unless a preset or the flag asks for it
    reproduce = script.parse_args(["--preset", "reproduce", "--output_dir", "x"])
    assert 1 <= reproduce.average_from_epoch <= reproduce.epochs
    quick = script.parse_args(["--preset", "quick", "--output_dir", "x"])
    assert quick.num_beams == reproduce.num_beams == 1  # the main job skips the extra beam pass over test
    assert script.parse_args(["--preset", "quick", "--num_beams", "3", "--output_dir", "x"]).num_beams == 3
    base = script.parse_args(["--preset", "base", "--output_dir", "x"])  # the reproduce recipe, wider and deeper
    assert (base.d_model, base.encoder_layers, base.decoder_layers, base.attention_heads) == (512, 6, 2, 8)
    assert (base.average_from_epoch, base.epochs, base.max_length, base.vocab_size) == (6, 16, 256, 16000)
    assert (base.ffn_dim, base.learning_rate, base.dropout) == (2048, 5e-4, 0.0)
    assert base.d_model % base.attention_heads == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--num_beams", "0"], "--num_beams must be >= 1"),
        (["--max_labels", "0"], "--max_labels must be >= 1"),
        (["--stop_after_steps", "0"], "--stop_after_steps must be >= 1"),
        (["--save_every_steps", "-1"], "--save_every_steps must be"),
        (["--d_model", "0"], "--d_model must be >= 1"),
        (["--encoder_layers", "0"], "--encoder_layers must be >= 1"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0"),
        (["--average_from_epoch", "13", "--epochs", "12"], "--average_from_epoch must be 0 (off) or an epoch up to"),
        (["--average_from_epoch", "-1"], "--average_from_epoch must be 0 (off)"),
        (["--learning_rate=-1e-3"], "--learning_rate must be a finite number > 0"),
        (["--head", "ensemble"], "--head: invalid choice"),
        (["--preset", "huge"], "--preset: invalid choice"),
        (["--label_order", "length"], "--label_order: invalid choice"),
        (["--encoder_lr_scale", "0.1"], "unrecognized arguments: --encoder_lr_scale"),  # removed flags
        (["--lexical_stacking", "2"], "unrecognized arguments: --lexical_stacking"),
        (["--ensemble_with", "nowhere"], "nowhere holds no saved model with its tokenizer"),
        (["--head", "threshold", "--ensemble_with", "x"], "--ensemble_with builds an ensemble of generation heads"),
    ],
)
def test_bad_flags_are_argparse_errors_naming_the_flag(script, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--output_dir", "x", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args([])
    assert "the following arguments are required: --output_dir" in capsys.readouterr().err


def test_bad_input_gives_clear_errors(script, capsys, tmp_path, data_files):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a", "labels": 5}) + "\n")
    (tmp_path / "data.txt").write_text("text\tlabels\n")
    not_a_checkpoint = tmp_path / "not_a_checkpoint"
    not_a_checkpoint.mkdir()
    data = data_args(data_files)
    cases = [
        (["--train_file", str(tmp_path / "nope.jsonl")], "does not exist"),
        (["--train_file", str(tmp_path / "data.txt")], "the extension must be one of"),
        (["--train_file", data_files["train"], "--label_column", "topics"], "has no column 'text'"),
        (["--train_file", str(bad)], "labels must be a list of strings or a string"),
        ([*data, "--attention_heads", "3"], "must be divisible by `encoder_attention_heads` (3)"),
        ([*data, "--vocab_size", "8"], "`vocab_size` must be at least 16"),
        ([*data, "--resume_from_checkpoint", "latest"], "no checkpoint in"),
        ([*data, "--resume_from_checkpoint", str(not_a_checkpoint)], "is not a checkpoint folder"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert script.main([*TINY, *extra, "--output_dir", str(out), "--overwrite_output_dir"]) == 2, extra
        err = capsys.readouterr().err
        assert "error: " in err and message in err, (extra, err[-2000:])
    full = tmp_path / "full"
    full.mkdir()
    (full / "something.txt").write_text("keep me")
    assert script.main([*TINY, *data, "--output_dir", str(full)]) == 2
    assert "is not empty" in capsys.readouterr().err and (full / "something.txt").read_text() == "keep me"


def test_an_ensemble_member_that_does_not_fit_is_refused_before_training(script, capsys, tmp_path, data_files):
    from modeling import LabelformerForMultiLabelGeneration, train_tokenizer
    from tests.synthetic import synthetic_config

    member = tmp_path / "member"
    LabelformerForMultiLabelGeneration(synthetic_config()).save_pretrained(member)  # other labels and shape
    train_tokenizer(["some text"] * 20, vocab_size=100, model_max_length=32).save_pretrained(member)
    out = tmp_path / "out"
    assert script.main([*TINY, *data_args(data_files), "--ensemble_with", str(member), "--output_dir", str(out)]) == 2
    assert "differs from member 0" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()  # no training ran
    threshold_folder = tmp_path / "threshold"
    config = json.loads((member / "config.json").read_text())
    threshold_folder.mkdir()
    (threshold_folder / "config.json").write_text(json.dumps({**config, "architectures": ["LabelformerModel"]}))
    shutil.copy(member / "tokenizer.json", threshold_folder / "tokenizer.json")
    assert script.main([*TINY, *data_args(data_files), "--ensemble_with", str(threshold_folder),
                        "--output_dir", str(tmp_path / "out2")]) == 2  # fmt: skip
    assert "not one generation-head Transformer" in capsys.readouterr().err
    # a member whose run split the data with another seed trained on this run's validation documents
    run_dir = tmp_path / "run"
    shutil.copytree(member, run_dir / "best_model")
    (run_dir / "training_args.json").write_text(json.dumps({"seed": 7, "split_seed": 7, "train_file": None}))
    assert script.main([*TINY, *data_args(data_files), "--ensemble_with", str(run_dir / "best_model"),
                        "--output_dir", str(tmp_path / "o3")]) == 2  # fmt: skip
    assert "was trained on other data: --split_seed 7 (this run: 42)" in capsys.readouterr().err


def test_atomic_directory_keeps_the_old_copy_when_a_write_fails(tmp_path):
    target = tmp_path / "checkpoint"
    atomic_directory(target, lambda d: (d / "weights").write_text("good"))

    def crash(d: Path) -> None:
        (d / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_directory(target, crash)
    assert (target / "weights").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    shutil.rmtree(target)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2"])
def test_example_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "examples" / "accelerate_configs" / f"{name}.yaml"))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}[name]
    assert str(config.distributed_type).endswith(expected)
    if name == "fsdp":
        layers = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
        import modeling.modeling_labelformer as modeling_module

        assert all(hasattr(modeling_module, layer) for layer in layers)
