"""The Accelerate training job: outputs, exact resume, multi-process equivalence, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling.evaluation_labelformer import atomic_directory

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_multilabel.py"
TINY = [
    "--d_model", "32", "--ffn_dim", "64", "--attention_heads", "2", "--encoder_layers", "1", "--decoder_layers", "1",
    "--vocab_size", "600", "--max_length", "48", "--batch_size", "8", "--eval_batch_size", "32", "--no_progress",
    "--report_to", "none", "--num_beams", "1", "--show_examples", "2", "--learning_rate", "3e-3",
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, data_files) -> str:
    """One tokenizer for runs that must be compared bit for bit (tokenizer training breaks ties
    differently from process to process; a resumed run reuses its own saved tokenizer)."""
    from modeling import load_multilabel_dataset, train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    texts = load_multilabel_dataset(train_file=data_files["train"], text_column="body", label_column="topics")
    train_tokenizer(texts["train"]["text"], vocab_size=600, model_max_length=48).save_pretrained(folder)
    return str(folder)


def run(
    args: list[str], launcher: list[str] | None = None, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = (launcher or [sys.executable]) + [str(SCRIPT), *args]
    # its own session, so a timeout kills the launcher's workers too, not only the launcher
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
        start_new_session=True,
    ) as popen:  # fmt: skip
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.communicate()
            raise
    proc = subprocess.CompletedProcess(command, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def data_args(files: dict[str, str]) -> list[str]:
    return ["--train_file", files["train"], "--test_file", files["test"], "--text_column", "body", "--label_column",
            "topics", "--validation_fraction", "0.2"]  # fmt: skip


@pytest.mark.parametrize("head", ["generation", "threshold"])
def test_training_writes_model_metrics_card_and_plots(tmp_path, data_files, head):
    out = tmp_path / "run"
    stacking = ["--lexical_stacking", "2"] if head == "threshold" else []  # the generator's stacking: resume test
    proc = run([*TINY, *data_args(data_files), "--head", head, "--epochs", "2", "--output_dir", str(out),
                "--lexical_scorer", *stacking])  # fmt: skip
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert {"micro_f1", "macro_f1", "example_f1", "subset_accuracy", "hamming_loss", "jaccard"} <= set(metrics)
    assert "Test metrics" in proc.stdout and "Example predictions" in proc.stdout
    expected = ["model.safetensors", "config.json", "tokenizer.json", "README.md", "per_label_metrics.md",
                "training_curve.png", "history.json", "multilabel_labelformer.py"]  # fmt: skip
    for name in expected:
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin"))
    card = (out / "README.md").read_text()
    assert "model-index" in card and f"{metrics['micro_f1']:.4f}" in card
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history if "epoch" in h] == [1, 2]
    config = json.loads((out / "config.json").read_text())
    from transformers import AutoTokenizer

    from modeling import label_name_token_ids
    from modeling.lexical_labelformer import LEXICAL_LOGIT_WEIGHTS
    from modeling.multilabel_labelformer import LABEL_NAME_BIASES

    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    assert config["label_name_token_ids"] == label_name_token_ids(labels, AutoTokenizer.from_pretrained(out))
    assert any(config["label_name_token_ids"]) and config["label_name_bias"] in {0.0, *LABEL_NAME_BIASES}
    # the lexical scorer was fitted before training and saved; its weight was fit on validation
    assert config["lexical_scorer"] and config["lexical_logit_weight"] in {0.0, *LEXICAL_LOGIT_WEIGHTS}
    weights = load_file(out / "model.safetensors")
    assert weights["lexical_label_scorer.idf"].count_nonzero() > 50 and weights["lexical_label_scorer.weight"].any()
    assert (out / "lexical_labelformer.py").is_file()  # the remote code travels with the folder
    assert config["lexical_training_weight"] == (2.0 if stacking else 0.0)
    if stacking:
        assert "out-of-fold margins of" in proc.stderr
    if head == "generation":  # the decoding bias was fit on validation and saved with the model
        tuned = metrics["decoding_bias"]
        assert tuned["micro_f1"] >= tuned["unbiased_micro_f1"]
        assert config["eos_logit_bias"] == tuned["eos_logit_bias"]
        assert (config["label_logit_bias"] is None) == (tuned["prior_weight"] == 0)
        assert config["label_name_bias"] == tuned["label_name_bias"]
        assert config["lexical_logit_weight"] == tuned["lexical_logit_weight"]
    else:
        assert "decoding_bias" not in metrics

    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    auto = AutoModelForSeq2SeqLM if head == "generation" else AutoModelForSequenceClassification
    model = auto.from_pretrained(out)
    predictions = model.predict_labels(["Wheat and corn exports rose", "Net profit up 10 pct"])
    assert len(predictions) == 2 and all(isinstance(p, list) and p for p in predictions)


def test_no_label_names_leaves_them_out(tmp_path, data_files, tokenizer_dir):
    out = tmp_path / "run"
    run([*TINY, *data_args(data_files), "--tokenizer_name_or_path", tokenizer_dir, "--head", "threshold",
         "--epochs", "1", "--no-label_names", "--no-lexical_scorer", "--skip_test",
         "--output_dir", str(out)])  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["label_name_token_ids"] is None and config["label_name_bias"] == 0.0
    assert not config["lexical_scorer"] and "lexical_label_scorer.idf" not in load_file(out / "model.safetensors")


def final_checkpoint(out: Path) -> Path:
    return max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


@pytest.mark.parametrize(
    "batching", [["--no-group_by_length"], ["--group_by_length", "--lexical_stacking", "3"]], ids=["plain", "grouped"]
)
def test_resume_reproduces_an_uninterrupted_run(tmp_path, data_files, tokenizer_dir, batching):
    # the second case also stacks out-of-fold lexical margins: a resumed run must get the same ones
    common = [*TINY, *data_args(data_files), "--tokenizer_name_or_path", tokenizer_dir, "--epochs", "2", *batching,
              "--save_every_steps", "5", "--label_order", "random",
              "--scheduled_sampling", "0.3", "--save_total_limit", "10", "--ema_decay", "0.9"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([*common, "--output_dir", str(straight)])
    # 16 batches per epoch: step 20 is mid-epoch 2, after a checkpoint at 15 and one at epoch end (16)
    run([*common, "--output_dir", str(resumed), "--stop_after_steps", "20"])
    assert not (resumed / "test_metrics.json").exists()
    # a half-written checkpoint (a kill during a save) is never picked up
    (resumed / "checkpoints" / ".tmp-checkpoint-25").mkdir()
    proc = run([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert "resumed from" in proc.stderr and "checkpoint-20" in proc.stderr

    def losses(out: Path) -> list[tuple[int, float]]:
        return [(h["step"], h["loss"]) for h in json.loads((out / "history.json").read_text()) if "loss" in h]

    assert losses(resumed) == losses(straight)
    a, b = (
        load_file(final_checkpoint(straight) / "model.safetensors"),
        load_file(final_checkpoint(resumed) / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert json.loads((resumed / "test_metrics.json").read_text()) == json.loads(
        (straight / "test_metrics.json").read_text()
    )


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, data_files, tokenizer_dir):
    common = [
        *TINY,
        *data_args(data_files),
        "--tokenizer_name_or_path",
        tokenizer_dir,
        "--max_steps",
        "6",
        "--epochs",
        "1",
        "--dropout",
        "0",
        "--cpu",
    ]
    single, double = tmp_path / "single", tmp_path / "double"
    run([*common, "--output_dir", str(single), "--batch_size", "8"])
    # torchrun starts 2 CPU processes; Accelerate sees WORLD_SIZE=2 and trains with gloo (MULTI_CPU)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double_args = [*common, "--output_dir", str(double), "--batch_size", "4"]
    try:
        proc = run(double_args, launcher=launcher, timeout=300)
    except subprocess.TimeoutExpired:
        # the gloo teardown deadlock that quiesce_process_group guards against is rare and outside
        # our code; should it strike anyway, one more run tells a hang from a broken feature
        shutil.rmtree(double, ignore_errors=True)
        proc = run(double_args, launcher=launcher, timeout=300)
    assert "2 process(es) (DistributedType.MULTI_CPU)" in proc.stderr

    def losses(out: Path) -> list[float]:
        return [h["loss"] for h in json.loads((out / "history.json").read_text()) if "loss" in h]

    assert len(losses(single)) == 6
    assert losses(double) == pytest.approx(losses(single), rel=1e-4, abs=1e-5)
    a, b = (
        load_file(final_checkpoint(single) / "model.safetensors"),
        load_file(final_checkpoint(double) / "model.safetensors"),
    )
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_bad_input_gives_clear_errors(tmp_path, data_files):
    out = str(tmp_path / "out")
    cases = [
        (["--train_file", str(tmp_path / "nope.jsonl")], "does not exist"),
        (["--train_file", data_files["train"], "--label_column", "topics"], "no column 'text'"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a", "labels": 5}) + "\n")
    cases.append((["--train_file", str(bad)], "labels must be a list of strings or a string"))
    cases.append((["--encoder_lr_scale", "0"], "--encoder_lr_scale must be > 0"))
    cases.append((["--lexical_c", "0"], "--lexical_c must be > 0"))
    cases.append((["--lexical_stacking", "-1"], "--lexical_stacking must be a finite number >= 0"))
    cases.append((["--lexical_stacking", "2", "--no-lexical_scorer"], "--lexical_stacking needs the lexical scorer"))
    cases.append((["--head", "parallel", "--lexical_scorer"], "--lexical_scorer is for the threshold and generation"))
    for extra, message in cases:
        proc = run([*TINY, *extra, "--output_dir", out, "--overwrite_output_dir"], check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    full = tmp_path / "full"
    full.mkdir()
    (full / "something.txt").write_text("keep me")
    proc = run([*TINY, *data_args(data_files), "--output_dir", str(full)], check=False)
    assert proc.returncode == 2 and "is not empty" in proc.stderr and (full / "something.txt").exists()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, data_files):
    out = tmp_path / "nan"
    args = [*TINY, *data_args(data_files), "--output_dir", str(out), "--save_every_steps", "2", "--epochs", "1"]
    proc = run([*args, "--learning_rate", "1e30", "--warmup_ratio", "0", "--max_grad_norm", "0"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "training loss became nan" in proc.stderr or "training loss became inf" in proc.stderr
    assert "resume with --resume_from_checkpoint latest" in proc.stderr


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


def test_init_encoder_from_a_threshold_run(tmp_path, data_files, tokenizer_dir):
    common = [*TINY, *data_args(data_files), "--tokenizer_name_or_path", tokenizer_dir, "--epochs", "1",
              "--label_name_feature"]  # fmt: skip
    run([*common, "--head", "threshold", "--output_dir", str(tmp_path / "threshold")])
    # learning rate 0: the generator's saved encoder (and learned label-name weights) must be the threshold head's
    run([*common, "--output_dir", str(tmp_path / "generation"), "--init_encoder_from", str(tmp_path / "threshold"),
         "--learning_rate", "0", "--num_beams", "1", "--global_label_logits"])  # fmt: skip
    source = load_file(tmp_path / "threshold" / "model.safetensors")
    target = load_file(tmp_path / "generation" / "model.safetensors")
    encoder_keys = [k for k in source if k.startswith("encoder.")]
    assert encoder_keys
    for key in encoder_keys:
        torch.testing.assert_close(target[f"model.{key}"], source[key], rtol=0, atol=0)
    assert source["label_name_evidence.shared"] != 1.0, "one epoch of training left the shared name weight alone"
    for key in ("label_name_evidence.shared", "label_name_evidence.weight"):
        torch.testing.assert_close(target[key], source[key], rtol=0, atol=0)
    for key in ("weight", "bias"):  # the threshold classifier starts the document-level label logits
        torch.testing.assert_close(target[f"auxiliary_classifier.{key}"], source[f"classifier.{key}"], rtol=0, atol=0)
    proc = run([*common, "--output_dir", str(tmp_path / "bad"), "--init_encoder_from", str(tmp_path / "threshold"),
                "--d_model", "48", "--attention_heads", "4"], check=False)  # fmt: skip
    assert proc.returncode == 2 and "does not fit this model" in proc.stderr
    proc = run([*common, "--output_dir", str(tmp_path / "bad2"), "--no-label_names"], check=False)
    assert proc.returncode == 2 and "--label_name_feature needs --label_names" in proc.stderr
    proc = run([*common, "--output_dir", str(tmp_path / "bad3"), "--head", "threshold", "--global_label_logits"],
               check=False)  # fmt: skip
    assert proc.returncode == 2 and "--global_label_logits is for --head generation" in proc.stderr


@pytest.mark.parametrize("head", ["generation", "threshold"])
def test_encoder_lr_scale_gives_the_encoder_its_own_learning_rate(head):
    import argparse
    import importlib.util

    from modeling import LabelformerForMultiLabelClassification, LabelformerForMultiLabelGeneration

    from .synthetic import synthetic_config

    spec = importlib.util.spec_from_file_location("train_multilabel_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model_class = LabelformerForMultiLabelGeneration if head == "generation" else LabelformerForMultiLabelClassification
    model = model_class(synthetic_config())
    args = argparse.Namespace(learning_rate=1e-3, weight_decay=0.01, encoder_lr_scale=0.1)
    optimizer = script.make_optimizer(model, args, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    encoder = {id(p) for p in model.get_encoder().parameters()}
    seen = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            seen.append(id(param))
            assert group["lr"] == pytest.approx(1e-4 if id(param) in encoder else 1e-3), names[id(param)]
            no_decay = param.ndim < 2 or "embed" in names[id(param)]
            assert group["weight_decay"] == (0.0 if no_decay else 0.01), names[id(param)]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert any(id(p) not in encoder for p in model.parameters())  # the head/decoder keeps the full rate
    one_rate = argparse.Namespace(**{**vars(args), "encoder_lr_scale": 1.0})
    default = script.make_optimizer(model, one_rate, torch.device("cpu"))
    assert [g["weight_decay"] for g in default.param_groups] == [0.01, 0.0]  # the layout of older checkpoints


@pytest.mark.parametrize("head", ["generation", "threshold"])
def test_skip_test_leaves_the_test_split_alone_and_still_saves_everything(tmp_path, data_files, tokenizer_dir, head):
    """--skip_test (tuning runs): no test metrics, but the model, history and (generator) fitted bias."""
    out = tmp_path / head
    proc = run([*TINY, *data_args(data_files), "--tokenizer_name_or_path", tokenizer_dir, "--epochs", "1",
                "--head", head, "--output_dir", str(out), "--skip_test"])  # fmt: skip
    assert "Test metrics" not in proc.stdout
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text()) if "epoch" in h] == [1]
    assert (out / "model.safetensors").is_file() and not (out / "per_label_metrics.md").exists()
    if head == "generation":  # only the decoding bias fit on validation
        assert set(json.loads((out / "test_metrics.json").read_text())) == {"decoding_bias"}
    else:
        assert not (out / "test_metrics.json").exists()


def test_the_lexical_scorer_is_on_by_default_where_the_head_has_one():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_multilabel_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    defaults = {head: script.parse_args(["--head", head, "--output_dir", "x"]) for head in ("generation", "threshold",
                                                                                              "parallel")}  # fmt: skip
    assert {head: args.lexical_scorer for head, args in defaults.items()} == {
        "generation": True, "threshold": True, "parallel": False,
    }  # fmt: skip
    assert defaults["generation"].lexical_c == 3.0
    assert not script.parse_args(["--output_dir", "x", "--no-lexical_scorer"]).lexical_scorer
