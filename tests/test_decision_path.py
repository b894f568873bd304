"""The model is its own answer: generate() == predict_labels == pipeline, scores == transition scores,
the threshold head's sigmoid(logits) > 0.5 == predict_labels, and concurrent calls are safe."""

from __future__ import annotations

import threading

import pytest
import torch

from modeling import (
    LabelformerEnsembleForMultiLabelGeneration,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
)
from modeling.lexical_labelformer import fit_lexical_scorer
from tests.synthetic import LABELS, synthetic_batch, synthetic_config


def _with_lexical(model, ids: torch.Tensor, label_sets: list[list[str]], scale: float = 2.0):
    targets = torch.zeros(len(label_sets), len(LABELS))
    for row, labels in enumerate(label_sets):
        targets[row, [LABELS.index(label) for label in labels]] = 1
    fit_lexical_scorer(model.lexical_scorer, ids.tolist(), targets, special_ids=[0, 1, 2, 3])
    model.lexical_scorer.scale.fill_(scale)
    return model


def _members(count: int = 2, **overrides) -> list[LabelformerForMultiLabelGeneration]:
    """``count`` differently initialised generation models (seeds 0, 1, ...) of the synthetic config."""
    members = []
    for seed in range(count):
        torch.manual_seed(seed)
        members.append(LabelformerForMultiLabelGeneration(synthetic_config(init_std=0.1, **overrides)).eval())
    return members


def _ensemble(lexical: bool) -> LabelformerEnsembleForMultiLabelGeneration:
    """Two differently initialised members (and, with ``lexical``, a room for the ensemble's lexical part)."""
    model = LabelformerEnsembleForMultiLabelGeneration.from_members(_members(2))
    if lexical:
        config = model.config.from_dict({**model.config.to_dict(), "lexical_scorer": True})
        hybrid = LabelformerEnsembleForMultiLabelGeneration(config)
        hybrid.load_state_dict(model.state_dict(), strict=False)
        model = hybrid.eval()
    return model


@pytest.fixture(params=["transformer", "with_lexical", "ensemble", "ensemble_with_lexical"])
def generator(request):
    lexical = request.param.endswith("with_lexical")
    if request.param.startswith("ensemble"):
        model = _ensemble(lexical)
    else:
        torch.manual_seed(0)
        model = LabelformerForMultiLabelGeneration(synthetic_config(lexical_scorer=lexical)).eval()
    ids, label_sets = synthetic_batch(64, 12, torch.Generator().manual_seed(1))
    if lexical:
        _with_lexical(model, ids, label_sets)
    return model


def _batch():
    ids, _ = synthetic_batch(5, 12, torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[-1, -4:] = 0
    ids[-1, -4:] = 0
    return ids, mask


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_equals_predict_batch(generator, num_beams):
    ids, mask = _batch()
    with torch.no_grad():
        sequences = generator.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams)
        predicted = generator.predict_batch(ids, mask, num_beams=num_beams)
    assert generator.decode_labels(sequences) == [list(p) for p in predicted]
    assert all(0 < len(p) <= len(LABELS) for p in predicted)


def test_generic_loop_equals_fast_path(generator):
    ids, mask = _batch()
    with torch.no_grad():
        fast = generator.generate(input_ids=ids, attention_mask=mask)
        out = generator.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(fast, out.sequences)


def test_scores_are_transition_scores(generator):
    ids, mask = _batch()
    with torch.no_grad():
        out = generator.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True)
        steps = generator.compute_transition_scores(out.sequences, out.scores).exp()
        predicted = generator.predict_batch(ids, mask)
    for row, scored in enumerate(predicted):
        assert list(scored.values()) == pytest.approx(steps[row, : len(scored)].tolist(), abs=1e-5)


def test_forward_logits_hold_the_lexical_part():
    model = LabelformerForMultiLabelGeneration(synthetic_config(lexical_scorer=True)).eval()
    ids, label_sets = synthetic_batch(64, 12, torch.Generator().manual_seed(1))
    start = torch.full((4, 1), model.config.decoder_start_token_id)
    before = model(input_ids=ids[:4], decoder_input_ids=start).logits
    _with_lexical(model, ids, label_sets)
    after = model(input_ids=ids[:4], decoder_input_ids=start).logits
    added = torch.nn.functional.pad(model.lexical_scorer(ids[:4]), (3, 0))
    torch.testing.assert_close(after[:, 0], before[:, 0] + added)
    assert added.abs().sum() > 0


