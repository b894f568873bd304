"""Set search: the generation head refines decoded label sets by local search on the whole set's score."""

from __future__ import annotations

import math

import pytest
import torch

from modeling import LabelformerConfig, LabelformerEnsemble, LabelformerForMultiLabelGeneration
from modeling.evaluation_labelformer import EOS_BIASES, PRIOR_WEIGHTS, tune_decoding_bias
from modeling.set_search_labelformer import (
    SET_SEARCH_LABEL_BIASES,
    decoded_sets,
    label_order_key,
    label_sequences,
    local_search,
    mean_sequence_scores,
    order_groups,
    search_label_sets,
    set_scores,
)

from .synthetic import LABELS, NUM_CLASSES, synthetic_config
from .test_decoding_bias import batch, tiny_model


def table_score(table: dict[tuple[int, ...], float], calls: list | None = None):
    """A `local_search` scorer that looks sets up in ``table`` (missing sets: very unlikely)."""

    def score(sets, rows):
        if calls is not None:
            calls.append(list(zip(rows, sets)))
        return [table.get(s, -100.0) for s in sets]

    return score


def test_local_search_climbs_one_label_at_a_time_to_the_best_neighbour():
    # Row 0 starts at {2}: adding 0 helps, then adding 1 helps more; dropping never does.
    table = {(2,): -3.0, (0, 2): -2.0, (0, 1, 2): -1.0, (1, 2): -2.5, (0,): -4.0}
    no_evidence = torch.zeros(1, 4)
    ranking = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    args = dict(min_labels=1, max_labels=3)
    assert local_search([[2]], table_score(table), no_evidence, ranking, 1, 4, **args) == [(0, 2)]
    calls: list = []
    assert local_search([[2]], table_score(table, calls), no_evidence, ranking, 5, 4, **args) == [(0, 1, 2)]
    seen = [s for call in calls for _, s in call]
    assert len(seen) == len(set(seen)), "a set was scored twice"
    assert len(calls) == 3  # two climbing rounds and one that finds nothing better
    # Only the `candidates` best-ranked labels are tried: with 1 candidate only label 0 can be added.
    assert local_search([[2]], table_score(table), no_evidence, ranking, 5, 1, **args) == [(0, 2)]
    # max_labels 2 stops the climb; the evidence term decides between neighbours of equal score.
    assert local_search([[2]], table_score(table), no_evidence, ranking, 5, 4, 1, 2) == [(0, 2)]
    evidence = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert local_search([[2]], table_score(table), evidence, ranking, 1, 4, 1, 2) == [(1, 2)]


def test_local_search_drops_labels_keeps_ties_and_respects_min_labels():
    table = {(0, 1): -2.0, (0,): -1.0, (1,): -1.0}
    ranking = torch.zeros(2, 3)
    found = local_search([[1, 0], [0]], table_score(table), torch.zeros(2, 3), ranking, 3, 3, 1, 3)
    assert found == [(1,), (0,)]  # row 0: the first of two equally good drops (of label 0); row 1: the best
    assert local_search([[0]], table_score({(0,): -1.0}), torch.zeros(1, 3), ranking[:1], 3, 3, 1, 3) == [(0,)]
    # min_labels 2 forbids the drop; an empty set is allowed with min_labels 0.
    assert local_search([[0, 1]], table_score(table), torch.zeros(1, 3), ranking[:1], 3, 3, 2, 3) == [(0, 1)]
    empty = {(): 0.0, (0,): -1.0}
    assert local_search([[0]], table_score(empty), torch.zeros(1, 3), ranking[:1], 3, 3, 0, 3) == [()]
    # Zero rounds: the start, in writing order.
    assert local_search([[1, 0]], table_score(table), torch.zeros(1, 3), ranking[:1], 0, 3, 1, 3) == [(0, 1)]


def test_label_order_key_follows_the_label_order():
    config = synthetic_config(label_order="alphabetical")
    config.id2label = {0: "zinc", 1: "acq", 2: "grain"}
    assert label_order_key(config)([0, 1, 2]) == (1, 2, 0)
    assert label_order_key(synthetic_config())([5, 1, 3]) == (1, 3, 5)


