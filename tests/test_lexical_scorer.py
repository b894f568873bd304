"""The lexical label scorer: tf-idf features, the SVM solver, and how both heads (and ensembles) use it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modeling import (
    LabelformerConfig,
    LabelformerEnsemble,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
    LabelformerForParallelLabelGeneration,
    MultiLabelCollator,
    fit_lexical_scorer,
    out_of_fold_lexical_margins,
    train_tokenizer,
    tune_decoding_bias,
)
from modeling.configuration_labelformer import NUM_SPECIAL_DECODER_TOKENS
from modeling.lexical_labelformer import LEXICAL_LOGIT_WEIGHTS, _preconditioned_cg, squared_hinge_svm

from .synthetic import check_fast_greedy_matches_generate
from .textdata import KEYWORDS, make_texts

HEADS = (LabelformerForMultiLabelGeneration, LabelformerForMultiLabelClassification)


@pytest.fixture(scope="module")
def corpus():
    """A tokenizer and train/test rows of the tiny text task (keywords decide the labels)."""
    train = make_texts(240, 0)
    tokenizer = train_tokenizer([r["text"] for r in train], vocab_size=80, model_max_length=32)
    return tokenizer, train, make_texts(40, 1)


def lexical_model(head, tokenizer, rows=None, weight: float = 0.0, seed: int = 0, **overrides):
    """A small untrained head with a lexical scorer, fitted on ``rows`` when given."""
    torch.manual_seed(seed)
    settings = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0)  # fmt: skip
    config = LabelformerConfig.from_labels(
        sorted(KEYWORDS), vocab_size=len(tokenizer), **{**settings, "lexical_scorer": True, **overrides}
    )
    model = head(config).eval()
    if rows is not None:
        fit_lexical_scorer(model, tokenizer, [r["text"] for r in rows], [r["labels"] for r in rows], max_length=32)
    if weight:
        model.set_lexical_logit_weight(weight)
    return model


def encode(tokenizer, rows):
    batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def margin_decisions(margins: torch.Tensor) -> list[set[str]]:
    """The SVM's own label sets: positive margins, or the best one when none is positive (min_labels 1)."""
    labels = sorted(KEYWORDS)
    sets = []
    for row in margins:
        chosen = {labels[i] for i in (row > 0).nonzero().flatten().tolist()}
        sets.append(chosen or {labels[int(row.argmax())]})
    return sets


def test_features_are_scikit_learns_tfidf_over_token_ids(corpus):
    sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
    tokenizer, train, test = corpus
    model = lexical_model(LabelformerForMultiLabelClassification, tokenizer, train)
    special = set(tokenizer.all_special_ids)

    def words(rows):
        ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=32)["input_ids"]
        return [[str(t) for t in row if t not in special] for row in ids]

    vectorizer = sklearn_text.TfidfVectorizer(sublinear_tf=True, analyzer=lambda tokens: tokens)
    vectorizer.fit(words(train))
    unseen = [{"text": "wheat zebra quokka wheat of the", "labels": ["grain"]}]  # word pieces no training text holds
    for rows in (train[:50], test, unseen):
        expected = torch.zeros(len(rows), len(tokenizer))
        dense = torch.tensor(vectorizer.transform(words(rows)).toarray(), dtype=torch.float32)
        for column, token in enumerate(vectorizer.get_feature_names_out()):
            expected[:, int(token)] = dense[:, column]
        ids, _ = encode(tokenizer, rows)  # padded, with special tokens: both must count for nothing
        torch.testing.assert_close(model.lexical_label_scorer.features(ids), expected, rtol=1e-5, atol=1e-6)


