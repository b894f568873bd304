"""The generation head's decoding bias: EOS bias, per-label bias (logit adjustment), tuning, saving."""

from __future__ import annotations

import math

import pytest
import torch

from modeling import (
    LabelformerConfig,
    LabelformerEnsemble,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
)
from modeling.evaluation_labelformer import EOS_BIASES, PRIOR_WEIGHTS, tune_decoding_bias
from modeling.multilabel_labelformer import prior_label_bias

from .synthetic import LABELS, NUM_CLASSES, check_fast_greedy_matches_generate, synthetic_batch, synthetic_config


def tiny_model(seed: int = 0, **overrides) -> LabelformerForMultiLabelGeneration:
    torch.manual_seed(seed)
    return LabelformerForMultiLabelGeneration(synthetic_config(init_std=0.3, **overrides)).eval()


def batch(seed: int = 0, rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    ids, _ = synthetic_batch(rows, 12, torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, -4:] = 0
    return ids, mask


@pytest.mark.parametrize("seed", range(3))
def test_fast_greedy_path_and_generate_apply_the_same_bias(seed):
    model = tiny_model(seed)
    ids, mask = batch(seed)
    with torch.no_grad():
        unbiased = model.predict_batch(ids, mask, num_beams=1)
    bias = torch.randn(NUM_CLASSES, generator=torch.Generator().manual_seed(seed)) * 3
    model.set_decoding_bias(-1.5, bias.tolist())
    fast = check_fast_greedy_matches_generate(model, ids, mask)
    assert [list(r) for r in fast] != [list(r) for r in unbiased], "the bias changed nothing"


@pytest.mark.parametrize("num_beams", [1, 3])
def test_eos_bias_sets_how_many_labels(num_beams):
    model = tiny_model(1, max_labels=4)
    ids, mask = batch(1)
    with torch.no_grad():
        model.set_decoding_bias(eos_logit_bias=40.0)
        assert [len(p) for p in model.predict_batch(ids, mask, num_beams)] == [1] * len(ids)  # min_labels
        model.set_decoding_bias(eos_logit_bias=-40.0)
        assert [len(p) for p in model.predict_batch(ids, mask, num_beams)] == [4] * len(ids)  # max_labels


@pytest.mark.parametrize("num_beams", [1, 3])
def test_label_bias_favours_its_label(num_beams):
    model = tiny_model(2)
    ids, mask = batch(2)
    bias = [0.0] * NUM_CLASSES
    bias[5] = 40.0
    model.set_decoding_bias(label_logit_bias=bias)
    with torch.no_grad():
        predictions = model.predict_batch(ids, mask, num_beams)
    assert all(next(iter(p)) == LABELS[5] for p in predictions)


def test_the_training_loss_ignores_the_decoding_bias():
    model = tiny_model(3)
    ids, mask = batch(3)
    labels = torch.tensor([[3, 5, 2]] * len(ids))
    model.train()
    before = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    model.set_decoding_bias(2.0, [1.0] * NUM_CLASSES)
    assert torch.equal(model(input_ids=ids, attention_mask=mask, labels=labels).loss, before)


def test_decoding_bias_is_saved_and_loaded(tmp_path):
    model = tiny_model(4)
    bias = prior_label_bias(range(1, NUM_CLASSES + 1), 0.3)
    model.set_decoding_bias(-0.5, bias)
    model.save_pretrained(tmp_path)
    loaded = LabelformerForMultiLabelGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.eos_logit_bias == -0.5
    assert loaded.config.label_logit_bias == pytest.approx(bias)
    ids, mask = batch(4)
    with torch.no_grad():
        assert loaded.predict_batch(ids, mask) == model.predict_batch(ids, mask)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"eos_logit_bias": float("nan")}, "eos_logit_bias"),
        ({"eos_logit_bias": "1"}, "eos_logit_bias"),
        ({"eos_logit_bias": True}, "eos_logit_bias"),
        ({"label_logit_bias": [0.0] * (NUM_CLASSES - 1)}, "label_logit_bias"),
        ({"label_logit_bias": [0.0] * (NUM_CLASSES - 1) + [math.inf]}, "label_logit_bias"),
    ],
)
def test_bad_decoding_bias_is_rejected(overrides, field):
    with pytest.raises(ValueError, match=field):
        LabelformerConfig.from_labels(LABELS, **overrides)
    model = tiny_model(5)
    with pytest.raises(ValueError, match=field):
        model.set_decoding_bias(**overrides)
    assert model.config.eos_logit_bias == 0.0 and model.config.label_logit_bias is None  # left as it was


def test_prior_label_bias_favours_rare_labels():
    counts = [1000, 100, 10, 0]
    bias = prior_label_bias(counts, 0.5)
    assert sum(bias) == pytest.approx(0.0, abs=1e-6)
    assert bias == sorted(bias) and bias[0] < 0 < bias[2]
    assert bias[1] - bias[0] == pytest.approx(0.5 * math.log(10), rel=1e-5)
    assert prior_label_bias(counts, 0.0) == [0.0] * 4
    with pytest.raises(ValueError, match="weight"):
        prior_label_bias(counts, -0.1)


def test_tuning_keeps_the_best_setting_and_prefers_no_bias_on_ties():
    model = tiny_model(6)
    references = [[LABELS[0]], [LABELS[1], LABELS[2]]]
    counts = {label: 10 * (i + 1) for i, label in enumerate(LABELS)}

    def predict(m) -> list[list[str]]:  # right only at EOS bias 0.5 with the 0.2 logit adjustment
        target = prior_label_bias([counts[label] for label in LABELS], 0.2)
        right = m.config.eos_logit_bias == 0.5 and m.config.label_logit_bias == pytest.approx(target)
        return references if right else [[LABELS[3]], [LABELS[1]]]

    tuned = tune_decoding_bias(model, predict, references, counts, set_search_rounds=0)  # tests/test_set_search.py
    assert (tuned["eos_logit_bias"], tuned["prior_weight"], tuned["micro_f1"]) == (0.5, 0.2, 1.0)
    assert tuned["unbiased_micro_f1"] < 1.0 and len(tuned["grid"]) == len(EOS_BIASES) * len(PRIOR_WEIGHTS)
    assert model.config.eos_logit_bias == 0.5 and predict(model) == references  # the winner stays set

    flat = tune_decoding_bias(model, lambda m: [[LABELS[0]], [LABELS[1]]], references, counts, set_search_rounds=0)
    assert (flat["eos_logit_bias"], flat["prior_weight"]) == (0.0, 0.0)
    assert model.config.eos_logit_bias == 0.0 and model.config.label_logit_bias is None
    assert set(EOS_BIASES) == {g["eos_logit_bias"] for g in flat["grid"]}


def test_ensemble_sets_the_bias_on_every_member():
    ensemble = LabelformerEnsemble([tiny_model(7), tiny_model(8)])
    ids, mask = batch(7)
    ensemble.set_decoding_bias(eos_logit_bias=40.0)
    assert all(m.config.eos_logit_bias == 40.0 for m in ensemble.members) and ensemble.config.eos_logit_bias == 40.0
    for num_beams in (1, 3):
        assert [len(p) for p in ensemble.predict_batch(ids, mask, num_beams)] == [1] * len(ids)
    threshold = LabelformerEnsemble([LabelformerForMultiLabelClassification(synthetic_config())])
    with pytest.raises(TypeError, match="generation"):
        threshold.set_decoding_bias(1.0)
