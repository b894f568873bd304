"""The optional lexical part: tf-idf features, the LinearSVC fit, saving with the model, and how the heads add it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modeling import (
    LabelformerConfig,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
    LexicalLabelScorer,
    fit_lexical_scorer,
    train_tokenizer,
)
from modeling.configuration_labelformer import NUM_SPECIAL_DECODER_TOKENS

from .textdata import KEYWORDS, make_texts

HEADS = (LabelformerForMultiLabelGeneration, LabelformerForMultiLabelClassification)
LABEL_NAMES = sorted(KEYWORDS)
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def corpus():
    """A tokenizer and train/test rows of the tiny text task (keywords decide the labels)."""
    train = make_texts(240, 0)
    tokenizer = train_tokenizer([r["text"] for r in train], vocab_size=80, model_max_length=MAX_LENGTH)
    return tokenizer, train, make_texts(40, 1)


def token_ids(tokenizer, rows) -> list[list[int]]:
    return tokenizer([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH)["input_ids"]


def encode(tokenizer, rows) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=MAX_LENGTH,
                      return_tensors="pt")  # fmt: skip
    return batch["input_ids"], batch["attention_mask"]


def label_matrix(rows, names=LABEL_NAMES) -> torch.Tensor:
    return torch.tensor([[name in r["labels"] for name in names] for r in rows], dtype=torch.float32)


def fit(scorer: LexicalLabelScorer, tokenizer, rows) -> float:
    return fit_lexical_scorer(scorer, token_ids(tokenizer, rows), label_matrix(rows), tokenizer.all_special_ids)


def lexical_model(head, tokenizer, rows=None, scale: float = 0.0, seed: int = 0, **overrides):
    """A small untrained head with a lexical part, fitted on ``rows`` when given, at ``scale``."""
    torch.manual_seed(seed)
    settings = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0)  # fmt: skip
    config = LabelformerConfig.from_labels(
        LABEL_NAMES, vocab_size=len(tokenizer), **{**settings, "lexical_scorer": True, **overrides}
    )
    model = head(config).eval()
    if rows is not None:
        fit(model.lexical_scorer, tokenizer, rows)
    model.lexical_scorer.scale.fill_(scale)
    return model


@pytest.fixture(scope="module")
def sklearn_reference(corpus):
    """scikit-learn's tf-idf of the training texts' token ids (special tokens left out), and a way to use it."""
    text = pytest.importorskip("sklearn.feature_extraction.text")
    tokenizer, train, _ = corpus
    special = set(tokenizer.all_special_ids)

    def words(rows):
        return [[str(t) for t in row if t not in special] for row in token_ids(tokenizer, rows)]

    vectorizer = text.TfidfVectorizer(sublinear_tf=True, analyzer=lambda tokens: tokens).fit(words(train))
    return vectorizer, words


def test_features_are_scikit_learns_tfidf_over_token_ids(corpus, sklearn_reference):
    tokenizer, train, test = corpus
    vectorizer, words = sklearn_reference
    scorer = LexicalLabelScorer(len(tokenizer), len(LABEL_NAMES))
    fit(scorer, tokenizer, train)
    unseen = [{"text": "wheat zebra quokka wheat of the", "labels": ["grain"]}]  # word pieces no training text holds
    for rows in (train[:50], test, unseen):
        expected = torch.zeros(len(rows), len(tokenizer))
        dense = torch.tensor(vectorizer.transform(words(rows)).toarray(), dtype=torch.float32)
        for column, token in enumerate(vectorizer.get_feature_names_out()):
            expected[:, int(token)] = dense[:, column]
        ids, _ = encode(tokenizer, rows)  # padded, with special tokens: both must count for nothing
        torch.testing.assert_close(scorer.features(ids), expected, rtol=1e-5, atol=1e-6)
    assert scorer.idf[tokenizer.all_special_ids].eq(0).all()


def test_fit_gives_the_margins_of_a_linear_svc_on_those_features(corpus, sklearn_reference):
    svm = pytest.importorskip("sklearn.svm")
    tokenizer, train, test = corpus
    vectorizer, words = sklearn_reference
    # two extra labels: one no training text has, one every training text has
    names = [*LABEL_NAMES, "never", "always"]
    rows = [{**r, "labels": [*r["labels"], "always"]} for r in train]
    scorer = LexicalLabelScorer(len(tokenizer), len(names))
    scorer.scale.fill_(2.0)
    targets = label_matrix(rows, names)
    f1 = fit_lexical_scorer(scorer, token_ids(tokenizer, rows), targets, tokenizer.all_special_ids, c=3.0)
    assert scorer.scale.item() == 2.0  # fitting leaves the scale alone
    ids, _ = encode(tokenizer, test)
    margins = scorer.margins(ids)
    x_train, x_test = vectorizer.transform(words(rows)), vectorizer.transform(words(test))
    for label, name in enumerate(LABEL_NAMES):
        reference = svm.LinearSVC(C=3.0, max_iter=100_000, tol=1e-8).fit(x_train, targets[:, label].numpy())
        want = torch.tensor(reference.decision_function(x_test), dtype=torch.float32)
        torch.testing.assert_close(margins[:, label], want, atol=2e-3, rtol=0, msg=name)
    # a label without negatives (or positives) gets no weights and a constant margin of +1 (or -1)
    assert not scorer.weight[len(LABEL_NAMES) :].any()
    assert margins[:, len(LABEL_NAMES) :].unique(dim=0).tolist() == [[-1.0, 1.0]]
    torch.testing.assert_close(scorer(ids), 2.0 * margins)
    # the returned number is the training micro-F1 of the margins' own decisions
    train_ids, _ = encode(tokenizer, rows)
    chosen = scorer.margins(train_ids) > 0
    gold = targets.bool()
    assert f1 == pytest.approx(2 * (chosen & gold).sum().item() / (chosen.sum() + gold.sum()).item(), abs=1e-6)
    assert f1 > 0.95


def margin_decisions(margins: torch.Tensor, at_least_one: bool) -> list[set[str]]:
    """The linear model's own label sets: positive margins (or the best one when none is and one is needed)."""
    sets = []
    for row in margins:
        chosen = {LABEL_NAMES[i] for i in (row > 0).nonzero().flatten().tolist()}
        sets.append(chosen or ({LABEL_NAMES[int(row.argmax())]} if at_least_one else set()))
    return sets