def test_threshold_head_logits_decide():
    torch.manual_seed(0)
    model = LabelformerForMultiLabelClassification(synthetic_config(lexical_scorer=True)).eval()
    ids, label_sets = synthetic_batch(64, 12, torch.Generator().manual_seed(1))
    _with_lexical(model, ids, label_sets)
    model.fold_threshold(0.3)
    with torch.no_grad():
        probs = torch.sigmoid(model(input_ids=ids).logits)
        predicted = model.predict_batch(ids, torch.ones_like(ids))
    for row, scored in enumerate(predicted):
        chosen = {LABELS[i] for i in (probs[row] > 0.5).nonzero().flatten().tolist()}
        assert set(scored) == chosen
        assert list(scored.values()) == sorted(scored.values(), reverse=True)


def test_concurrent_calls_are_safe(generator, tmp_path):
    ids, mask = _batch()
    config_before = generator.config.to_dict()
    with torch.no_grad():
        expected = {beams: generator.predict_batch(ids, mask, beams) for beams in (1, 3)}
        expected_generate = generator.generate(input_ids=ids, attention_mask=mask, num_beams=3)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad():
                for _ in range(10):
                    for beams in (1, 3):
                        assert generator.predict_batch(ids, mask, beams) == expected[beams]
                    assert torch.equal(generator.generate(input_ids=ids, attention_mask=mask, num_beams=3),
                                       expected_generate)  # fmt: skip
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert generator.config.to_dict() == config_before
    generator.save_pretrained(tmp_path)
    reloaded = type(generator).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        for beams in (1, 3):
            again = reloaded.predict_batch(ids, mask, beams)
            assert [list(r) for r in again] == [list(r) for r in expected[beams]]
            for got, want in zip(again, expected[beams]):
                assert list(got.values()) == pytest.approx(list(want.values()), abs=1e-5)


def _threshold_text_model(generator, tokenizer):
    """A threshold head on the tiny text task's config, briefly trained, with a folded threshold."""
    from modeling import MultiLabelCollator
    from tests.textdata import make_texts

    torch.manual_seed(0)
    model = LabelformerForMultiLabelClassification(generator.config.__class__.from_dict(generator.config.to_dict()))
    collator = MultiLabelCollator(tokenizer, model.config, max_length=32, head="classification")
    rows = make_texts(200, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):  # trained enough that some texts stay below the threshold for some labels
        loss = model(**collator([rows[(step * 32 + i) % len(rows)] for i in range(32)])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.fold_threshold(0.35)
    return model.eval()


def test_pipelines_and_tokenizer_generate_agree_with_predict_labels(tmp_path):
    from transformers import pipeline

    from tests.textdata import make_texts, trained_text_model

    generator, tokenizer = trained_text_model()
    texts = [row["text"] for row in make_texts(6, 7)]
    generator.save_pretrained(tmp_path / "generation")
    tokenizer.save_pretrained(tmp_path / "generation")
    expected = generator.predict_labels(texts, tokenizer=tokenizer, return_scores=True)
    for beams in (1, 3):
        ids = generator.generate(**tokenizer(texts, return_tensors="pt", padding=True), num_beams=beams)
        assert generator.decode_labels(ids) == [list(p) for p in generator.predict_labels(texts, tokenizer, beams)]
    classify = pipeline("multi-label-generation", model=str(tmp_path / "generation"), trust_remote_code=True)
    for got, want in zip(classify(texts), expected):
        assert [item["label"] for item in got] == list(want)
        assert [item["score"] for item in got] == pytest.approx(list(want.values()), abs=1e-5)

    threshold = _threshold_text_model(generator, tokenizer)
    threshold.save_pretrained(tmp_path / "threshold")
    tokenizer.save_pretrained(tmp_path / "threshold")
    decided = threshold.predict_labels(texts, tokenizer=tokenizer)
    assert any(decided) and not all(len(d) == threshold.config.num_labels for d in decided)
    stock = pipeline("text-classification", model=str(tmp_path / "threshold"), trust_remote_code=True,
                     top_k=None, function_to_apply="sigmoid")  # fmt: skip
    for got, want in zip(stock(texts), decided):
        assert sorted(item["label"] for item in got if item["score"] >= 0.5) == sorted(want)
