"""LabelformerEnsemble: averaged greedy label decoding, averaged threshold heads, checks, loading."""

from __future__ import annotations

import pytest
import torch

from modeling import (
    LabelformerConfig,
    LabelformerEnsemble,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
    LabelformerForParallelLabelGeneration,
    train_tokenizer,
)
from modeling.configuration_labelformer import NUM_SPECIAL_DECODER_TOKENS
from modeling.multilabel_labelformer import threshold_decisions
from modeling.tokenization_labelformer import save_tokenizer

from .synthetic import LABELS, synthetic_batch, synthetic_config


def members(head, count: int, **overrides) -> list:
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        models.append(head(synthetic_config(init_std=0.3, **overrides)).eval())
    return models


def reference_ensemble_decoding(models, ids, mask) -> list[dict[str, float]]:
    """Greedy decoding on the mean of the members' constrained distributions, recomputed from scratch each step."""
    config = models[0].config
    encoded = [m.model.encoder(ids, mask) for m in models]
    results = []
    for row in range(ids.shape[0]):
        prefix = torch.tensor([[config.decoder_start_token_id]])
        scored = {}
        while True:
            probs = sum(
                m._constrained_logits(prefix, type(e)(last_hidden_state=e.last_hidden_state[row : row + 1]),
                                      mask[row : row + 1])[0, -1].softmax(-1)
                for m, e in zip(models, encoded)
            ) / len(models)  # fmt: skip
            token = int(probs.argmax())
            if token < NUM_SPECIAL_DECODER_TOKENS:
                break
            scored[config.id2label[token - NUM_SPECIAL_DECODER_TOKENS]] = float(probs[token])
            prefix = torch.cat([prefix, torch.tensor([[token]])], dim=1)
        results.append(scored)
    return results


@pytest.mark.parametrize("limits", [{}, {"min_labels": 2, "max_labels": 3}])
def test_generation_ensemble_decodes_the_mean_distribution(limits):
    models = members(LabelformerForMultiLabelGeneration, 3, **limits)
    ids, _ = synthetic_batch(5, 12, torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, -5:] = 0
    ensemble = LabelformerEnsemble(models)
    with torch.no_grad():
        got = ensemble.predict_batch(ids, mask)
        want = reference_ensemble_decoding(models, ids, mask)
        single = models[0].predict_batch(ids, mask)
    assert [list(r) for r in got] == [list(r) for r in want]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)
    # the members disagree, so the average is not just member 0
    assert [list(r) for r in single] != [list(r) for r in got]
    assert LabelformerEnsemble(models[:1]).predict_batch(ids, mask) == single


