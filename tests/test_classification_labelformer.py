"""The threshold head: logits > 0 decide, the folded threshold, pooling, loss, predict_labels, learning."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from modeling import LabelformerConfig, LabelformerForMultiLabelClassification, train_tokenizer

from .synthetic import LABELS, NUM_CLASSES, synthetic_batch, synthetic_config
from .test_generation_labelformer import train_synthetic


def threshold_head(**overrides) -> LabelformerForMultiLabelClassification:
    torch.manual_seed(0)
    return LabelformerForMultiLabelClassification(synthetic_config(init_std=0.5, **overrides)).eval()


def test_logits_loss_and_config():
    model = threshold_head()
    assert model.config.problem_type == "multi_label_classification"
    ids, label_sets = synthetic_batch(4, 12, torch.Generator().manual_seed(0))
    targets = torch.zeros(4, NUM_CLASSES)
    for row, labels in enumerate(label_sets):
        targets[row, [LABELS.index(label) for label in labels]] = 1
    out = model(input_ids=ids, labels=targets)
    assert out.logits.shape == (4, NUM_CLASSES)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_pooling_ignores_padding(pooling):
    model = threshold_head(classifier_pooling=pooling)
    ids, _ = synthetic_batch(3, 10, torch.Generator().manual_seed(1))
    padded = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(3, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits, plain, atol=1e-5, rtol=1e-4)
        states = model.encoder(ids).last_hidden_state
    pooled = states[:, 0] if pooling == "first" else states.mean(1)
    torch.testing.assert_close(plain, model.classifier(pooled), atol=1e-5, rtol=1e-4)


def test_fold_threshold_makes_logits_above_zero_decide_like_the_threshold(tmp_path):
    model = threshold_head()
    ids, _ = synthetic_batch(64, 12, torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = torch.sigmoid(model(input_ids=ids).logits)
    bias = model.classifier.bias.detach().clone()
    for threshold in (0.3, 0.4):  # folded one after the other: their logits add up
        model.fold_threshold(threshold)
    torch.testing.assert_close(model.classifier.bias, bias - math.log(0.3 / 0.7) - math.log(0.4 / 0.6))
    model.classifier.bias.data.copy_(bias)
    # a threshold in the widest gap between probabilities near the median: about half of the decisions flip
    values = before.flatten().sort().values.double()
    quarter = len(values) // 4
    k = quarter + int((values[quarter + 1 : 3 * quarter] - values[quarter : 3 * quarter - 1]).argmax())
    threshold = float(values[k] + values[k + 1]) / 2
    model.fold_threshold(threshold)
    with torch.no_grad():
        after = torch.sigmoid(model(input_ids=ids).logits)
    decided = after > 0.5
    assert torch.equal(decided, before > threshold)
    assert decided.any() and not decided.all()
    predicted = model.predict_batch(ids, mask)
    for row, scored in enumerate(predicted):  # predict_batch reads the same decision and probabilities
        assert set(scored) == {LABELS[i] for i in decided[row].nonzero().flatten().tolist()}
        assert list(scored.values()) == sorted(scored.values(), reverse=True)
        assert list(scored.values()) == pytest.approx(sorted(after[row][decided[row]].tolist(), reverse=True))
    model.save_pretrained(tmp_path)  # the folded threshold is part of the weights
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is LabelformerForMultiLabelClassification
    assert loaded.predict_batch(ids, mask) == predicted
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="`threshold` must be in"):
            model.fold_threshold(bad)


def test_predict_labels_on_raw_strings_is_sigmoid_above_one_half():
    texts = ["wheat prices rise", "corn and wheat harvest", "company earnings up", "merger"]
    tokenizer = train_tokenizer(texts * 5, vocab_size=50)
    config = LabelformerConfig.from_labels(
        ["wheat", "corn", "earn"], vocab_size=len(tokenizer), d_model=32, encoder_attention_heads=2,
        decoder_attention_heads=2, init_std=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LabelformerForMultiLabelClassification(config).eval()
    scored = model.predict_labels(texts, tokenizer=tokenizer, batch_size=3, return_scores=True)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.sigmoid(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    for row, labels in enumerate(scored):
        assert set(labels) == {config.id2label[i] for i in (probs[row] > 0.5).nonzero().flatten().tolist()}
        want = sorted(probs[row][probs[row] > 0.5].tolist(), reverse=True)
        assert list(labels.values()) == pytest.approx(want, abs=1e-5)  # batched with other padding: float noise
    assert any(scored) and not all(len(labels) == 3 for labels in scored)  # an informative case
    assert model.predict_labels(texts, tokenizer=tokenizer) == [list(labels) for labels in scored]


def test_threshold_head_learns():
    def targets(label_sets):
        out = torch.zeros(len(label_sets), NUM_CLASSES)
        for i, labels in enumerate(label_sets):
            out[i, [LABELS.index(x) for x in labels]] = 1
        return out

    model = train_synthetic(LabelformerForMultiLabelClassification(synthetic_config()), 200, targets)
    ids, gold = synthetic_batch(300, 16, torch.Generator().manual_seed(99))
    predicted = model.predict_batch(ids, torch.ones_like(ids), 1)
    exact = sum(set(p) == set(g) for p, g in zip(predicted, gold)) / len(gold)
    assert exact >= 0.9, f"exact match {exact:.3f}"