# Names whose alphabetical order is not the id order: alphabetical writes 3, 6, 5, 0, 1, 7, 4, 2.
NAMES = ["grain", "sugar", "zinc", "acq", "wheat", "earn", "corn", "tin"]


def named_tiny_model(seed: int, label_order: str = "frequency", **overrides) -> LabelformerForMultiLabelGeneration:
    """`tiny_model` with the labels ``NAMES`` (so alphabetical and id order differ)."""
    model = tiny_model(seed, label_order=label_order, **overrides)
    model.config.id2label = dict(enumerate(NAMES))
    model.config.label2id = {name: i for i, name in enumerate(NAMES)}
    return model


def test_order_groups_put_members_that_write_alike_together():
    orders = ["frequency", "alphabetical", "random", "frequency", "alphabetical"]
    models = [named_tiny_model(i, order) for i, order in enumerate(orders)]
    assert order_groups(models) == [[0, 2, 3], [1, 4]]  # random and frequency both write by id
    assert order_groups(models[1:]) == [[0, 3], [1, 2]]  # member 0's group comes first
    assert label_order_key(models[1].config)(range(8)) == (3, 6, 5, 0, 1, 7, 4, 2)


def test_set_scores_score_each_set_in_each_members_own_order():
    models = [named_tiny_model(11), named_tiny_model(12, "alphabetical"), named_tiny_model(13)]
    ids, mask = batch(11, rows=3)
    sets = [(1, 2), (0, 3, 4), (5,), (2, 6)]
    rows = torch.tensor([0, 1, 2, 2])
    biases = [None, torch.randn(3, models[0].config.decoder_vocab_size), None]
    with torch.no_grad():
        states = [m.model.encoder(ids, mask).last_hidden_state for m in models]
        total, tokens, probs = set_scores(models, sets, states, mask, rows, biases)
        by_id = label_sequences(sets, 0, ids.device)
        by_name = label_sequences([label_order_key(models[1].config)(s) for s in sets], 0, ids.device)
        frequency, _ = mean_sequence_scores([models[0], models[2]], by_id, [states[0], states[2]], mask, rows,
                                            [None, None])  # fmt: skip
        alphabetical, _ = mean_sequence_scores(models[1:2], by_name, states[1:2], mask, rows, biases[1:2])
        torch.testing.assert_close(total, 2 / 3 * frequency + 1 / 3 * alphabetical)
        assert torch.equal(tokens, by_id)  # written in member 0's order
        # Per token the groups' step probabilities combine like the totals: their product is exp(total).
        written = probs > 0
        assert written.sum(1).tolist() == [len(s) + 1 for s in sets]
        torch.testing.assert_close(torch.where(written, probs.log(), torch.zeros_like(probs)).sum(1), total)
        # One order: exactly the members' mean sequence scores.
        alone, _, alone_probs = set_scores(models[:1], sets, states[:1], mask, rows, biases[:1])
        expected, expected_probs = mean_sequence_scores(models[:1], by_id, states[:1], mask, rows, biases[:1])
        assert torch.equal(alone, expected) and torch.equal(alone_probs, expected_probs)


def test_a_mixed_order_ensemble_keeps_the_better_groups_answer_and_searches_sets():
    frequency, alphabetical = named_tiny_model(14, max_labels=3), named_tiny_model(15, "alphabetical", max_labels=3)
    ensemble = LabelformerEnsemble([frequency, alphabetical])
    ids, mask = batch(14)
    rows = torch.arange(len(ids))
    with torch.no_grad():
        states = [m.model.encoder(ids, mask).last_hidden_state for m in ensemble.members]
        answers = [decoded_sets(m.greedy_labels(ids, mask)[0]) for m in ensemble.members]
        by_id = label_order_key(frequency.config)
        scores = [set_scores(ensemble.members, [by_id(s) for s in sets], states, mask, rows, [None, None])[0]
                  for sets in answers]  # fmt: skip
        # The ensemble's sequence scores go through the same set scores when orders are mixed.
        written = label_sequences([by_id(s) for s in answers[1]], 0, ids.device)
        torch.testing.assert_close(ensemble.sequence_scores(written, states, mask, rows)[0], scores[1])
        predicted = ensemble.predict_batch(ids, mask)
        for row, labels in enumerate(predicted):
            better = 0 if scores[0][row] >= scores[1][row] else 1
            assert [frequency.config.label2id[name] for name in labels] == sorted(answers[better][row])
        assert any(sorted(a) != sorted(b) for a, b in zip(*answers)), "the two orders never disagreed"
        ensemble.configure_set_search(rounds=3, label_bias=40.0)
        assert [len(p) for p in ensemble.predict_batch(ids, mask)] == [3] * len(ids)
        ensemble.configure_set_search(rounds=3, label_bias=-40.0)
        assert [len(p) for p in ensemble.predict_batch(ids, mask, num_beams=2)] == [1] * len(ids)


