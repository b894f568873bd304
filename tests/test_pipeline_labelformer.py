"""The ``"multi-label-generation"`` pipeline: batching, documented options, the model's own scores, speed."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
from transformers import pipeline

from modeling import (
    LabelformerConfig,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
    LabelformerForParallelLabelGeneration,
)

from .textdata import make_texts, trained_text_model

TEXTS = [row["text"] * (1 + i % 4) for i, row in enumerate(make_texts(96, seed=11))]  # lengths vary
HEADS = {
    "generation": LabelformerForMultiLabelGeneration,
    "threshold": LabelformerForMultiLabelClassification,
    "parallel": LabelformerForParallelLabelGeneration,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A trained label generator and, on its config, an (untrained) threshold and parallel head, saved."""
    model, tokenizer = trained_text_model()
    root = tmp_path_factory.mktemp("pipeline")
    folders = {}
    for name, head in HEADS.items():
        torch.manual_seed(0)
        saved = model if name == "generation" else head(LabelformerConfig.from_dict(model.config.to_dict()))
        saved.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def as_pipeline(scored: list[dict[str, float]]) -> list[list[dict]]:
    return [[{"label": label, "score": score} for label, score in row.items()] for row in scored]


@pytest.mark.parametrize("head", sorted(HEADS))
def test_batch_size_at_the_call_and_in_the_constructor_gives_predict_labels_answers(folders, head):
    model = HEADS[head].from_pretrained(folders[head]).eval()
    classifier = pipeline("multi-label-generation", model=str(folders[head]), trust_remote_code=True)
    expected = model.predict_labels(TEXTS, batch_size=8, return_scores=True)
    # sorted by length and cut into batches as predict_labels does: the same batches, the same numbers
    assert classifier(TEXTS, batch_size=8) == as_pipeline(expected)
    built = pipeline("multi-label-generation", model=str(folders[head]), trust_remote_code=True, batch_size=8)
    assert built(TEXTS) == as_pipeline(expected)
    assert classifier([]) == classifier([], batch_size=8) == built([]) == []
    # Pipeline's own loader (a generator) and one text at a time: the same labels, scores up to padding
    loader = list(classifier((text for text in TEXTS), batch_size=4))
    for got in (loader, classifier(TEXTS), [classifier(text) for text in TEXTS[:5]]):
        assert [[x["label"] for x in row] for row in got] == [list(row) for row in expected[: len(got)]]
        for row, want in zip(got, expected):
            assert [x["score"] for x in row] == pytest.approx(list(want.values()), abs=1e-5)


def test_scores_are_the_generators_own_step_probabilities(folders):
    model = LabelformerForMultiLabelGeneration.from_pretrained(folders["generation"]).eval()
    classifier = pipeline("multi-label-generation", model=str(folders["generation"]), trust_remote_code=True)
    tokenizer = classifier.tokenizer
    for text in TEXTS[:4]:
        inputs = tokenizer(text, truncation=True, return_tensors="pt")
        out = model.generate(**inputs, output_scores=True, return_dict_in_generate=True, logits_processor=[])
        steps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=False).exp()[0]
        labels = model.decode_labels(out.sequences)[0]
        got = classifier(text)
        assert [x["label"] for x in got] == labels
        assert [x["score"] for x in got] == pytest.approx(steps[: len(labels)].tolist(), abs=1e-5)