def test_solver_reaches_the_optimum_and_matches_liblinear():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(120, 30, generator=generator) * (torch.rand(120, 30, generator=generator) < 0.2)
    y = (x[:, :4] @ torch.randn(4, 3, generator=generator) + 0.1 * torch.randn(120, 3, generator=generator)) > 0
    weight, bias, stats = squared_hinge_svm(x.to_sparse(), y, c=2.0)
    # first-order optimality of the primal: the gradient vanishes (it is solved per label, jointly)
    params = torch.cat([weight.T, bias[None]]).requires_grad_(True)
    margins = x @ params[:-1] + params[-1]
    slack = (1 - (y.float() * 2 - 1) * margins).clamp(min=0)
    (0.5 * params.square().sum() + 2.0 * slack.square().sum()).backward()
    assert params.grad.abs().max() < 1e-3 and stats["gradient_norm"] < 1e-3
    svm = pytest.importorskip("sklearn.svm")
    for label in range(3):
        reference = svm.LinearSVC(C=2.0, max_iter=100_000, tol=1e-8).fit(x.numpy(), y[:, label].numpy())
        torch.testing.assert_close(weight[label], torch.tensor(reference.coef_[0], dtype=torch.float32), atol=2e-3,
                                   rtol=0)  # fmt: skip
        assert abs(float(bias[label]) - float(reference.intercept_[0])) < 2e-3
    with pytest.raises(ValueError, match="C must be a positive number"):
        squared_hinge_svm(x.to_sparse(), y, c=0.0)


def test_batched_cg_solves_each_column_to_its_own_tolerance():
    """Each column is its own SPD system; columns stop at their own target and are packed away."""
    generator = torch.Generator().manual_seed(0)
    f, k = 40, 5
    factors = torch.randn(k, f, f, generator=generator, dtype=torch.float64)
    scales = torch.tensor([1.0, 10.0, 100.0, 1.0, 0.1], dtype=torch.float64)  # different conditioning
    systems = torch.eye(f, dtype=torch.float64) + scales[:, None, None] * factors @ factors.transpose(1, 2) / f
    rhs = torch.randn(f, k, generator=generator, dtype=torch.float64)
    targets = torch.tensor([1e-8, 1e-8, 1e-8, 1e-2, 1e-8], dtype=torch.float64) * rhs.norm(dim=0)
    calls = []

    def product(p, cols):
        calls.append(cols.clone())
        return torch.einsum("mij,jm->im", systems[cols], p)

    diagonal = torch.diagonal(systems, dim1=1, dim2=2).T  # [f, k]
    solution, steps = _preconditioned_cg(product, rhs, diagonal, targets)
    exact = torch.linalg.solve(systems, rhs.T.unsqueeze(-1)).squeeze(-1).T
    residuals = (rhs - torch.einsum("mij,jm->im", systems, solution)).norm(dim=0)
    assert (residuals <= targets * 1.0001).all()
    torch.testing.assert_close(solution[:, [0, 1, 2, 4]], exact[:, [0, 1, 2, 4]], rtol=1e-6, atol=1e-7)
    assert steps == sum(len(cols) for cols in calls)
    assert 3 not in calls[-1].tolist()  # the loose column left early
    assert len(calls[-1]) < k


@pytest.mark.parametrize("head", HEADS)
def test_the_fitted_scorer_alone_solves_the_task_and_survives_saving(tmp_path, corpus, head):
    tokenizer, train, test = corpus
    model = lexical_model(head, tokenizer, train, weight=1000.0)  # an untrained network: the SVM decides
    texts = [r["text"] for r in test]
    predictions = model.predict_labels(texts, tokenizer=tokenizer)
    ids, _ = encode(tokenizer, test)
    assert [set(p) for p in predictions] == margin_decisions(model.lexical_margins(ids))
    assert sum(set(p) == set(r["labels"]) for p, r in zip(predictions, test)) >= 38
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved["lexical_label_scorer.idf"].count_nonzero() > 0
    loaded = head.from_pretrained(tmp_path).eval()
    assert loaded.config.lexical_scorer and loaded.config.lexical_logit_weight == 1000.0
    for name, value in model.lexical_label_scorer.state_dict().items():
        torch.testing.assert_close(loaded.lexical_label_scorer.state_dict()[name], value, rtol=0, atol=0)
    assert loaded.predict_labels(texts) == predictions
    half = head.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert sum(p == q for p, q in zip(half.predict_labels(texts), predictions)) >= 38


def test_generation_adds_the_weighted_margins_once_on_every_path(corpus):
    tokenizer, train, test = corpus
    model = lexical_model(LabelformerForMultiLabelGeneration, tokenizer, train, weight=1.5)
    ids, mask = encode(tokenizer, test)
    margins = model.lexical_margins(ids)
    expected = torch.nn.functional.pad(1.5 * margins, (NUM_SPECIAL_DECODER_TOKENS, 0))
    torch.testing.assert_close(model.decoder_row_bias(ids), expected)
    check_fast_greedy_matches_generate(model, ids, mask)  # fast greedy == generate() + rescoring
    model.set_lexical_logit_weight(0.0)
    assert model.decoder_row_bias(ids) is None
    # an ensemble of one adds it once too, greedy and with beams
    model.set_lexical_logit_weight(1.5)
    ensemble = LabelformerEnsemble([model])
    for beams in (1, 2):
        assert ensemble.predict_batch(ids, mask, beams) == model.predict_batch(ids, mask, beams)