def set_score(model, ids, mask, row: int, labels: tuple[int, ...], gains: torch.Tensor) -> float:
    """F(S) computed directly: the model's sequence log-probability plus the per-label gains."""
    states = model.model.encoder(ids[row : row + 1], mask[row : row + 1]).last_hidden_state
    sequence = torch.tensor([[label + 3 for label in labels] + [2]])
    log_prob, _ = mean_sequence_scores([model], sequence, [states], mask[row : row + 1], torch.tensor([0]), [None])
    return log_prob.item() + sum(gains[row, label].item() for label in labels)


@pytest.mark.parametrize("seed", range(2))
def test_the_chosen_set_has_no_better_one_label_neighbour(seed):
    model = tiny_model(seed, max_labels=3)
    model.configure_set_search(rounds=10, label_bias=0.7)
    model.config.set_search_candidates = NUM_CLASSES  # every label is a candidate
    ids, mask = batch(seed)
    evidence = torch.zeros(len(ids), model.config.decoder_vocab_size)
    evidence[:, 3:] = torch.randn(len(ids), NUM_CLASSES, generator=torch.Generator().manual_seed(seed)) * 2
    with torch.no_grad():
        tokens, _ = model.greedy_labels(ids, mask)
        states = model.model.encoder(ids, mask).last_hidden_state
        chosen, probs = search_label_sets([model], model.config, tokens, [states], mask, [None], evidence)
        gains = evidence[:, 3:] + 0.7
        changed = 0
        for row in range(len(ids)):
            labels = tuple(t - 3 for t in chosen[row].tolist() if t >= 3)
            assert list(labels) == sorted(labels) and 1 <= len(labels) <= 3
            start = tuple(sorted(t - 3 for t in tokens[row].tolist() if t >= 3))
            changed += labels != start
            best = set_score(model, ids, mask, row, labels, gains)
            assert best >= set_score(model, ids, mask, row, start, gains) - 1e-5
            addable = [j for j in range(NUM_CLASSES) if j not in labels] if len(labels) < 3 else []
            neighbours = [tuple(sorted({*labels, j})) for j in addable]
            neighbours += [tuple(x for x in labels if x != j) for j in labels if len(labels) > 1]
            for other in neighbours:
                assert set_score(model, ids, mask, row, other, gains) <= best + 1e-5, (labels, other)
        assert changed, "the search never moved from the greedy sets"
        # The reported scores are the step probabilities with the evidence added, as decoding reports them.
        expected = model.label_scores(torch.cat([torch.ones_like(chosen[:, :1]), chosen], 1),
                                      model.model.encoder(ids, mask), mask, evidence)  # fmt: skip
        ends = chosen < 3
        after_eos = (ends.long().cumsum(1) - ends.long()) > 0
        torch.testing.assert_close(probs, expected.masked_fill(after_eos, 0.0))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_predict_batch_uses_set_search_and_a_large_reward_fills_the_sets(num_beams):
    model = tiny_model(3, max_labels=4)
    ids, mask = batch(3)
    with torch.no_grad():
        plain = model.predict_batch(ids, mask, num_beams)
        model.configure_set_search(rounds=5, label_bias=50.0)
        assert [len(p) for p in model.predict_batch(ids, mask, num_beams)] == [4] * len(ids)
        model.configure_set_search(rounds=5, label_bias=-50.0)
        assert [len(p) for p in model.predict_batch(ids, mask, num_beams)] == [1] * len(ids)
        model.configure_set_search(rounds=0, label_bias=-50.0)  # off: the reward does nothing
        assert model.predict_batch(ids, mask, num_beams) == plain


