"""Multi-process CPU training through `accelerate launch` itself, with the command the README gives."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .isolation import run_in_own_session

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_multilabel.py"
#: The training script with one tokenizer for every run (WordPiece training breaks ties differently from
#: run to run, which would make two runs' inputs differ): what each process of the launch runs.
WITH_FIXED_TOKENIZER = """
import importlib.util, sys
from transformers import AutoTokenizer
spec = importlib.util.spec_from_file_location("train_multilabel", {script!r})
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
script.train_tokenizer = lambda texts, vocab_size, model_max_length: AutoTokenizer.from_pretrained(
    {tokenizer!r}, model_max_length=model_max_length
)
sys.exit(script.main(sys.argv[1:]))
"""


def readme_cpu_launch() -> list[str]:
    """The README's 2-process CPU command, up to the script (``accelerate launch ...``)."""
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"^accelerate launch --multi_gpu --num_processes 2 .*$", readme, re.M).group(0)
    return line.split(" examples/train_multilabel.py")[0].split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = run_in_own_session(command, env, timeout)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "history.json").read_text()) if "loss" in h]


def test_accelerate_launch_trains_on_2_cpu_processes_like_1_process(tmp_path, data_files):
    from modeling import load_multilabel_dataset, train_tokenizer

    launch = readme_cpu_launch()
    assert launch[:2] == ["accelerate", "launch"] and "--cpu" not in launch  # --cpu starts one process
    texts = load_multilabel_dataset(train_file=data_files["train"], text_column="body", label_column="topics")
    train_tokenizer(texts["train"]["text"], vocab_size=500).save_pretrained(tmp_path / "tokenizer")
    script = tmp_path / "train_with_fixed_tokenizer.py"
    script.write_text(WITH_FIXED_TOKENIZER.format(script=str(SCRIPT), tokenizer=str(tmp_path / "tokenizer")))
    common = [str(script), "--preset", "tiny", "--no_progress", "--train_file", data_files["train"], "--test_file",
              data_files["test"], "--text_column", "body", "--label_column", "topics", "--epochs", "1",
              "--dropout", "0", "--no-lexical_scorer", "--num_beams", "1", "--average_from_epoch", "1"]  # fmt: skip
    single, double = tmp_path / "single", tmp_path / "double"
    run([sys.executable, *common, "--batch_size", "16", "--output_dir", str(single)])
    installed = Path(sys.executable).with_name("accelerate")  # the venv's `accelerate` command
    accelerate = [str(installed) if installed.is_file() else "accelerate", *launch[1:]]
    command = [*accelerate, "--main_process_port", str(free_port()), *common, "--batch_size", "8",
               "--output_dir", str(double)]  # fmt: skip
    try:
        proc = run(command)
    except subprocess.TimeoutExpired:  # the rare gloo teardown hang (see quiesce_process_group): once more
        shutil.rmtree(double, ignore_errors=True)
        proc = run(command)
    assert "2 process(es) (DistributedType.MULTI_CPU)" in proc.stderr
    assert "were not passed to `accelerate launch`" not in proc.stderr + proc.stdout  # the command is complete
    # the same steps: 2 processes x 8 documents = 1 process x 16, at dropout 0
    assert len(losses(double)) == len(losses(single)) > 1
    assert losses(double) == pytest.approx(losses(single), rel=1e-4, abs=1e-5)
    # weight averaging under 2 processes: the history says the mean was validated, and the shipped model is
    # the mean the last checkpoint holds (the main process's copy, as with 1 process)
    for out in (single, double):
        assert [h["averaged_from"] for h in json.loads((out / "history.json").read_text()) if "loss" not in h] == [1]
        checkpoint = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        mean = {k.removeprefix("module."): v for k, v in load_file(checkpoint / "averaged_model.safetensors").items()}
        shipped = load_file(out / "model.safetensors")
        names = shipped.keys() & mean.keys()  # a tied matrix is stored once, under either of its names
        assert len(names) >= len(shipped) - 1 and len(names) > 10
        assert all(shipped[name].equal(mean[name]) for name in names)
