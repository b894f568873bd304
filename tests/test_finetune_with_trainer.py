"""Seq2SeqTrainer fine-tuning of a saved Labelformer; its checkpoints load as remote code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling import (
    LabelformerConfig,
    LabelformerForMultiLabelGeneration,
    build_label_vocabulary,
    load_multilabel_dataset,
    train_tokenizer,
)

from .isolation import run_isolated

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "finetune_with_trainer.py"


def test_trainer_fine_tunes_and_checkpoints_load_with_remote_code(tmp_path, data_files):
    data = load_multilabel_dataset(train_file=data_files["train"], text_column="body", label_column="topics")
    tokenizer = train_tokenizer(data["train"]["text"], vocab_size=500, model_max_length=48)
    config = LabelformerConfig.from_labels(
        build_label_vocabulary(data["train"]["labels"]), vocab_size=len(tokenizer), d_model=32, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
    )  # fmt: skip
    base = tmp_path / "base"
    LabelformerForMultiLabelGeneration(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "finetuned"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(SCRIPT), "--model_name_or_path", str(base), "--output_dir", str(out),
               "--train_file", data_files["train"], "--validation_file", data_files["test"], "--text_column", "body",
               "--label_column", "topics", "--max_steps", "4", "--batch_size", "8", "--max_length", "48"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for alarm in ("missing keys", "pin_memory", "to instantiate a model of type"):  # load-best re-ties quietly
        assert alarm not in proc.stderr, alarm
    metrics = json.loads((out / "eval_results.json").read_text())
    assert {"eval_micro_f1", "eval_macro_f1", "eval_subset_accuracy", "eval_hamming_loss"} <= set(metrics)
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    checkpoint = checkpoints[-1]
    assert (checkpoint / "generation_labelformer.py").is_file() and (checkpoint / "model.safetensors").is_file()
    result = run_isolated(
        f"""
        import json
        from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer
        path = {str(checkpoint)!r}
        head = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True)
        base = AutoModel.from_pretrained(path, trust_remote_code=True)
        labels = head.predict_labels(["Net profit rose 10 pct", "Wheat exports fell"])
        print(json.dumps({{"head": type(head).__name__, "base": type(base).__name__, "labels": labels}}))
        """,
        cwd=tmp_path,
    )
    assert result["head"] == "LabelformerForMultiLabelGeneration" and result["base"] == "LabelformerModel"
    assert len(result["labels"]) == 2 and all(set(ls) <= set(config.label2id) for ls in result["labels"])


def test_trainer_metrics_decode_with_the_model_and_count_labels_it_cannot_predict():
    """The script decodes generated ids with `decode_labels` and scores them against the raw validation
    label sets: labels unseen in training are misses."""
    from types import SimpleNamespace

    import numpy as np

    from modeling.trainer_labelformer import multilabel_compute_metrics

    from .conftest import TINY

    model = LabelformerForMultiLabelGeneration(LabelformerConfig.from_labels(["earn", "acq"], **TINY))
    start, eos = 1, 2  # decoder ids: 0 pad, 1 start, 2 EOS, label k is k + 3
    # "earn"; "acq", "earn" (no EOS: max_labels reached, then the Trainer's -100 padding); nothing
    generated = np.array([[start, 3, eos, 0], [start, 4, 3, -100], [start, eos, -100, -100]])
    assert model.decode_labels(torch.as_tensor(generated)) == [["earn"], ["acq", "earn"], []]
    compute = multilabel_compute_metrics(model, references=[["earn", "zinc"], ["acq", "earn"], ["acq"]])
    metrics = compute(SimpleNamespace(predictions=generated, label_ids=None))
    # 3 of 5 gold labels found, no false positive: zinc (unseen in training) is a miss.
    assert metrics["micro_f1"] == pytest.approx(2 * 3 / (3 + 5))
    assert metrics["subset_accuracy"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        compute(SimpleNamespace(predictions=generated[:1], label_ids=None))
