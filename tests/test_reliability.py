"""Nothing lost, nothing silent: what a kill, a NaN, a full disk, a corrupt file and bad input do.

Each test here is a row of the README's "Guarantees" table. Training runs go through the script's
``main()`` in this process with ``--preset tiny`` for one epoch (seconds each) on the 160-document
Reuters slice of ``data_files``.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling.evaluation_labelformer import recover_directories, replace_directory

from .test_train_multilabel import TINY, data_args, load_script

FAST = [*TINY, "--epochs", "1", "--no-lexical_scorer", "--num_beams", "1"]


@pytest.fixture
def script():
    """The training script as a module; Accelerate's process-wide state is reset after each use."""
    yield load_script()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def all_finite(checkpoint: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


# ---------------------------------------------------------------------------------------------
# --overwrite_output_dir
# ---------------------------------------------------------------------------------------------


def test_overwrite_removes_only_what_a_run_writes(script, tmp_path, data_files, capsys):
    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)  # an earlier run's outputs
    (out / "history.json").write_text("[]")
    (out / "notes.txt").write_text("keep me")  # the user's own files
    train = out / "train.jsonl"
    shutil.copy(data_files["train"], train)
    argv = [*FAST, *data_args({**data_files, "train": str(train)}), "--output_dir", str(out), "--overwrite_output_dir"]
    assert script.main(argv) == 0, capsys.readouterr().err[-3000:]
    assert (out / "notes.txt").read_text() == "keep me" and train.read_bytes() == Path(data_files["train"]).read_bytes()
    assert not (out / "checkpoints" / "checkpoint-3").exists() and (out / "model.safetensors").is_file()


def test_overwrite_never_deletes_an_input_file(script, tmp_path, data_files, capsys):
    out = tmp_path / "out"
    out.mkdir()
    train = out / "history.json"  # a name the run writes, holding this run's training data (JSON lines)
    shutil.copy(data_files["train"], train)
    argv = [*FAST, *data_args({**data_files, "train": str(train)}), "--output_dir", str(out), "--overwrite_output_dir"]
    assert script.main(argv) == 2
    assert "would delete" in capsys.readouterr().err and train.read_bytes() == Path(data_files["train"]).read_bytes()


# ---------------------------------------------------------------------------------------------
# NaN and infinity
# ---------------------------------------------------------------------------------------------


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose backward pass blows up."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


