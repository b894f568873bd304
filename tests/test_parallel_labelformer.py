"""The parallel (non-autoregressive) label decoder."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from modeling import LabelformerForParallelLabelGeneration
from modeling.parallel_labelformer import hungarian_targets, slot_targets

from .isolation import run_isolated
from .synthetic import synthetic_batch, synthetic_config
from .test_multilabel_labelformer import generation_targets, train_synthetic

SPECIAL = 3


def test_slot_and_hungarian_targets():
    labels = torch.tensor([[5, 3, 2, -100], [4, 2, -100, -100]])
    assert slot_targets(labels, 3).tolist() == [[5, 3, 2], [4, 2, -100]]
    log_probs = torch.full((1, 3, 6), -5.0)
    log_probs[0, 0, 3] = log_probs[0, 2, 5] = -0.1  # slot 0 likes label token 3, slot 2 likes token 5
    assert hungarian_targets(log_probs, torch.tensor([[3, 5, 2]])).tolist() == [[3, 2, 5]]


@pytest.mark.parametrize("loss", ["ordered", "hungarian"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("limits", [{}, {"min_labels": 2, "max_labels": 3}])
def test_never_a_repeated_label_or_a_non_label_token(loss, seed, limits):
    torch.manual_seed(seed)
    config = synthetic_config(parallel_loss=loss, init_std=1.0 + seed, **limits)
    model = LabelformerForParallelLabelGeneration(config).eval()
    with torch.no_grad():
        model.classifier.bias[:SPECIAL] += 5.0  # tempt the raw model with pad/bos
    ids, _ = synthetic_batch(8, 12, torch.Generator().manual_seed(seed))
    for row in model.predict_batch(ids, torch.ones_like(ids)):
        assert set(row) <= set(config.label2id)
        assert config.min_labels <= len(row) <= config.effective_max_labels
    tokens, scores = model.decode_slots(model(input_ids=ids).logits)
    for row in tokens.tolist():
        labels = [t for t in row if t >= SPECIAL]
        assert len(labels) == len(set(labels)) and all(t == 2 or t >= SPECIAL for t in row)
    assert ((scores >= 0) & (scores <= 1)).all()


@pytest.mark.parametrize("loss", ["ordered", "hungarian"])
def test_learns_varying_label_counts(loss):
    model = LabelformerForParallelLabelGeneration(synthetic_config(parallel_loss=loss, norm_position="pre"))
    model = train_synthetic(model, 300, generation_targets)
    ids, gold = synthetic_batch(300, 16, torch.Generator().manual_seed(99))
    predicted = model.predict_batch(ids, torch.ones_like(ids))
    exact = sum(set(p) == set(g) for p, g in zip(predicted, gold)) / len(gold)
    assert exact >= 0.9, f"exact match {exact:.3f} with the {loss} loss"


def test_save_load_auto_class_and_fresh_process(tmp_path):
    from modeling import train_tokenizer

    from .test_remote_code import TEXTS

    tokenizer = train_tokenizer(TEXTS * 5, vocab_size=60)
    config = synthetic_config(vocab_size=len(tokenizer))
    model = LabelformerForParallelLabelGeneration(config).eval()
    model.save_pretrained(tmp_path / "parallel")
    tokenizer.save_pretrained(tmp_path / "parallel")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "parallel")
    assert type(loaded) is LabelformerForParallelLabelGeneration
    expected = model.predict_labels(TEXTS, tokenizer=tokenizer, return_scores=True)
    assert loaded.predict_labels(TEXTS, return_scores=True) == expected
    result = run_isolated(
        f"""
        import json
        from transformers import AutoModelForSeq2SeqLM, pipeline
        path = {str(tmp_path / "parallel")!r}
        model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True)
        classifier = pipeline("multi-label-generation", model=path, trust_remote_code=True)
        print(json.dumps({{"name": type(model).__name__, "labels": model.predict_labels({TEXTS!r}, return_scores=True),
                          "pipeline": classifier({TEXTS!r})}}))
        """,
        cwd=tmp_path,
    )
    assert result["name"] == "LabelformerForParallelLabelGeneration"
    for got, want in zip(result["labels"], expected):
        assert list(got) == list(want) and got == pytest.approx(want, abs=1e-6)
    assert [[x["label"] for x in row] for row in result["pipeline"]] == [list(r) for r in expected]