def test_top_k_and_threshold_only_remove_labels_from_the_models_answer(folders):
    classifier = pipeline("multi-label-generation", model=str(folders["generation"]), trust_remote_code=True)
    full = classifier(TEXTS, batch_size=16)
    assert any(len(row) > 1 for row in full)
    best = [sorted(row, key=lambda x: -x["score"])[:1] for row in full]
    assert classifier(TEXTS, batch_size=16, top_k=1) == best
    [one] = classifier(TEXTS[0], top_k=1)  # unbatched: the same label, its score up to padding
    assert one == {"label": best[0][0]["label"], "score": pytest.approx(best[0][0]["score"], abs=1e-5)}
    floor = sorted(x["score"] for row in full for x in row)[len(TEXTS) // 2]
    kept = [[x for x in row if x["score"] >= floor] for row in full]
    assert classifier(TEXTS, batch_size=16, threshold=floor) == kept
    assert any(kept) and any(not row for row in kept)
    assert classifier(TEXTS, batch_size=16, top_k=1, threshold=floor) == [row[:1] for row in best_of(kept)]
    built = pipeline("multi-label-generation", model=str(folders["generation"]), trust_remote_code=True, top_k=1)
    assert built(TEXTS, batch_size=16) == best


def best_of(rows: list[list[dict]]) -> list[list[dict]]:
    return [sorted(row, key=lambda x: -x["score"]) for row in rows]


@pytest.mark.parametrize(
    "options, message",
    [({"function_to_apply": "sigmoid"}, "no option 'function_to_apply'"), ({"topk": 2}, "no option 'topk'"),
     ({"top_k": 0}, "top_k"), ({"threshold": 1.5}, "threshold"), ({"num_beams": "3"}, "num_beams")],
)  # fmt: skip
def test_unknown_options_and_bad_values_raise(folders, options, message):
    folder = str(folders["generation"])
    classifier = pipeline("multi-label-generation", model=folder, trust_remote_code=True)
    with pytest.raises(ValueError, match=message):
        classifier(TEXTS[0], **options)
    with pytest.raises(ValueError, match=message):
        classifier(TEXTS, batch_size=8, **options)
    with pytest.raises(ValueError, match=message):
        pipeline("multi-label-generation", model=folder, trust_remote_code=True, **options)


def test_inference_leaves_the_model_and_config_untouched(folders):
    classifier = pipeline("multi-label-generation", model=str(folders["generation"]), trust_remote_code=True)
    config = copy.deepcopy(classifier.model.config.to_dict())
    weights = {k: v.clone() for k, v in classifier.model.state_dict().items()}
    classifier(TEXTS, batch_size=8, top_k=2, threshold=0.1)
    classifier(TEXTS[:3], num_beams=2)
    assert classifier.model.config.to_dict() == config
    assert all(torch.equal(v, weights[k]) for k, v in classifier.model.state_dict().items())


def test_batched_pipeline_is_within_1_5x_of_batched_predict_labels_per_text(folders):
    model = LabelformerForMultiLabelGeneration.from_pretrained(folders["generation"]).eval()
    classifier = pipeline("multi-label-generation", model=str(folders["generation"]), trust_remote_code=True)
    texts = TEXTS * 4
    tokenizer = classifier.tokenizer

    def seconds(call) -> float:  # this process's CPU time (one thread here): waiting for a busy CPU is not counted
        start = time.process_time()
        call()
        return time.process_time() - start

    # interleaved rounds, the fastest of each: other work on the machine slows single rounds, not the minimum
    direct, piped = [], []
    for _ in range(6):
        direct.append(seconds(lambda: model.predict_labels(texts, tokenizer=tokenizer, batch_size=32)))
        piped.append(seconds(lambda: classifier(texts, batch_size=32)))
    assert min(piped) <= 1.5 * min(direct), f"pipeline {min(piped):.4f} s, predict_labels {min(direct):.4f} s"


def test_a_huge_text_is_cut_at_the_models_maximum_as_predict_labels_cuts_it(folders):
    model = LabelformerForMultiLabelGeneration.from_pretrained(folders["generation"]).eval()
    classifier = pipeline("multi-label-generation", model=str(folders["generation"]), trust_remote_code=True)
    tokenizer = classifier.tokenizer
    tokenizer.model_max_length = 100_000  # a tokenizer that would keep the whole text
    encoded = classifier.preprocess(TEXTS[0] * 400)
    assert encoded["input_ids"].shape[1] == model.config.max_position_embeddings < len(tokenizer(TEXTS[0] * 400)[0])
    huge = [TEXTS[0] * 400, TEXTS[1] * 400]
    expected = model.predict_labels(huge, tokenizer=tokenizer, return_scores=True)
    assert classifier(huge, batch_size=2) == as_pipeline(expected)
