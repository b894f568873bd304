"""Label names as evidence: naming, matching, the label-name bias of both heads and ensembles, tuning, saving."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from modeling import (
    LabelformerEnsemble,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
    label_name_token_ids,
    named_labels,
    train_tokenizer,
)
from modeling.evaluation_labelformer import EOS_BIASES, PRIOR_WEIGHTS, tune_decoding_bias
from modeling.label_names_labelformer import label_name_words
from modeling.multilabel_labelformer import LABEL_NAME_BIASES

from .synthetic import (
    FIRST_TOKEN,
    KEYWORDS_PER_CLASS,
    LABELS,
    NUM_CLASSES,
    check_fast_greedy_matches_generate,
    synthetic_batch,
    synthetic_config,
)

#: Synthetic label c is "named" by its first keyword token; class_7 has no name words.
NAMES = [[[FIRST_TOKEN + c * KEYWORDS_PER_CLASS]] for c in range(NUM_CLASSES - 1)] + [[]]


def named_model(head, seed: int = 0, bias: float = 0.0, **overrides):
    torch.manual_seed(seed)
    config = synthetic_config(init_std=0.3, label_name_token_ids=NAMES, label_name_bias=bias, **overrides)
    return head(config).eval()


def batch(seed: int = 0, rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    ids, _ = synthetic_batch(rows, 12, torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[-1, -4:], mask[-1, -4:] = 0, 0
    return ids, mask


def occurs(word: list[int], tokens: list[int]) -> bool:
    return any(tokens[i : i + len(word)] == word for i in range(len(tokens) - len(word) + 1))


def brute_force_named(ids: torch.Tensor, names) -> torch.Tensor:
    result = torch.zeros(ids.shape[0], len(names), dtype=torch.bool)
    for row, label in itertools.product(range(ids.shape[0]), range(len(names))):
        tokens = ids[row].tolist()
        result[row, label] = bool(names[label]) and all(occurs(word, tokens) for word in names[label])
    return result


def test_label_name_words_split_names_and_drop_short_words():
    assert label_name_words("rape-oil") == ["rape", "oil"]
    assert label_name_words("l-cattle") == ["cattle"]
    assert label_name_words("money-fx") == ["money"]
    assert label_name_words("Crude Oil/Gas") == ["Crude", "Oil", "Gas"]
    assert label_name_words("a-b") == []


def test_label_names_are_found_in_tokenized_texts():
    texts = ["palm oil and rape oil prices rose", "live cattle futures fell", "nickel output grew"] * 30
    tokenizer = train_tokenizer(texts, vocab_size=120)
    labels = ["rape-oil", "sun-oil", "l-cattle", "nickel", "dfl"]
    names = label_name_token_ids(labels, tokenizer)
    assert names[4] == []  # "dfl" is [UNK] to this tokenizer: it must not match every unknown word
    assert names[0] == [tokenizer("rape", add_special_tokens=False)["input_ids"],
                        tokenizer("oil", add_special_tokens=False)["input_ids"]]  # fmt: skip
    encoded = tokenizer(["Rape oil and palm oil", "the cattle market", "NICKEL", "oil only"],
                        padding=True, return_tensors="pt")  # fmt: skip
    named = named_labels(encoded["input_ids"], names)
    assert named.tolist() == [
        [True, False, False, False, False],
        [False, False, True, False, False],
        [False, False, False, True, False],
        [False, False, False, False, False],  # one word of two is not enough
    ]


@pytest.mark.parametrize("seed", range(4))
def test_named_labels_matches_a_brute_force_search(seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 9, (5, 14), generator=generator)
    ids[2, 10:] = 0  # padding
    names = []
    for _ in range(12):
        words = int(torch.randint(0, 3, (1,), generator=generator))
        names.append([torch.randint(1, 9, (int(torch.randint(1, 3, (1,), generator=generator)),),
                                    generator=generator).tolist() for _ in range(words)])  # fmt: skip
    names.append([[3] * 20])  # a word longer than the input
    assert torch.equal(named_labels(ids, names), brute_force_named(ids, names))


def test_threshold_head_adds_the_bias_to_named_labels_only():
    model = named_model(LabelformerForMultiLabelClassification)
    ids, mask = batch(1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        plain = model.predict_batch(ids, mask)
        model.set_label_name_bias(2.5)
        biased = model.predict_batch(ids, mask)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)  # never in the forward/loss
    expected = torch.sigmoid(logits + 2.5 * brute_force_named(ids, NAMES).float())
    chosen = model.decide(expected)
    for row, predicted in enumerate(biased):
        assert set(predicted) == {LABELS[j] for j in chosen[row].nonzero().flatten().tolist()}
        for label, prob in predicted.items():
            assert prob == pytest.approx(float(expected[row, LABELS.index(label)]), abs=1e-5)
    assert biased != plain, "the bias changed nothing"
    model.set_label_name_bias(40.0)
    with torch.no_grad():
        forced = model.predict_batch(ids, mask)
    for row, predicted in enumerate(forced):
        assert {LABELS[j] for j in brute_force_named(ids, NAMES)[row].nonzero().flatten().tolist()} <= set(predicted)


def test_tune_label_name_bias_picks_a_bias_only_when_it_helps():
    model = named_model(LabelformerForMultiLabelClassification)
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(200, NUM_CLASSES, generator=generator) < 0.15).float()
    probs = torch.where(targets.bool(), torch.full_like(targets, 0.8), torch.full_like(targets, 0.2))
    hidden = torch.rand(200, NUM_CLASSES, generator=generator) < 0.5
    probs[targets.bool() & hidden] = 0.1  # positives the model ranks below every negative ...
    named = targets.bool() & hidden  # ... but their names occur in the text
    tuned = model.tune_label_name_bias(probs, named, targets)
    # logit(0.1) + 1.5 -> 0.33 > 0.2: the smallest bias of the grid that separates them all
    assert tuned["label_name_bias"] == 1.5 and tuned["micro_f1"] > tuned["unbiased_micro_f1"] + 0.1
    assert tuned["micro_f1"] == max(row["micro_f1"] for row in tuned["grid"])
    assert model.config.label_name_bias == tuned["label_name_bias"]
    assert model.config.classifier_threshold == tuned["threshold"]
    assert [row["label_name_bias"] for row in tuned["grid"]] == sorted({0.0, *LABEL_NAME_BIASES})

    misleading = ~targets.bool() & (torch.rand(200, NUM_CLASSES, generator=generator) < 0.3)  # names of wrong labels
    flat = model.tune_label_name_bias(torch.where(targets.bool(), 0.8, 0.2), misleading, targets)
    assert flat["label_name_bias"] == 0.0 and model.config.label_name_bias == 0.0

    model.config.label_name_token_ids = None
    with pytest.raises(ValueError, match="label_name_token_ids"):
        model.tune_label_name_bias(probs, named, targets)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_head_decodes_named_labels_first_under_a_large_bias(num_beams):
    model = named_model(LabelformerForMultiLabelGeneration, seed=2, bias=40.0)
    ids, mask = batch(2)
    named = brute_force_named(ids, NAMES)
    with torch.no_grad():
        predictions = model.predict_batch(ids, mask, num_beams)
    for row, predicted in enumerate(predictions):
        wanted = {LABELS[j] for j in named[row].nonzero().flatten().tolist()}
        assert set(list(predicted)[: len(wanted)]) == wanted
    if num_beams == 1:
        check_fast_greedy_matches_generate(model, ids, mask)  # generate(input_ids=...) adds the same bias


def test_generation_bias_is_decoding_only_and_survives_saving(tmp_path):
    model = named_model(LabelformerForMultiLabelGeneration, seed=3)
    ids, mask = batch(3)
    labels = torch.tensor([[5, 3, 2]] * len(ids))
    model.train()
    before = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    model.set_label_name_bias(3.0)
    assert torch.equal(model(input_ids=ids, attention_mask=mask, labels=labels).loss, before)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = LabelformerForMultiLabelGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.label_name_bias == 3.0 and loaded.config.label_name_token_ids == NAMES
    with torch.no_grad():
        assert loaded.predict_batch(ids, mask, 3) == model.predict_batch(ids, mask, 3)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_ensembles_apply_the_bias_once_and_set_it_on_every_member(num_beams):
    ids, mask = batch(4)
    named = brute_force_named(ids, NAMES)
    generators = LabelformerEnsemble([named_model(LabelformerForMultiLabelGeneration, seed) for seed in (4, 5)])
    generators.set_label_name_bias(40.0)
    assert all(m.config.label_name_bias == 40.0 for m in generators.members)
    with torch.no_grad():
        predictions = generators.predict_batch(ids, mask, num_beams)
    for row, predicted in enumerate(predictions):
        wanted = {LABELS[j] for j in named[row].nonzero().flatten().tolist()}
        assert set(list(predicted)[: len(wanted)]) == wanted
    thresholds = LabelformerEnsemble([named_model(LabelformerForMultiLabelClassification, s) for s in (4, 5)])
    with torch.no_grad():
        mean = thresholds.label_probabilities(ids, mask)
        thresholds.set_label_name_bias(1.5)
        scored = thresholds.predict_batch(ids, mask)
    expected = torch.sigmoid(torch.logit(mean.double()) + 1.5 * named.double())
    for row, predicted in enumerate(scored):
        for label, prob in predicted.items():
            assert prob == pytest.approx(float(expected[row, LABELS.index(label)]), abs=1e-5)


def test_tune_decoding_bias_also_tries_label_name_biases():
    model = named_model(LabelformerForMultiLabelGeneration, seed=6)
    references = [[LABELS[0]], [LABELS[1], LABELS[2]]]
    counts = {label: 10 for label in LABELS}

    def predict(m) -> list[list[str]]:  # right only with label-name bias 1.0 at EOS bias -0.5
        right = m.config.label_name_bias == 1.0 and m.config.eos_logit_bias == -0.5
        return references if right else [[LABELS[3]], [LABELS[1]]]

    tuned = tune_decoding_bias(model, predict, references, counts, set_search_rounds=0)
    assert (tuned["label_name_bias"], tuned["eos_logit_bias"], tuned["micro_f1"]) == (1.0, -0.5, 1.0)
    extra = (len(set(LABEL_NAME_BIASES) - {0.0})) * len(EOS_BIASES)
    assert len(tuned["grid"]) == len(EOS_BIASES) * len(PRIOR_WEIGHTS) + extra
    assert model.config.label_name_bias == 1.0  # the winner stays set

    flat = tune_decoding_bias(model, lambda m: references, references, counts)
    assert flat["label_name_bias"] == 0.0 and model.config.label_name_bias == 0.0  # ties: no bias
    none = tune_decoding_bias(model, predict, references, counts, label_name_biases=())
    assert {row["label_name_bias"] for row in none["grid"]} == {0.0}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"label_name_bias": 1.0}, "label_name_token_ids` is None"),
        ({"label_name_token_ids": NAMES, "label_name_bias": math.nan}, "label_name_bias"),
        ({"label_name_token_ids": NAMES[:-1]}, "one entry per label"),
        ({"label_name_token_ids": NAMES[:-1] + [[[10_000]]]}, r"label_name_token_ids\[7\]"),
        ({"label_name_token_ids": NAMES[:-1] + [[[]]]}, r"label_name_token_ids\[7\]"),
    ],
)
def test_bad_label_name_settings_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        synthetic_config(**overrides)
    model = named_model(LabelformerForMultiLabelClassification)
    with pytest.raises(ValueError, match="label_name"):
        model.set_label_name_bias(overrides.get("label_name_bias", 1.0), overrides.get("label_name_token_ids", [[]]))
    assert model.config.label_name_bias == 0.0 and model.config.label_name_token_ids == NAMES  # left as it was


def test_threshold_ensemble_starts_from_the_members_mean_bias():
    members = [named_model(LabelformerForMultiLabelClassification, seed, bias=b) for seed, b in ((0, 1.0), (1, 2.0))]
    assert LabelformerEnsemble(members).config.label_name_bias == 1.5
    generators = [named_model(LabelformerForMultiLabelGeneration, seed, bias=b) for seed, b in ((0, 1.0), (1, 2.0))]
    assert LabelformerEnsemble(generators).config.label_name_bias == 1.0  # member 0's, like its decoding bias


# ---- the learned label-name term (config.label_name_feature)


def learned_model(head, seed: int = 0, shared: float = 1.0, weight: list[float] | None = None, **overrides):
    model = named_model(head, seed, label_name_feature=True, **overrides)
    with torch.no_grad():
        model.label_name_evidence.shared.fill_(shared)
        if weight is not None:
            model.label_name_evidence.weight.copy_(torch.tensor(weight))
    return model


def twin_without_feature(model):
    """The same weights in a model without the learned term."""
    plain = type(model)(synthetic_config(init_std=0.3, label_name_token_ids=NAMES)).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"label_name_evidence.shared", "label_name_evidence.weight"}
    return plain


WEIGHTS = [0.5, -1.0, 0.0, 2.0, 0.0, 0.0, -0.5, 3.0]  # class_7 has no name: its weight never counts


def test_threshold_head_learns_the_name_term_in_its_logits_and_loss():
    model = learned_model(LabelformerForMultiLabelClassification, shared=1.5, weight=WEIGHTS)
    assert model.label_name_evidence.shared.item() == 1.5
    fresh = named_model(LabelformerForMultiLabelClassification, label_name_feature=True)
    assert fresh.label_name_evidence.shared.item() == 1.0 and not fresh.label_name_evidence.weight.any()
    ids, mask = batch(7)
    named = brute_force_named(ids, NAMES).float()
    with torch.no_grad():
        plain = twin_without_feature(model)(input_ids=ids, attention_mask=mask).logits
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, plain + named * (1.5 + torch.tensor(WEIGHTS)))
    targets = (torch.rand(len(ids), NUM_CLASSES, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=targets).loss
    loss.backward()
    grad = model.label_name_evidence.weight.grad
    assert model.label_name_evidence.shared.grad.abs() > 0
    assert grad[named.sum(0) == 0].abs().max() == 0 and grad[named.sum(0) > 0].abs().min() > 0  # named labels only
    with pytest.raises(ValueError, match="pass `input_ids`"):
        model(inputs_embeds=torch.zeros(2, 5, 64), labels=targets[:2])


def test_generation_head_adds_the_learned_term_once_on_every_path(tmp_path):
    model = learned_model(LabelformerForMultiLabelGeneration, seed=8, shared=2.0, weight=WEIGHTS)
    ids, mask = batch(8)
    learned = torch.nn.functional.pad(brute_force_named(ids, NAMES).float() * (2.0 + torch.tensor(WEIGHTS)), (3, 0))
    labels = torch.tensor([[5, 3, 2]] * len(ids))
    plain = twin_without_feature(model)
    with torch.no_grad():
        torch.testing.assert_close(model.decoder_row_bias(ids), learned)
        logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        want = plain(input_ids=ids, attention_mask=mask, labels=labels).logits + learned[:, None, :]
        torch.testing.assert_close(logits, want)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        expected = torch.nn.functional.cross_entropy(want.reshape(-1, want.shape[-1]), labels.reshape(-1))
        torch.testing.assert_close(loss, expected)
    # greedy fast path == generate(input_ids=...) rescored: generate must not add the term twice
    fast = check_fast_greedy_matches_generate(model, ids, mask)
    model.set_label_name_bias(1.0)  # the decision-time bias adds on top of the learned term
    named = torch.nn.functional.pad(brute_force_named(ids, NAMES).float(), (3, 0))
    torch.testing.assert_close(model.decoder_row_bias(ids), learned + named)
    model.set_label_name_bias(0.0)
    model.save_pretrained(tmp_path)
    loaded = LabelformerForMultiLabelGeneration.from_pretrained(tmp_path).eval()
    assert loaded.label_name_evidence.shared.item() == 2.0
    with torch.no_grad():
        assert loaded.predict_batch(ids, mask) == fast
        assert loaded.predict_batch(ids, mask, 3) == model.predict_batch(ids, mask, 3)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_ensembles_add_each_members_own_learned_term(num_beams):
    ids, mask = batch(9)
    named = brute_force_named(ids, NAMES)
    strong = learned_model(LabelformerForMultiLabelGeneration, seed=9, shared=40.0)
    plain = named_model(LabelformerForMultiLabelGeneration, seed=10)
    with torch.no_grad():
        if num_beams == 1:  # two copies of one model decode as that model
            assert LabelformerEnsemble([strong, strong]).predict_batch(ids, mask) == strong.predict_batch(ids, mask)
        predictions = LabelformerEnsemble([strong, plain]).predict_batch(ids, mask, num_beams)
        biases = LabelformerEnsemble([strong, plain]).member_row_biases(ids)
    assert biases[1] is None and torch.equal(biases[0], strong.decoder_row_bias(ids))
    for row, predicted in enumerate(predictions):  # the strong member's names win the averaged distribution
        wanted = {LABELS[j] for j in named[row].nonzero().flatten().tolist()}
        assert set(list(predicted)[: len(wanted)]) == wanted


def test_threshold_ensemble_averages_members_with_their_learned_terms():
    members = [learned_model(LabelformerForMultiLabelClassification, s, shared=v) for s, v in ((11, 3.0), (12, -1.0))]
    ids, mask = batch(11)
    with torch.no_grad():
        mean = LabelformerEnsemble(members).label_probabilities(ids, mask)
        want = sum(torch.sigmoid(m(input_ids=ids, attention_mask=mask).logits) for m in members) / 2
    torch.testing.assert_close(mean, want)


def test_bad_label_name_feature_settings_are_rejected():
    with pytest.raises(ValueError, match="label_name_feature=True` needs `label_name_token_ids"):
        synthetic_config(label_name_feature=True)
    with pytest.raises(ValueError, match="label_name_feature` must be True or False"):
        synthetic_config(label_name_token_ids=NAMES, label_name_feature="yes")
    from modeling import LabelformerForParallelLabelGeneration

    with pytest.raises(ValueError, match="parallel head does not support `label_name_feature`"):
        LabelformerForParallelLabelGeneration(synthetic_config(label_name_token_ids=NAMES, label_name_feature=True))