def test_ensembles_set_the_weight_everywhere_and_threshold_ensembles_start_from_the_mean(corpus):
    tokenizer, train, _ = corpus
    members = [lexical_model(LabelformerForMultiLabelGeneration, tokenizer, train, seed=s) for s in (0, 1)]
    ensemble = LabelformerEnsemble(members)
    ensemble.set_lexical_logit_weight(2.0)
    assert [m.config.lexical_logit_weight for m in members] == [2.0, 2.0] == [ensemble.config.lexical_logit_weight] * 2
    thresholds = [lexical_model(LabelformerForMultiLabelClassification, tokenizer, train, weight=w) for w in (1, 3)]
    assert LabelformerEnsemble(thresholds).config.lexical_logit_weight == 2.0


def test_ensembles_check_their_members_scorers(corpus, caplog):
    """Member 0's scorer serves all: a member without one is refused, a differently fitted one is flagged."""
    tokenizer, train, _ = corpus
    head = LabelformerForMultiLabelClassification
    same = [lexical_model(head, tokenizer, train, seed=s) for s in (0, 1)]  # same texts: same scorer
    with caplog.at_level("WARNING"):
        LabelformerEnsemble(same)
    assert "another lexical scorer" not in caplog.text
    other = lexical_model(head, tokenizer, train[: len(train) // 2], seed=2)
    with caplog.at_level("WARNING"):
        LabelformerEnsemble([same[0], other])
    assert "Member 1 holds another lexical scorer" in caplog.text
    plain = lexical_model(head, tokenizer, seed=3, lexical_scorer=False)
    with pytest.raises(ValueError, match="Member 1 has no lexical scorer but member 0 has one"):
        LabelformerEnsemble([same[0], plain])
    with pytest.raises(ValueError, match="Member 1 has a lexical scorer but member 0 has none"):
        LabelformerEnsemble([plain, same[0]])


def test_threshold_tuning_fits_the_weight_with_the_threshold(corpus):
    tokenizer, train, test = corpus
    model = lexical_model(LabelformerForMultiLabelClassification, tokenizer, train)
    rows = train[:120]
    ids, mask = encode(tokenizer, rows)
    targets = torch.tensor([[label in r["labels"] for label in sorted(KEYWORDS)] for r in rows], dtype=torch.float)
    probs = model.label_probabilities(ids, mask)  # an untrained network: near 0.5 everywhere
    margins = model.lexical_margins(ids)
    tuned = model.tune_decision_rule(probs, targets, None, margins)
    assert tuned["lexical_logit_weight"] > 0 and tuned["micro_f1"] == 1.0
    assert model.config.lexical_logit_weight == tuned["lexical_logit_weight"]
    assert model.config.classifier_threshold == tuned["threshold"]
    decided = model.decide(model.decision_probabilities(probs, None, margins))
    assert torch.equal(decided, targets.bool())
    # margins that carry no information are left out (weight 0 wins ties)
    model.set_lexical_logit_weight(0.0)
    confident = targets * 0.98 + 0.01
    assert model.tune_decision_rule(confident, targets, None, torch.randn_like(margins))["lexical_logit_weight"] == 0


def test_tune_decoding_bias_also_tries_lexical_weights(corpus):
    tokenizer, train, test = corpus
    model = lexical_model(LabelformerForMultiLabelGeneration, tokenizer, train)
    references = [r["labels"] for r in test]

    def predict(m) -> list[list[str]]:  # right only with the lexical weight 1.5 at EOS bias 0.5
        ok = m.config.lexical_logit_weight == 1.5 and m.config.eos_logit_bias == 0.5
        return references if ok else [["money"]] * len(references)

    tuned = tune_decoding_bias(model, predict, references, {}, prior_weights=())
    assert (tuned["lexical_logit_weight"], tuned["eos_logit_bias"], tuned["micro_f1"]) == (1.5, 0.5, 1.0)
    assert model.config.lexical_logit_weight == 1.5
    assert {row["lexical_logit_weight"] for row in tuned["grid"]} == {0.0, *LEXICAL_LOGIT_WEIGHTS}
    tuned = tune_decoding_bias(model, predict, references, {}, prior_weights=(), lexical_weights=())
    assert tuned["lexical_logit_weight"] == 0.0 and model.config.lexical_logit_weight == 0.0


def test_tune_decoding_bias_searches_a_stacked_model_at_its_training_weight(corpus):
    tokenizer, train, test = corpus
    model = lexical_model(LabelformerForMultiLabelGeneration, tokenizer, train, lexical_training_weight=5.0)
    references = [r["labels"] for r in test]

    def predict(m) -> list[list[str]]:  # the stacked network is right only beside its margins, with the prior
        ok = m.config.lexical_logit_weight == 5.0 and m.config.label_logit_bias is not None
        return references if ok else [["money"]] * len(references)

    tuned = tune_decoding_bias(model, predict, references, {}, prior_weights=(0.2,))
    assert (tuned["lexical_logit_weight"], tuned["prior_weight"], tuned["micro_f1"]) == (5.0, 0.2, 1.0)
    from modeling.evaluation_labelformer import EOS_BIASES

    prior_stage = tuned["grid"][: 1 + len(EOS_BIASES)]  # no bias, then every EOS bias with the prior
    assert [row["lexical_logit_weight"] for row in prior_stage] == [5.0] * len(prior_stage)
    assert [row["prior_weight"] for row in prior_stage] == [0.0] + [0.2] * len(EOS_BIASES)
    assert {row["lexical_logit_weight"] for row in tuned["grid"]} == {0.0, 5.0, *LEXICAL_LOGIT_WEIGHTS}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lexical_scorer": "yes"}, "`lexical_scorer` must be True or False"),
        ({"lexical_scorer": True, "lexical_logit_weight": -1.0}, "must be a finite number >= 0"),
        ({"lexical_scorer": True, "lexical_logit_weight": float("nan")}, "must be a finite number >= 0"),
        ({"lexical_logit_weight": 1.0}, "has no lexical scorer"),
        ({"lexical_scorer": True, "lexical_training_weight": -2.0}, "`lexical_training_weight` must be a finite"),
        ({"lexical_training_weight": 4.0}, "`lexical_training_weight` is set but the model has no lexical scorer"),
    ],
)
def test_bad_lexical_settings_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        LabelformerConfig.from_labels(sorted(KEYWORDS), vocab_size=50, **overrides)