@pytest.mark.parametrize("head", HEADS)
def test_a_large_scale_lets_the_fitted_part_decide_on_every_path(tmp_path, corpus, head):
    tokenizer, train, test = corpus
    model = lexical_model(head, tokenizer, train, scale=1000.0)  # an untrained network: the linear model decides
    texts = [r["text"] for r in test]
    predictions = model.predict_labels(texts, tokenizer=tokenizer)
    ids, _ = encode(tokenizer, test)
    generation = head is LabelformerForMultiLabelGeneration
    assert [set(p) for p in predictions] == margin_decisions(model.lexical_scorer.margins(ids), generation)
    assert sum(set(p) == set(r["labels"]) for p, r in zip(predictions, test)) >= 38
    model.save_pretrained(tmp_path)
    half = head.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert half.lexical_scorer.weight.dtype == torch.bfloat16
    assert sum(p == q for p, q in zip(half.predict_labels(texts, tokenizer=tokenizer), predictions)) >= 38


@pytest.mark.parametrize("head", HEADS)
def test_the_fitted_part_is_saved_and_loaded_with_the_model(tmp_path, corpus, head):
    tokenizer, train, test = corpus
    model = lexical_model(head, tokenizer, train, scale=1.5)
    assert not list(model.lexical_scorer.parameters())  # buffers: never trained by the optimiser
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    for name, value in model.lexical_scorer.state_dict().items():
        assert name in ("idf", "weight", "bias", "scale")
        torch.testing.assert_close(saved[f"lexical_scorer.{name}"], value, rtol=0, atol=0)
    assert saved["lexical_scorer.idf"].count_nonzero() > 0 and saved["lexical_scorer.scale"].item() == 1.5
    assert json.loads((tmp_path / "config.json").read_text())["lexical_scorer"] is True
    loaded = head.from_pretrained(tmp_path).eval()
    for name, value in model.lexical_scorer.state_dict().items():
        torch.testing.assert_close(loaded.lexical_scorer.state_dict()[name], value, rtol=0, atol=0)
    ids, mask = encode(tokenizer, test)
    with torch.no_grad():
        torch.testing.assert_close(loaded.lexical_scorer(ids), model.lexical_scorer(ids))
        assert loaded.predict_batch(ids, mask) == model.predict_batch(ids, mask)
    texts = [r["text"] for r in test]
    assert loaded.predict_labels(texts) == model.predict_labels(texts, tokenizer=tokenizer)


