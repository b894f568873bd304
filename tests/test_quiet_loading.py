"""A normal run says nothing alarming: loading, predicting, the bare model from a head's folder, the tokenizer,
Trainer's load-best. Checked where the messages appear: in a fresh process (stdin closed) and in Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import transformers.trainer
from safetensors.torch import load_file
from transformers import Seq2SeqTrainer

from modeling import (
    LabelformerForConditionalGeneration,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
    LabelformerModel,
)

from .conftest import tiny_config
from .isolation import PRELUDE
from .synthetic import synthetic_config
from .test_remote_code import TEXTS, _saved_multilabel_heads

#: Messages users took for errors (issue 29), and the remote-code prompt.
ALARMS = ("Removed shared tensor", "to instantiate a model of type", "UNEXPECTED", "MISSING", "missing keys",
          "custom code", "[y/N]")  # fmt: skip


def run_fresh(code: str, cwd) -> tuple[dict, str]:
    """Run ``code`` isolated from our packages with stdin closed; its JSON line and everything it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "hf_modules")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(line), proc.stdout + proc.stderr


def test_loading_predicting_and_the_tokenizer_say_nothing_alarming_in_a_fresh_process(tmp_path):
    heads, tokenizer = _saved_multilabel_heads(tmp_path)
    expected = heads["generation"].predict_labels(TEXTS, tokenizer=tokenizer)
    result, printed = run_fresh(
        f"""
        import json
        from transformers import AutoModel, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast
        root = {str(tmp_path)!r}
        head = AutoModelForSeq2SeqLM.from_pretrained(root + "/generation", trust_remote_code=True)
        labels = head.predict_labels({TEXTS!r})  # finds the tokenizer saved beside the model
        base = type(AutoModel.from_pretrained(root + "/generation", trust_remote_code=True)).__name__
        tokenizer = PreTrainedTokenizerFast.from_pretrained(root + "/generation")  # no config, no code
        print(json.dumps({{"labels": labels, "base": base, "ids": tokenizer({TEXTS[0]!r})["input_ids"]}}))
        """,
        tmp_path,
    )
    assert result["labels"] == expected
    assert result["base"] == "LabelformerModel"
    assert result["ids"] == tokenizer(TEXTS[0])["input_ids"]
    assert not [alarm for alarm in ALARMS if alarm in printed], printed[-3000:]


def test_a_head_still_reports_weights_it_does_not_know(tmp_path):
    """Only the bare model ignores a head's own weights; a head loading another head's folder is told."""
    heads, _ = _saved_multilabel_heads(tmp_path)
    _, info = LabelformerModel.from_pretrained(tmp_path / "generation", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    _, info = LabelformerForConditionalGeneration.from_pretrained(tmp_path / "generation", output_loading_info=True)
    unexpected = {key.split(".")[0] for key in info["unexpected_keys"]}
    assert unexpected == {"document_classifier", "label_attention", "lexical_scorer"}


@pytest.mark.parametrize(
    "head, config, tied",
    [(LabelformerModel, {}, False), (LabelformerModel, {"share_embeddings": True}, True),
     (LabelformerForConditionalGeneration, {}, True),
     (LabelformerForConditionalGeneration, {"share_embeddings": True}, True),
     (LabelformerForMultiLabelGeneration, None, True), (LabelformerForMultiLabelClassification, None, False)],
)  # fmt: skip
def test_trainer_load_best_reties_instead_of_warning_about_missing_keys(head, config, tied, tmp_path, monkeypatch):
    """Trainer's load-best loads the checkpoint's safetensors with ``strict=False``; the keys it then misses
    (tied copies, stored once) are exactly `_keys_to_ignore_on_save`, so it re-ties them and says nothing."""
    model = head(synthetic_config() if config is None else tiny_config(**config))
    model.save_pretrained(tmp_path)
    loaded = model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert set(loaded.missing_keys) == set(model._keys_to_ignore_on_save)
    assert bool(loaded.missing_keys) == tied
    warned = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda message, *args, **kwargs: warned.append(message))
    Seq2SeqTrainer._issue_warnings_after_load(SimpleNamespace(model=model), loaded)
    assert not warned
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict()) - set(loaded.missing_keys)