def test_misuse_gives_clear_errors(corpus):
    tokenizer, train, test = corpus
    unfitted = lexical_model(LabelformerForMultiLabelClassification, tokenizer, weight=1.0)
    with pytest.raises(ValueError, match="not fitted: call fit_lexical_scorer"):
        unfitted.predict_labels([test[0]["text"]], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="Label set 1 holds labels the model does not know"):
        fit_lexical_scorer(unfitted, tokenizer, ["wheat", "oil"], [["grain"], ["oil-price"]])
    with pytest.raises(ValueError, match="2 texts but 1 label sets"):
        fit_lexical_scorer(unfitted, tokenizer, ["wheat", "oil"], [["grain"]])
    fitted = lexical_model(LabelformerForMultiLabelGeneration, tokenizer, train, weight=1.0)
    with pytest.raises(ValueError, match="outside the lexical scorer's vocabulary"):
        fitted.lexical_margins(torch.tensor([[1, len(tokenizer) + 5]]))
    ids, mask = encode(tokenizer, test[:2])
    with pytest.raises(ValueError, match="pass `input_ids`"):
        fitted.decoder_row_bias(None)
    plain = LabelformerForMultiLabelClassification(LabelformerConfig.from_labels(sorted(KEYWORDS), vocab_size=80))
    with pytest.raises(ValueError, match="has no lexical scorer: set lexical_scorer=True"):
        plain.set_lexical_logit_weight(1.0)
    assert plain.config.lexical_logit_weight == 0.0  # a refused setting leaves the old one
    with pytest.raises(ValueError, match="no lexical scorer: build its config with lexical_scorer=True"):
        fit_lexical_scorer(plain, tokenizer, ["wheat"], [["grain"]])
    config = LabelformerConfig.from_labels(sorted(KEYWORDS), vocab_size=80, lexical_scorer=True)
    with pytest.raises(ValueError, match="parallel head does not support `lexical_scorer`"):
        LabelformerForParallelLabelGeneration(config)
    assert json.loads(config.to_json_string())["lexical_scorer"] is True


