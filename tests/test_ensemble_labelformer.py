"""Several Transformers in one model: the members' mean probability decides, on every path."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForSeq2SeqLM, pipeline

from configuration import LabelformerConfig
from modeling import LabelformerEnsembleForMultiLabelGeneration, LabelformerForMultiLabelGeneration
from modeling.ensemble_labelformer import member_config
from tests.synthetic import synthetic_batch, synthetic_config
from tests.test_decision_path import _batch, _ensemble, _members, _with_lexical


@pytest.mark.parametrize("lexical", [False, True])
def test_forward_is_the_log_of_the_members_mean_probability(lexical):
    members = _members(3)
    ensemble = LabelformerEnsembleForMultiLabelGeneration.from_members(members)
    ids, mask = _batch()
    if lexical:
        ensemble = _ensemble(lexical=True)
        members = [ensemble.member(k) for k in range(2)]
        train_ids, label_sets = synthetic_batch(64, 12, torch.Generator().manual_seed(1))
        _with_lexical(ensemble, train_ids, label_sets)
    decoder_ids = torch.tensor([[1, 5, 7, 4]] * ids.shape[0])
    with torch.no_grad():
        got = ensemble(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits.softmax(-1)
        mean = torch.stack(
            [m(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits.softmax(-1) for m in members]
        ).mean(0)
        if lexical:  # the lexical part reweights the mean distribution
            margins = nn.functional.pad(ensemble.lexical_scorer(ids), (3, 0))[:, None, :]
            mean = (mean.log() + margins).softmax(-1)
    torch.testing.assert_close(got, mean, atol=1e-6, rtol=1e-5)
    # and it is not one member's answer
    assert not torch.allclose(got, members[0](input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
                              .logits.softmax(-1), atol=1e-3)  # fmt: skip


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_decoding_equals_decoding_without_a_cache(num_beams):
    """One generation cache holds every member's layers: with it, the tokens are those of full recomputation."""
    ensemble = LabelformerEnsembleForMultiLabelGeneration.from_members(_members(3))
    ids, mask = _batch()
    ensemble.fast_greedy_generate = False
    with torch.no_grad():
        cached = ensemble.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams)
        full = ensemble.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams, use_cache=False)
        ensemble.fast_greedy_generate = True
        fast = ensemble.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams)
    assert ensemble.decode_labels(cached) == ensemble.decode_labels(full) == ensemble.decode_labels(fast)
    assert max(map(len, ensemble.decode_labels(cached))) >= 2  # several steps were decoded


def test_members_come_back_unchanged_and_the_originals_are_not_touched(tmp_path):
    members = _members(2)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    ensemble = LabelformerEnsembleForMultiLabelGeneration.from_members(members)
    ids, mask = _batch()
    with torch.no_grad():
        for k, member in enumerate(members):
            alone = ensemble.member(k)
            assert type(alone) is LabelformerForMultiLabelGeneration and alone.config.ensemble_size == 1
            assert torch.equal(alone.generate(input_ids=ids, attention_mask=mask, num_beams=3),
                               member.generate(input_ids=ids, attention_mask=mask, num_beams=3))  # fmt: skip
            assert all(torch.equal(v, before[k][n]) for n, v in member.state_dict().items())
    with pytest.raises(IndexError, match="2 members"):
        ensemble.member(2)


def test_saved_folder_loads_through_the_auto_class_and_answers_the_same(tmp_path):
    ensemble = _ensemble(lexical=True)
    train_ids, label_sets = synthetic_batch(64, 12, torch.Generator().manual_seed(1))
    _with_lexical(ensemble, train_ids, label_sets)
    ids, mask = _batch()
    ensemble.save_pretrained(tmp_path)
    assert (tmp_path / "ensemble_labelformer.py").is_file()  # the folder carries the class's code
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(reloaded).__name__ == "LabelformerEnsembleForMultiLabelGeneration"
    with torch.no_grad():
        for beams in (1, 3):
            got, want = reloaded.predict_batch(ids, mask, beams), ensemble.predict_batch(ids, mask, beams)
            assert [list(g) for g in got] == [list(w) for w in want]
            for g, w in zip(got, want):
                assert list(g.values()) == pytest.approx(list(w.values()), abs=1e-6)
    assert reloaded.config.ensemble_size == 2 and reloaded.config.lexical_scorer
    with pytest.raises(ValueError, match="ensemble of 2 Transformers: load it with AutoModelForSeq2SeqLM"):
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True)  # no one bare encoder-decoder to give


