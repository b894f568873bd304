"""The parallel (non-autoregressive) label decoder."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from modeling import LabelformerConfig, LabelformerForParallelLabelGeneration
from modeling.parallel_labelformer import slot_targets

from .isolation import run_isolated
from .synthetic import synthetic_batch, synthetic_config
from .test_generation_labelformer import generation_targets, train_synthetic

SPECIAL = 3


def test_slot_targets_and_the_loss_read_them():
    labels = torch.tensor([[5, 3, 2, -100], [4, 2, -100, -100]])
    assert slot_targets(labels, 3).tolist() == [[5, 3, 2], [4, 2, -100]]
    assert slot_targets(labels, 6).tolist() == [[5, 3, 2, -100, -100, -100], [4, 2, -100, -100, -100, -100]]
    model = LabelformerForParallelLabelGeneration(synthetic_config(num_label_slots=3)).eval()
    ids, _ = synthetic_batch(2, 10, torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 3, model.config.decoder_vocab_size)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(6, -1), slot_targets(labels, 3).reshape(6))
    torch.testing.assert_close(out.loss, expected)


def test_the_parallel_head_needs_a_label_config_without_a_lexical_part():
    with pytest.raises(ValueError, match="from_labels"):
        LabelformerForParallelLabelGeneration(LabelformerConfig(vocab_size=50))
    with pytest.raises(ValueError, match="without `lexical_scorer`"):
        LabelformerForParallelLabelGeneration(synthetic_config(lexical_scorer=True))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("limits", [{}, {"min_labels": 2, "max_labels": 3}])
def test_never_a_repeated_label_or_a_non_label_token(seed, limits):
    torch.manual_seed(seed)
    config = synthetic_config(init_std=1.0 + seed, **limits)
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
        if 2 in row:  # the set ends at the first EOS
            assert set(row[row.index(2) :]) == {2}
    assert ((scores >= 0) & (scores <= 1)).all()


def test_learns_varying_label_counts():
    model = LabelformerForParallelLabelGeneration(synthetic_config(norm_position="pre"))
    model = train_synthetic(model, 300, generation_targets)
    ids, gold = synthetic_batch(300, 16, torch.Generator().manual_seed(99))
    predicted = model.predict_batch(ids, torch.ones_like(ids))
    exact = sum(set(p) == set(g) for p, g in zip(predicted, gold)) / len(gold)
    assert exact >= 0.9, f"exact match {exact:.3f}"


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