def test_out_of_fold_margins_come_from_scorers_that_never_saw_the_row(corpus):
    tokenizer, train, _ = corpus
    texts, label_sets = [r["text"] for r in train], [r["labels"] for r in train]
    model = lexical_model(LabelformerForMultiLabelGeneration, tokenizer, train)
    fitted = model.lexical_label_scorer.weight.clone()
    margins = out_of_fold_lexical_margins(model, tokenizer, texts, label_sets, max_length=32, folds=4, seed=3)
    assert margins.shape == (len(train), len(KEYWORDS)) and torch.isfinite(margins).all()
    assert torch.equal(model.lexical_label_scorer.weight, fitted)  # the model's own scorer is left alone
    # Rebuild one fold by hand: the same random split, a scorer fit on the other three parts.
    held = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[1::4].tolist()
    rest = [r for i, r in enumerate(train) if i not in set(held)]
    other = lexical_model(LabelformerForMultiLabelGeneration, tokenizer, rest)
    ids, _ = encode(tokenizer, [train[i] for i in held])
    torch.testing.assert_close(margins[held], other.lexical_margins(ids), atol=1e-5, rtol=1e-5)
    # Held-out margins are less sure of the gold labels than the margins of the scorer fit on every row.
    ids, _ = encode(tokenizer, train)
    inside = model.lexical_margins(ids)
    gold = torch.tensor([[label in r["labels"] for label in sorted(KEYWORDS)] for r in train])
    assert margins[gold].mean() < inside[gold].mean() and margins[~gold].mean() > inside[~gold].mean()
    assert torch.equal(margins, out_of_fold_lexical_margins(model, tokenizer, texts, label_sets, max_length=32,
                                                            folds=4, seed=3))  # fmt: skip
    with pytest.raises(ValueError, match="`folds` must be an integer >= 2"):
        out_of_fold_lexical_margins(model, tokenizer, texts, label_sets, folds=1)
    with pytest.raises(ValueError, match="at least as many texts as folds"):
        out_of_fold_lexical_margins(model, tokenizer, texts[:3], label_sets[:3], folds=5)


@pytest.mark.parametrize("head", HEADS)
def test_stacked_margins_enter_the_training_logits_and_loss(corpus, head):
    tokenizer, train, _ = corpus
    model = lexical_model(head, tokenizer, train, lexical_training_weight=2.5)
    generation = head is LabelformerForMultiLabelGeneration
    collator = MultiLabelCollator(tokenizer, model.config, 32, head="generation" if generation else "classification")
    rows = [{**r, "row": i} for i, r in enumerate(train[:6])]
    plain = collator(rows)
    assert "lexical_margins" not in plain
    stacked_margins = torch.randn(len(train), len(KEYWORDS))
    collator.lexical_margins = stacked_margins
    batch = collator(rows[::-1])  # rows pick their own margins, whatever the batch order
    torch.testing.assert_close(batch["lexical_margins"], stacked_margins[:6].flip(0))
    without = model(**{k: v for k, v in batch.items() if k != "lexical_margins"})
    with_margins = model(**batch)
    added = with_margins.logits - without.logits
    expected = 2.5 * batch["lexical_margins"]
    if generation:  # every decoder position, labels only
        specials, added = added[..., :NUM_SPECIAL_DECODER_TOKENS], added[..., NUM_SPECIAL_DECODER_TOKENS:]
        assert not specials.any()
        expected = expected[:, None, :].expand_as(added)
    torch.testing.assert_close(added, expected, atol=1e-5, rtol=1e-5)
    assert not torch.isclose(with_margins.loss, without.loss)
    with_margins.loss.backward()  # the margins are inputs, not parameters: the network's weights get gradients
    assert model.lexical_label_scorer.weight.grad is None
    with pytest.raises(ValueError, match="`lexical_margins` must be \\[batch, num_labels=3\\]"):
        model(**{**batch, "lexical_margins": batch["lexical_margins"][:, :2]})
    unstacked = lexical_model(head, tokenizer, train)
    with pytest.raises(ValueError, match="lexical_training_weight is 0"):
        unstacked(**batch)
    with pytest.raises(ValueError, match="every row needs its `row` index"):
        collator(train[:2])
