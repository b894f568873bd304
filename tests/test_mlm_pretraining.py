"""benchmarks/mlm_pretraining.py: masking, windows, pretraining, and the hand-over to --init_encoder_from."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from modeling import LabelformerConfig, LabelformerForMultiLabelClassification

from .conftest import TINY, tiny_config

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mlm = _load("mlm_pretraining_script", ROOT / "benchmarks" / "mlm_pretraining.py")


def test_mask_tokens_scores_only_real_non_special_tokens():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (64, 200), generator=generator)
    ids[:, -1] = 2  # EOS
    attention = torch.ones_like(ids)
    attention[::2, 150:] = 0
    ids[::2, 150:] = 0
    inputs, targets = mlm.mask_tokens(ids, attention, 1, 1000, [0, 1, 2, 3], 0.15, generator)
    chosen = targets != -100
    assert torch.equal(targets[chosen], ids[chosen])
    assert not chosen[attention == 0].any() and not chosen[:, -1].any()  # no padding, no EOS
    assert torch.equal(inputs[~chosen], ids[~chosen])  # the rest is untouched
    candidates = int(((attention == 1) & (ids > 3)).sum())
    assert abs(chosen.sum().item() / candidates - 0.15) < 0.01
    masked = (inputs[chosen] == 1).float().mean().item()
    unchanged = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.03 and 0.08 < unchanged < 0.13  # 10% kept (+ random hits of itself)
    assert (inputs[chosen] > 3).logical_or(inputs[chosen] == 1).all()  # random swaps never draw a special id


def test_document_windows_cover_long_documents():
    windows = mlm.document_windows([list(range(10, 30)), [5, 6], []], length=8, eos_id=2, min_tokens=3)
    assert windows[:3] == [[*range(10, 17), 2], [*range(17, 24), 2], [*range(24, 30), 2]]
    assert windows[3:] == [[5, 6, 2], [2]]  # a short or empty document keeps its only window
    tail = mlm.document_windows([list(range(10, 19))], length=8, eos_id=2, min_tokens=3)
    assert tail == [[*range(10, 17), 2]]  # the 2-token tail is dropped


def test_pretraining_learns_and_hands_its_encoder_to_the_threshold_head(tmp_path):
    """A copy task the encoder can only solve from context: loss falls, and the head receives the weights."""
    config = tiny_config(vocab_size=24)
    generator = torch.Generator().manual_seed(0)
    windows = []
    for _ in range(256):  # every document is one token repeated: a masked token equals its neighbours
        token = int(torch.randint(4, 24, (1,), generator=generator))
        windows.append([token] * 15 + [2])
    encoder, losses = mlm.pretrain_encoder(windows, config, 1, [0, 1, 2, 3], epochs=8, learning_rate=1e-2,
                                           batch_size=16, progress=False)  # fmt: skip
    assert losses[-1] < 0.5 * losses[0], losses
    mlm.save_encoder(encoder, tmp_path / "encoder")
    script = _load("train_multilabel_for_mlm", ROOT / "examples" / "train_multilabel.py")
    model = LabelformerForMultiLabelClassification(
        LabelformerConfig.from_labels(["a", "b"], **{**TINY, "vocab_size": 24})
    )
    script.init_encoder_from(model, str(tmp_path / "encoder"))
    for name, value in encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], value), name


def test_script_pretrains_on_training_texts_and_saves_the_encoder(tmp_path):
    out = tmp_path / "mlm"
    command = [sys.executable, str(ROOT / "benchmarks" / "mlm_pretraining.py"), "--output_dir", str(out),
               "--epochs", "1", "--max_train_samples", "24", "--no_threshold", "--no_progress"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "mlm_pretraining.json").read_text())
    assert report["windows"] >= 24 and len(report["mlm_loss_by_epoch"]) == 1
    assert (out / "encoder" / "model.safetensors").is_file() and (out / "tokenizer").is_dir()
    bad = subprocess.run([*command[:-4], "--mask_probability", "1.5"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--mask_probability" in bad.stderr