@pytest.mark.parametrize("head", HEADS)
def test_scale_zero_adds_nothing_and_a_scale_adds_scaled_margins(corpus, head):
    tokenizer, train, test = corpus
    model = lexical_model(head, tokenizer, train, scale=0.0)
    plain = head(LabelformerConfig.from_dict({**model.config.to_dict(), "lexical_scorer": False})).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == [f"lexical_scorer.{n}" for n in ("bias", "idf", "scale", "weight")]
    ids, mask = encode(tokenizer, test)
    generation = head is LabelformerForMultiLabelGeneration
    inputs = dict(input_ids=ids, attention_mask=mask)
    if generation:
        inputs["labels"] = torch.tensor([[3, 4, 2]] * len(ids))
    with torch.no_grad():
        assert model.lexical_scorer.margins(ids).abs().sum() > 0  # fitted, only scaled to nothing
        zero = model(**inputs)
        torch.testing.assert_close(zero.logits, plain(**inputs).logits, rtol=0, atol=0)
        torch.testing.assert_close(zero.loss, plain(**inputs).loss, rtol=0, atol=0)
        assert model.predict_batch(ids, mask) == plain.predict_batch(ids, mask)
        model.lexical_scorer.scale.fill_(2.5)
        added = model(**inputs).logits - zero.logits
        expected = 2.5 * model.lexical_scorer.margins(ids)
        if generation:  # at every decoder position, on the label tokens only
            assert not added[..., :NUM_SPECIAL_DECODER_TOKENS].any()
            added = added[..., NUM_SPECIAL_DECODER_TOKENS:]
            expected = expected[:, None, :].expand_as(added)
        torch.testing.assert_close(added, expected, atol=1e-5, rtol=1e-5)


def test_misuse_gives_clear_errors(corpus):
    tokenizer, train, test = corpus
    scorer = LexicalLabelScorer(len(tokenizer), len(LABEL_NAMES))
    with pytest.raises(ValueError, match="Got 2 documents but 1 label rows"):
        fit_lexical_scorer(scorer, [[5, 6], [7]], torch.ones(1, len(LABEL_NAMES)), [0])
    with pytest.raises(ValueError, match="both must be > 0"):
        fit_lexical_scorer(scorer, [], torch.ones(0, len(LABEL_NAMES)), [0])
    with pytest.raises(ValueError, match="outside the lexical scorer's vocabulary"):
        scorer.margins(torch.tensor([[1, len(tokenizer) + 5]]))
    ids, mask = encode(tokenizer, test[:2])
    for head in HEADS:
        model = lexical_model(head, tokenizer, train, scale=1.0)
        embeds = model.get_input_embeddings()(ids)
        with pytest.raises(ValueError, match="pass them instead of `inputs_embeds`"):
            if head is LabelformerForMultiLabelGeneration:
                model.encode(None, mask, embeds)
            else:
                model(inputs_embeds=embeds, attention_mask=mask)
    model = lexical_model(LabelformerForMultiLabelGeneration, tokenizer, train, scale=1.0)
    with pytest.raises(ValueError, match="pass `input_ids`"):
        model.row_bias(model.model.encoder(ids, mask))  # encoder states without the label logits