def test_pipeline_and_generate_agree_with_predict_labels(tmp_path):
    from tests.textdata import make_texts, trained_text_model

    first, tokenizer = trained_text_model(steps=40)
    torch.manual_seed(7)
    second = LabelformerForMultiLabelGeneration(first.config)
    second.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in first.state_dict().items()})
    ensemble = LabelformerEnsembleForMultiLabelGeneration.from_members([first, second.eval()])
    texts = [row["text"] for row in make_texts(6, 7)]
    ensemble.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    expected = ensemble.predict_labels(texts, tokenizer=tokenizer, return_scores=True)
    assert any(expected)
    for beams in (1, 3):
        ids = ensemble.generate(**tokenizer(texts, return_tensors="pt", padding=True), num_beams=beams)
        assert ensemble.decode_labels(ids) == [list(p) for p in ensemble.predict_labels(texts, tokenizer, beams)]
    classify = pipeline("multi-label-generation", model=str(tmp_path), trust_remote_code=True)
    for got, want in zip(classify(texts), expected):
        assert [item["label"] for item in got] == list(want)
        assert [item["score"] for item in got] == pytest.approx(list(want.values()), abs=1e-5)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"d_model": 32, "encoder_ffn_dim": 64}, "d_model"), ({"tokenizer_fingerprint": "other"}, "tokenizer_fingerprint"),
     ({"max_labels": 2}, "max_labels"), ({"label_order": "alphabetical"}, "label_order")],
)  # fmt: skip
def test_members_that_cannot_share_a_decision_are_refused(overrides, field):
    first = _members(1)[0]
    torch.manual_seed(1)
    other = LabelformerForMultiLabelGeneration(synthetic_config(init_std=0.02, dropout=0.3, **overrides))
    with pytest.raises(ValueError, match=f"`{field}`"):
        LabelformerEnsembleForMultiLabelGeneration.from_members([first, other])


def test_other_labels_or_heads_or_sizes_are_refused():
    first = _members(1)[0]
    names = {i: f"other_{i}" for i in range(first.config.num_labels)}
    renamed = LabelformerConfig.from_dict({**first.config.to_dict(), "id2label": names, "label_fingerprint": None,
                                           "label2id": {v: k for k, v in names.items()}})  # fmt: skip
    with pytest.raises(ValueError, match="differs from member 0"):
        LabelformerEnsembleForMultiLabelGeneration.from_members([first, LabelformerForMultiLabelGeneration(renamed)])
    with pytest.raises(ValueError, match="at least 2 members"):
        LabelformerEnsembleForMultiLabelGeneration.from_members([first])
    ensemble = LabelformerEnsembleForMultiLabelGeneration.from_members(_members(2))
    with pytest.raises(ValueError, match="LabelformerForMultiLabelGeneration models"):
        LabelformerEnsembleForMultiLabelGeneration.from_members([first, ensemble])
    with pytest.raises(ValueError, match="ensemble_size"):
        LabelformerEnsembleForMultiLabelGeneration(member_config(first.config))
    with pytest.raises(ValueError, match="LabelformerEnsembleForMultiLabelGeneration"):
        LabelformerForMultiLabelGeneration(ensemble.config)
    with pytest.raises(ValueError, match="ensemble_size"):
        synthetic_config(ensemble_size=0)
    from modeling import LabelformerForMultiLabelClassification

    with pytest.raises(ValueError, match="ensemble of 2 Transformers"):
        LabelformerForMultiLabelClassification(ensemble.config)
    ids, mask = _batch()
    with pytest.raises(ValueError, match="inputs_embeds"):
        ensemble(inputs_embeds=torch.zeros(2, 4, 64), decoder_input_ids=torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\['output_attentions'\] is not supported"):
        ensemble(input_ids=ids, decoder_input_ids=ids[:, :1], output_attentions=True)
    with pytest.raises(ValueError, match="cache_implementation='static' is not supported"):
        ensemble.generate(input_ids=ids, attention_mask=mask, num_beams=2, cache_implementation="static")


def test_the_attention_backend_asked_for_runs_in_every_member(tmp_path):
    members = _members(2)
    for member in members:
        member.config._attn_implementation = "eager"
    ensemble = LabelformerEnsembleForMultiLabelGeneration.from_members(members)
    assert [m.config._attn_implementation for m in ensemble.members] == ["eager", "eager"]
    ensemble.save_pretrained(tmp_path)
    for backend in ("eager", "sdpa"):
        reloaded = LabelformerEnsembleForMultiLabelGeneration.from_pretrained(tmp_path, attn_implementation=backend)
        assert {m.config._attn_implementation for m in reloaded.members} == {backend}


def test_int8_copy_quantizes_every_member():
    ensemble = LabelformerEnsembleForMultiLabelGeneration.from_members(_members(2))
    fast = ensemble.quantize_int8()
    ids, mask = _batch()
    quantized = [m for m in fast.modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__]
    per_member = len([m for m in ensemble.members[0].model.modules() if isinstance(m, nn.Linear)])
    assert len(quantized) == 2 * per_member
    assert all(isinstance(m, nn.Linear) for m in ensemble.modules() if type(m).__name__ == "Linear")  # unchanged
    with torch.no_grad():
        sequences = fast.generate(input_ids=ids, attention_mask=mask)
        assert fast.decode_labels(sequences) == [list(p) for p in fast.predict_batch(ids, mask)]