def test_threshold_ensemble_averages_probabilities_and_tunes_one_threshold():
    models = members(LabelformerForMultiLabelClassification, 2)
    models[0].config.classifier_threshold, models[1].config.classifier_threshold = 0.4, 0.6
    ensemble = LabelformerEnsemble(models)
    assert ensemble.config.classifier_threshold == pytest.approx(0.5)
    assert models[0].config.classifier_threshold == 0.4  # the members' configs are left alone
    ids, gold = synthetic_batch(6, 12, torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        probs = ensemble.label_probabilities(ids, mask)
        expected = sum(torch.sigmoid(m(input_ids=ids, attention_mask=mask).logits) for m in models) / 2
        predicted = ensemble.predict_batch(ids, mask)
    torch.testing.assert_close(probs, expected)
    chosen = threshold_decisions(probs, 0.5, 1, len(LABELS))
    assert [set(p) for p in predicted] == [{LABELS[i] for i in row.nonzero().flatten().tolist()} for row in chosen]
    targets = torch.zeros(6, len(LABELS))
    for i, labels in enumerate(gold):
        targets[i, [LABELS.index(x) for x in labels]] = 1
    threshold, _ = ensemble.tune_threshold(probs, targets)
    assert ensemble.config.classifier_threshold == threshold


def test_ensemble_rejects_members_that_do_not_fit_together():
    generation = members(LabelformerForMultiLabelGeneration, 1)[0]
    threshold = members(LabelformerForMultiLabelClassification, 1)[0]
    other_labels = LabelformerForMultiLabelGeneration(
        LabelformerConfig.from_labels(list(reversed(LABELS)), vocab_size=generation.config.vocab_size, d_model=64,
                                      encoder_attention_heads=4, decoder_attention_heads=4)
    )  # fmt: skip
    with pytest.raises(ValueError, match="at least one"):
        LabelformerEnsemble([])
    with pytest.raises(ValueError, match="member 0 is a LabelformerForMultiLabelGeneration"):
        LabelformerEnsemble([generation, threshold])
    with pytest.raises(ValueError, match="`id2label`"):
        LabelformerEnsemble([generation, other_labels])
    with pytest.raises(ValueError, match="supports"):
        LabelformerEnsemble([LabelformerForParallelLabelGeneration(synthetic_config())])
    ids, _ = synthetic_batch(2, 8, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="`num_beams` must be >= 1"):
        LabelformerEnsemble([generation]).predict_batch(ids, torch.ones_like(ids), num_beams=0)


def test_from_pretrained_predicts_raw_texts_and_checks_tokenizers(tmp_path):
    texts = ["wheat prices rise", "corn and wheat harvest", "company earnings up"]
    tokenizer = train_tokenizer(texts * 5, vocab_size=50)
    config = LabelformerConfig.from_labels(["wheat", "corn", "earn"], vocab_size=len(tokenizer), d_model=32,
                                           encoder_attention_heads=2, decoder_attention_heads=2)  # fmt: skip
    folders = []
    for seed in range(2):
        torch.manual_seed(seed)
        folder = tmp_path / f"seed{seed}"
        LabelformerForMultiLabelGeneration(config).save_pretrained(folder)
        save_tokenizer(tokenizer, folder)
        folders.append(folder)
    ensemble = LabelformerEnsemble.from_pretrained(folders)
    assert len(ensemble) == 2 and not ensemble.members[0].training
    predicted = ensemble.predict_labels(texts, return_scores=True)
    assert len(predicted) == 3 and all(p and set(p) <= {"wheat", "corn", "earn"} for p in predicted)
    assert all(0.0 <= s <= 1.0 for p in predicted for s in p.values())

    other = train_tokenizer(["something else entirely " * 3, "more words here"] * 5, vocab_size=50)
    save_tokenizer(other, folders[1])
    with pytest.raises(ValueError, match="tokenizer in .*seed1 differs"):
        LabelformerEnsemble.from_pretrained(folders)
    LabelformerForParallelLabelGeneration(config).save_pretrained(tmp_path / "parallel")
    with pytest.raises(ValueError, match="LabelformerEnsemble needs"):
        LabelformerEnsemble.from_pretrained([folders[0], tmp_path / "parallel"])


def test_ensemble_beam_keeps_the_candidate_the_ensemble_finds_most_probable():
    models = members(LabelformerForMultiLabelGeneration, 2)
    ensemble = LabelformerEnsemble(models)
    ids, _ = synthetic_batch(6, 12, torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    states = [m.model.encoder(ids, mask).last_hidden_state for m in models]
    label2id = {name: i for i, name in models[0].config.id2label.items()}

    def log_probs(predicted: list[dict[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in predicted) + 1
        sequences = torch.zeros(len(predicted), width, dtype=torch.long)  # padding 0 after EOS
        for i, p in enumerate(predicted):
            tokens = [label2id[name] + NUM_SPECIAL_DECODER_TOKENS for name in p] + [2]
            sequences[i, : len(tokens)] = torch.tensor(tokens)
        return ensemble.sequence_scores(sequences, states, mask, torch.arange(len(predicted)))

    with torch.no_grad():
        greedy = ensemble.predict_batch(ids, mask)
        beam = ensemble.predict_batch(ids, mask, num_beams=3)
        member_beams = [m.predict_batch(ids, mask, num_beams=3) for m in models]
        greedy_total, greedy_steps = log_probs(greedy)
        beam_total, _ = log_probs(beam)
        # the scorer agrees with the greedy decoder's own step probabilities
        for row, p in enumerate(greedy):
            assert greedy_steps[row, : len(p)].tolist() == pytest.approx(list(p.values()), abs=1e-5)
        assert (beam_total >= greedy_total - 1e-5).all()
        for predicted in member_beams:
            assert (beam_total >= log_probs(predicted)[0] - 1e-5).all()
    assert all(p and all(0.0 < s <= 1.0 for s in p.values()) for p in beam)