def test_ensemble_set_search_matches_a_single_member_and_sets_every_member():
    model = tiny_model(5, max_labels=3)
    ensemble = LabelformerEnsemble([model])
    ensemble.configure_set_search(rounds=3, label_bias=1.0)
    assert model.config.set_search_rounds == 3 and ensemble.config.set_search_label_bias == 1.0
    ids, mask = batch(5)
    with torch.no_grad():
        together = ensemble.predict_batch(ids, mask)
        alone = model.predict_batch(ids, mask)
    assert [list(p) for p in together] == [list(p) for p in alone]
    for a, b in zip(together, alone):
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)
    pair = LabelformerEnsemble([tiny_model(6, max_labels=3), tiny_model(7, max_labels=3)])
    pair.configure_set_search(rounds=3, label_bias=40.0)
    assert [len(p) for p in pair.predict_batch(ids, mask)] == [3] * len(ids)


def test_tuning_tries_set_search_last_and_keeps_it_only_when_validation_prefers_it():
    model = tiny_model(8)
    references = [[LABELS[0]], [LABELS[1], LABELS[2]]]
    counts = {label: 10 * (i + 1) for i, label in enumerate(LABELS)}

    def predict(m) -> list[list[str]]:  # right only with set search at reward 1.5
        right = m.config.set_search_rounds == 2 and m.config.set_search_label_bias == 1.5
        return references if right else [[LABELS[0]], [LABELS[1]]]

    tuned = tune_decoding_bias(model, predict, references, counts, set_search_rounds=2)
    assert (tuned["set_search_rounds"], tuned["set_search_label_bias"], tuned["micro_f1"]) == (2, 1.5, 1.0)
    assert (model.config.set_search_rounds, model.config.set_search_label_bias) == (2, 1.5)  # stays set
    steps = len(EOS_BIASES) * len(PRIOR_WEIGHTS)
    assert len(tuned["grid"]) == steps + len(SET_SEARCH_LABEL_BIASES)
    assert all(row["set_search_rounds"] == 0 for row in tuned["grid"][:steps])

    flat = tune_decoding_bias(model, lambda m: [[LABELS[0]], [LABELS[1]]], references, counts, set_search_rounds=2)
    assert (flat["set_search_rounds"], model.config.set_search_rounds) == (0, 0)  # ties: off
    never = tune_decoding_bias(model, predict, references, counts, set_search_rounds=0)
    assert len(never["grid"]) == steps and never["set_search_rounds"] == 0


def test_set_search_settings_are_saved_and_loaded(tmp_path):
    model = tiny_model(9)
    model.configure_set_search(rounds=4, label_bias=-0.5)
    model.save_pretrained(tmp_path)
    loaded = LabelformerForMultiLabelGeneration.from_pretrained(tmp_path)
    assert (loaded.config.set_search_rounds, loaded.config.set_search_label_bias) == (4, -0.5)
    ids, mask = batch(9)
    with torch.no_grad():
        assert loaded.eval().predict_batch(ids, mask) == model.predict_batch(ids, mask)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"set_search_rounds": -1}, "set_search_rounds"),
        ({"set_search_rounds": 1.5}, "set_search_rounds"),
        ({"set_search_rounds": True}, "set_search_rounds"),
        ({"set_search_candidates": 0}, "set_search_candidates"),
        ({"set_search_label_bias": math.nan}, "set_search_label_bias"),
        ({"set_search_label_bias": "1"}, "set_search_label_bias"),
    ],
)
def test_bad_set_search_settings_are_rejected(overrides, field):
    with pytest.raises(ValueError, match=field):
        LabelformerConfig.from_labels(LABELS, **overrides)
    model = tiny_model(10)
    if "set_search_candidates" not in overrides:
        with pytest.raises(ValueError, match=field):
            model.configure_set_search(overrides.get("set_search_rounds", 1), overrides.get("set_search_label_bias", 0))
        assert (model.config.set_search_rounds, model.config.set_search_label_bias) == (0, 0.0)  # left as it was