@pytest.mark.parametrize("fault", ["nan_loss", "nan_gradient", "inf_weights", "huge_learning_rate"])
def test_non_finite_training_stops_and_every_saved_checkpoint_is_finite(
    script, monkeypatch, tmp_path, data_files, capsys, fault
):
    out = tmp_path / "out"
    argv = [*FAST, *data_args(data_files), "--output_dir", str(out), "--save_every_steps", "1"]
    calls = {"loss": 0, "step": 0}
    real_loss, real_step = script.global_mean_loss, torch.optim.AdamW.step

    def loss_at_step_3(accelerator, model, batch):
        calls["loss"] += 1
        loss = real_loss(accelerator, model, batch)
        if calls["loss"] == 3:
            loss = loss * float("nan") if fault == "nan_loss" else _NanGradient.apply(loss)
        return loss

    def step_then_break_a_weight(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["step"] += 1
        if calls["step"] == 3:
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return result

    if fault in ("nan_loss", "nan_gradient"):
        monkeypatch.setattr(script, "global_mean_loss", loss_at_step_3)
    elif fault == "inf_weights":
        monkeypatch.setattr(torch.optim.AdamW, "step", step_then_break_a_weight)
    else:
        argv += ["--learning_rate", "1e30"]
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert "is not finite" in err or "became NaN or infinite" in err, err[-2000:]
    assert "--resume_from_checkpoint latest" in err
    saved = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert all(all_finite(checkpoint) for checkpoint in saved)
    if fault == "huge_learning_rate":  # no warmup in one epoch: the first step already overflows
        assert not saved and "No checkpoint was written yet" in err
    else:  # the checkpoint the message names is the newest, and it is finite
        assert saved[-1].name == "checkpoint-2" and str(saved[-1]) in err
    assert not (out / "test_metrics.json").exists()


# ---------------------------------------------------------------------------------------------
# Resume: a new learning rate, changed flags, corrupt or incomplete checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def stopped_run(script, tmp_path, data_files, capsys) -> tuple[Path, list[str]]:
    """A run stopped after 5 of its 9 steps, with checkpoint-5; returns its folder and flags."""
    out = tmp_path / "out"
    argv = [*FAST, *data_args(data_files), "--output_dir", str(out), "--save_every_steps", "5"]
    assert script.main([*argv, "--stop_after_steps", "5"]) == 0, capsys.readouterr().err[-3000:]
    assert (out / "checkpoints" / "checkpoint-5" / "checksums.sha256").is_file()
    return out, argv


def test_resume_applies_a_new_learning_rate_and_records_it(script, stopped_run, caplog):
    out, argv = stopped_run
    assert script.main([*argv, "--resume_from_checkpoint", "latest", "--learning_rate", "1e-4"]) == 0
    assert "--learning_rate 0.0001 replaces 0.002 from step 5" in caplog.text
    scheduler = torch.load(out / "checkpoints" / "checkpoint-9" / "scheduler.bin", weights_only=False)
    assert scheduler["base_lrs"] == [1e-4, 1e-4]
    recorded = json.loads((out / "training_args.json").read_text())
    assert recorded["learning_rate"] == 1e-4
    assert recorded["learning_rates"] == [{"step": 0, "learning_rate": 2e-3}, {"step": 5, "learning_rate": 1e-4}]


def test_resume_refuses_changed_flags(script, stopped_run, capsys):
    out, argv = stopped_run
    assert script.main([*argv, "--resume_from_checkpoint", "latest", "--batch_size", "8"]) == 2
    assert "--batch_size 16 -> 8" in capsys.readouterr().err


def test_resume_of_a_run_from_before_split_seed_keeps_its_split(script, stopped_run, capsys):
    """A checkpoint written before --split_seed split by --seed: resuming with another split is refused."""
    out, argv = stopped_run
    checkpoint = out / "checkpoints" / "checkpoint-5"
    saved = json.loads((checkpoint / "training_args.json").read_text())
    saved.pop("split_seed")
    (checkpoint / "training_args.json").write_text(json.dumps(saved))
    (checkpoint / "checksums.sha256").unlink()  # as an older version wrote it
    assert script.main([*argv, "--resume_from_checkpoint", "latest", "--split_seed", "7"]) == 2
    assert f"--split_seed {saved['seed']} -> 7" in capsys.readouterr().err


def test_resume_refuses_a_run_that_used_a_removed_flag(script, stopped_run, capsys):
    """A checkpoint of a run with --scheduled_sampling (removed) cannot silently go on without it."""
    out, argv = stopped_run
    checkpoint = out / "checkpoints" / "checkpoint-5"
    saved = json.loads((checkpoint / "training_args.json").read_text())
    (checkpoint / "training_args.json").write_text(json.dumps({**saved, "scheduled_sampling": 0.3}))
    (checkpoint / "checksums.sha256").unlink()  # as an older version wrote it
    assert script.main([*argv, "--resume_from_checkpoint", "latest"]) == 2
    assert "trained with --scheduled_sampling 0.3, which this version removed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip_weights", "model.safetensors is corrupt"),
        ("truncate_random_states", "random_states_0.pkl is corrupt"),
        ("delete_random_states", "random_states_0.pkl is missing"),
        ("delete_manifest_and_random_states", "random_states_0.pkl is missing"),
    ],
)
def test_resume_refuses_a_corrupt_or_incomplete_checkpoint(script, stopped_run, capsys, damage, message):
    out, argv = stopped_run
    checkpoint = out / "checkpoints" / "checkpoint-5"
    if damage == "flip_weights":
        data = bytearray((checkpoint / "model.safetensors").read_bytes())
        for i in range(len(data) - 2000, len(data), 7):  # bits in the tensor data, not the header
            data[i] ^= 0x10
        (checkpoint / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncate_random_states":
        path = checkpoint / "random_states_0.pkl"
        path.write_bytes(path.read_bytes()[:100])
    else:
        if damage == "delete_manifest_and_random_states":
            (checkpoint / "checksums.sha256").unlink()
        (checkpoint / "random_states_0.pkl").unlink()
    assert script.main([*argv, "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err[-2000:]


# ---------------------------------------------------------------------------------------------
# Kills during a save, stale temporaries, full disks
# ---------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: raised from inside a rename, it leaves the folders as a kill would."""


@pytest.mark.parametrize("kill_at", ["first_rename", "second_rename", "old_copy_removal"])
def test_a_kill_at_any_instant_of_a_folder_swap_leaves_a_complete_copy(monkeypatch, tmp_path, kill_at):
    target, new = tmp_path / "checkpoint-9", tmp_path / ".tmp-checkpoint-9"
    for folder, content in ((target, "old"), (new, "new")):
        folder.mkdir()
        (folder / "model.safetensors").write_text(content)
    renames, real_replace = [], __import__("os").replace

    def replace(src, dst):
        renames.append(dst)
        if (kill_at, len(renames)) in (("first_rename", 1), ("second_rename", 2)):
            raise Killed
        return real_replace(src, dst)

    real_rmtree = shutil.rmtree

    def rmtree(path, ignore_errors=False):
        if Path(path).name.startswith(".old-") and Path(path).exists():
            raise Killed
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr("os.replace", replace)
    if kill_at == "old_copy_removal":
        monkeypatch.setattr("shutil.rmtree", rmtree)
    with pytest.raises(Killed):
        replace_directory(new, target)
    monkeypatch.undo()
    recover_directories(tmp_path)  # what the next start does
    assert (target / "model.safetensors").read_text() in ("old", "new")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-9"]


def test_an_interrupted_resave_of_the_same_step_keeps_the_checkpoint(script, stopped_run, monkeypatch):
    """The epoch-end save of a step that was already saved (``--save_every_steps`` = steps per epoch)."""
    out, argv = stopped_run
    checkpoint = out / "checkpoints" / "checkpoint-5"
    before = (checkpoint / "model.safetensors").read_bytes()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    real_replace = __import__("os").replace

    def replace(src, dst):
        if Path(dst) == checkpoint and Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt  # between moving the old copy aside and moving the new one in
        return real_replace(src, dst)

    monkeypatch.setattr("os.replace", replace)
    args = script.parse_args([*argv])
    with pytest.raises(KeyboardInterrupt):
        script.save_checkpoint(accelerator, args, {"global_step": 5})
    monkeypatch.undo()
    del model
    script.prepare_output_dir(script.parse_args([*argv, "--resume_from_checkpoint", "latest"]))
    assert (checkpoint / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-5"]


def test_stale_temporaries_are_removed_at_the_next_start(script, stopped_run, capsys):
    out, argv = stopped_run
    stale = [out / "checkpoints" / ".tmp-checkpoint-7", out / ".tmp-best_model-x1y2", out / ".tmp-tokenizer-abc"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (out / ".tmp-history.json-k3j4").write_text("[")  # from write_json
    assert script.main([*argv, "--resume_from_checkpoint", "latest"]) == 0, capsys.readouterr().err[-3000:]
    assert not any(p.exists() for p in stale) and not (out / ".tmp-history.json-k3j4").exists()


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EROFS, "Read-only file system"),
        RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0 basic_ios::clear"),
    ],
    ids=["disk_full", "read_only", "torch_stream_error"],
)
def test_a_failed_write_is_a_clear_exit_2_message(script, monkeypatch, tmp_path, data_files, capsys, error):
    def failing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "out"
    assert script.main([*FAST, *data_args(data_files), "--output_dir", str(out), "--save_every_steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "error: Could not write" in err and "checkpoint-3" in err and "Traceback" not in err, err[-2000:]
    assert not list((out / "checkpoints").iterdir())  # the half-written copy is gone too


def test_a_full_disk_when_saving_the_final_model_is_a_clear_exit_2_message(
    script, monkeypatch, tmp_path, data_files, capsys
):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    out = tmp_path / "out"
    real = transformers.modeling_utils.safe_save_file

    def save_file(tensors, filename, *args, **kwargs):
        if Path(filename).parent == out:  # the shipped model, after training
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left" })')
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    assert script.main([*FAST, *data_args(data_files), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: Error while serializing" in err and "No space left" in err and "Traceback" not in err


def test_an_output_dir_that_cannot_be_created_is_a_clear_exit_2_message(script, tmp_path, data_files, capsys):
    (tmp_path / "a_file").write_text("")
    assert script.main([*FAST, *data_args(data_files), "--output_dir", str(tmp_path / "a_file" / "out")]) == 2
    assert "error: " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Saved model folders: corrupt weights, edited label maps
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved_model(tmp_path) -> Path:
    from modeling import LabelformerConfig, LabelformerForMultiLabelGeneration

    from .conftest import TINY

    config = LabelformerConfig.from_labels(["earn", "acq", "grain"], **TINY)
    LabelformerForMultiLabelGeneration(config).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_loading_a_saved_model_with_flipped_bits_is_refused(saved_model):
    from modeling import LabelformerForMultiLabelGeneration

    assert (saved_model / "checksums.sha256").read_text().endswith("  model.safetensors\n")
    LabelformerForMultiLabelGeneration.from_pretrained(saved_model)  # intact: loads
    data = bytearray((saved_model / "model.safetensors").read_bytes())
    for i in range(len(data) - 4000, len(data), 2):  # 2,000 flipped bits in the tensor data
        data[i] ^= 0x01
    (saved_model / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors is corrupt: its sha256 differs"):
        LabelformerForMultiLabelGeneration.from_pretrained(saved_model)
    LabelformerForMultiLabelGeneration.from_pretrained(saved_model, strict=False)  # on request, as it is


def test_loading_a_model_whose_label_names_were_swapped_is_refused(saved_model):
    from modeling import LabelformerForMultiLabelGeneration

    config = json.loads((saved_model / "config.json").read_text())
    config["id2label"]["0"], config["id2label"]["1"] = config["id2label"]["1"], config["id2label"]["0"]
    config["label2id"] = {name: int(i) for i, name in config["id2label"].items()}
    (saved_model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="`id2label` differs from the labels the model was trained with"):
        LabelformerForMultiLabelGeneration.from_pretrained(saved_model)
    del config["label2id"]["acq"]  # label2id alone edited
    config["id2label"]["0"], config["id2label"]["1"] = "earn", "acq"
    config["label2id"]["earn"], config["label2id"]["acq"] = 1, 0
    (saved_model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="`label2id` is not the inverse of `id2label`"):
        LabelformerForMultiLabelGeneration.from_pretrained(saved_model)


# ---------------------------------------------------------------------------------------------
# Bad input to predict_labels
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model():
    from .textdata import trained_text_model

    return trained_text_model(steps=2)


@pytest.mark.parametrize(
    ("texts", "kwargs", "message"),
    [
        (["wheat prices"], {"num_beams": 0}, "`num_beams` must be an integer >= 1, got 0"),
        (["wheat prices"], {"num_beams": -1}, "`num_beams` must be an integer >= 1, got -1"),
        (["wheat prices"], {"batch_size": 0}, "`batch_size` must be an integer >= 1, got 0"),
        (["wheat prices"], {"max_length": 0}, "`max_length` must be an integer >= 1, got 0"),
        (["wheat prices"], {"max_length": -3}, "`max_length` must be an integer >= 1, got -3"),
        (b"wheat prices", {}, "`texts` must be a string or a list of strings, got bytes"),
        (["ok", b"wheat prices"], {}, "`texts[1]` is a bytes, not a string"),
        (["wheat \ud800 prices"], {}, "`texts[0]` is not valid Unicode: a lone surrogate at character 6"),
    ],
)
def test_predict_labels_refuses_bad_arguments_naming_them(text_model, texts, kwargs, message):
    model, tokenizer = text_model
    with pytest.raises(ValueError) as error:
        model.predict_labels(texts, tokenizer, **kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_pipeline_answers_no_texts_with_no_predictions(text_model, batch_size):
    from modeling.pipeline_labelformer import MultiLabelGenerationPipeline

    model, tokenizer = text_model
    classifier = MultiLabelGenerationPipeline(model=model, tokenizer=tokenizer)
    assert classifier([], batch_size=batch_size) == [] and model.predict_labels([], tokenizer) == []


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["wheat prices", "  "], "`texts[1]` is empty"),
        (["wheat prices", "corn", b"oil"], "`texts[2]` is a bytes, not a string"),
        (["wheat \ud800 prices"], "`texts[0]` is not valid Unicode"),
    ],
)
def test_the_pipeline_refuses_bad_texts_as_predict_labels_does(text_model, texts, message, batch_size):
    from modeling.pipeline_labelformer import MultiLabelGenerationPipeline

    model, tokenizer = text_model
    classifier = MultiLabelGenerationPipeline(model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        classifier(texts, batch_size=batch_size)
    assert "allow_empty" not in str(error.value)  # an option the pipeline does not have


def test_predict_labels_truncates_to_the_models_maximum_by_default(text_model, monkeypatch):
    model, tokenizer = text_model
    seen = []
    real = type(model).predict_batch

    def recording(self, input_ids, attention_mask, num_beams=1):
        seen.append(input_ids.shape[1])
        return real(self, input_ids, attention_mask, num_beams)

    monkeypatch.setattr(type(model), "predict_batch", recording)
    monkeypatch.setattr(tokenizer, "model_max_length", int(1e30))  # a tokenizer without a limit
    assert model.predict_labels(["wheat " * 5000], tokenizer) == model.predict_labels(["wheat " * 600], tokenizer)
    assert seen == [model.config.max_position_embeddings] * 2


def test_predict_labels_refuses_another_tokenizer_of_the_same_size(text_model, monkeypatch):
    from modeling import train_tokenizer
    from modeling.prediction_labelformer import tokenizer_fingerprint

    from .textdata import make_texts

    model, tokenizer = text_model
    monkeypatch.setattr(model.config, "tokenizer_fingerprint", tokenizer_fingerprint(tokenizer))
    assert model.predict_labels(["wheat prices"], tokenizer)
    other = train_tokenizer([r["text"].upper()[::-1] for r in make_texts(400, 1)], vocab_size=80, model_max_length=32)
    assert len(other) <= len(tokenizer)
    with pytest.raises(ValueError, match="`tokenizer` is not the one this model was trained with"):
        model.predict_labels(["wheat prices"], other)


# ---------------------------------------------------------------------------------------------
# Bad training data: exit 2 with the file and its 1-based line or row
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["joined_labels", "broken_test_file", "row_without_labels"])
def test_bad_data_is_an_exit_2_message_naming_file_and_line(script, tmp_path, data_files, capsys, case):
    rows = [json.loads(line) for line in Path(data_files["train"]).read_text().splitlines()]
    files = dict(data_files)
    if case == "joined_labels":
        path = tmp_path / "train.csv"
        path.write_text(
            "body,topics\n" + "".join(f'"doc {i}","{"grain;wheat" if i == 9 else "earn"}"\n' for i in range(40))
        )
        files["train"], files["test"], expected = str(path), None, "train.csv row 10: the label 'grain;wheat'"
    elif case == "broken_test_file":
        path = tmp_path / "test.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows[:6]) + "{not json\n")
        files["test"], expected = str(path), "test.jsonl line 7: not valid JSON"
    else:
        rows[16]["topics"] = []
        path = tmp_path / "train.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files["train"], expected = str(path), "train.jsonl line 17 has no labels"
    argv = [*FAST, *data_args(files), "--output_dir", str(tmp_path / "out")]
    if files["test"] is None:  # one format for all files: no (JSON lines) test file with the CSV
        argv = argv[: argv.index("--test_file")] + argv[argv.index("--test_file") + 2 :]
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and expected in err and "Traceback" not in err, err[-2000:]


# ---------------------------------------------------------------------------------------------
# Tokenizer training is deterministic
# ---------------------------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic(data_files):
    """tokenizers' own WordPieceTrainer numbered pieces in a hash order seeded per map (other vocabularies
    on every call); our learner must not depend on Python's per-process string hashing either."""
    import os
    import subprocess
    import sys

    from modeling import train_tokenizer
    from modeling import wordpiece_labelformer as learner

    texts = [json.loads(line)["body"] for line in Path(data_files["train"]).read_text().splitlines()]
    first, second = (train_tokenizer(texts, vocab_size=500).get_vocab() for _ in range(2))
    assert len(first) == 500 and first == second
    code = (  # the learner alone (no torch import), under two hash seeds
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('learner', {learner.__file__!r})\n"
        "learner = importlib.util.module_from_spec(spec); spec.loader.exec_module(learner)\n"
        "counts = json.loads(sys.stdin.read())\n"
        "print(json.dumps(learner.learn_wordpiece_vocab(counts, 400, 2, ['[PAD]'])))\n"
    )
    counts = json.dumps({f"w{i % 37}x{i % 11}y": 2 + i % 3 for i in range(300)})
    vocabularies = [
        subprocess.run(
            [sys.executable, "-c", code],
            input=counts,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout  # fmt: skip
        for seed in ("1", "2")
    ]
    assert vocabularies[0] == vocabularies[1] and len(json.loads(vocabularies[0])) > 20


def test_the_wordpiece_learner_does_not_depend_on_word_order():
    from modeling.wordpiece_labelformer import learn_wordpiece_vocab

    counts = {"lower": 2, "newest": 6, "widest": 3, "low": 5, "new": 2, "wide": 2, "ab": 2, "ba": 2}
    vocab = learn_wordpiece_vocab(counts, 40, 2, ["[PAD]"])
    assert vocab == learn_wordpiece_vocab(dict(reversed(counts.items())), 40, 2, ["[PAD]"])
    assert vocab[0] == "[PAD]" and "newest" in vocab and "##est" in vocab
    assert vocab.index("##est") < vocab.index("newest")  # a piece is learned before the pieces built on it


@pytest.mark.parametrize("manifest", [True, False])
def test_resume_with_weight_averaging_refuses_a_checkpoint_without_the_mean(script, tmp_path, data_files, capsys,
                                                                             manifest):  # fmt: skip
    """The running mean is part of the state: a checkpoint that lost it cannot continue the run exactly."""
    out = tmp_path / "out"
    argv = [*FAST, *data_args(data_files), "--output_dir", str(out), "--save_every_steps", "5",
            "--average_from_epoch", "1"]  # fmt: skip
    assert script.main([*argv, "--stop_after_steps", "5"]) == 0, capsys.readouterr().err[-3000:]
    checkpoint = out / "checkpoints" / "checkpoint-5"
    (checkpoint / "averaged_model.safetensors").unlink()
    if not manifest:
        (checkpoint / "checksums.sha256").unlink()
    capsys.readouterr()
    assert script.main([*argv, "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert "averaged_model.safetensors" in err and "missing" in err, err[-2000:]
    # the way out: with the manifest the checksum check names the loss first, without it the weight average does
    assert ("older checkpoint" if manifest else "Resume from another checkpoint") in err
    if not manifest:  # nor can the flag be dropped on resume instead: a run's flags are fixed
        assert script.main([*argv[:-2], "--average_from_epoch", "0", "--resume_from_checkpoint", "latest"]) == 2
        assert "--average_from_epoch 1 -> 0" in capsys.readouterr().err
