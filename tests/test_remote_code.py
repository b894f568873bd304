"""Saved folders are self-contained: they load through Auto classes without our packages."""

from __future__ import annotations

import json

import pytest
import torch

from modeling import LabelformerForConditionalGeneration, LabelformerModel

from .conftest import random_batch, tiny_config
from .isolation import run_isolated


def test_saved_folder_loads_with_auto_classes_in_a_fresh_process(tmp_path):
    config = tiny_config(norm_position="pre")
    model = LabelformerForConditionalGeneration(config).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)

    saved = json.loads((folder / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_labelformer.LabelformerConfig",
        "AutoModel": "modeling_labelformer.LabelformerModel",
        "AutoModelForSeq2SeqLM": "modeling_labelformer.LabelformerForConditionalGeneration",
    }
    # the real config file, not the re-export stub, is in the folder
    assert "class LabelformerConfig" in (folder / "configuration_labelformer.py").read_text()

    input_ids, attention_mask, _ = random_batch(config)
    kwargs = dict(max_new_tokens=6, num_beams=2)
    expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs).tolist()
    base_model = LabelformerModel.from_pretrained(folder).eval()
    decoder_input_ids = torch.tensor(expected)[:, :4]
    expected_hidden = base_model(
        input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids
    ).last_hidden_state

    result = run_isolated(
        f"""
        import json, torch
        from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM
        folder = {str(folder)!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        ids = torch.tensor({input_ids.tolist()}); mask = torch.tensor({attention_mask.tolist()})
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=2)
        hidden = base(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor({decoder_input_ids.tolist()}))
        print(json.dumps({{
            "config": type(config).__name__, "model": type(model).__name__, "base": type(base).__name__,
            "module": type(model).__module__, "generated": out.tolist(),
            "hidden": hidden.last_hidden_state.tolist(),
        }}))
        """,
        cwd=tmp_path,
    )
    assert result["config"] == "LabelformerConfig"
    assert result["model"] == "LabelformerForConditionalGeneration"
    assert result["base"] == "LabelformerModel"
    assert result["module"].startswith("transformers_modules")
    assert result["generated"] == expected
    torch.testing.assert_close(torch.tensor(result["hidden"]), expected_hidden, atol=1e-5, rtol=1e-5)


TEXTS = ["wheat prices rise in chicago", "corn and wheat harvest", "company earnings up", "merger talks"]
TEXT_LABELS = [["wheat"], ["corn", "wheat"], ["earn"], ["acq"]]


def _saved_multilabel_heads(folder):
    """Both multi-label heads with a fitted lexical part (and the threshold head with a folded threshold), saved."""
    from modeling import (
        LabelformerConfig,
        LabelformerForMultiLabelClassification,
        LabelformerForMultiLabelGeneration,
        fit_lexical_scorer,
        train_tokenizer,
    )

    tokenizer = train_tokenizer(TEXTS * 5, vocab_size=60)
    names = ["wheat", "corn", "earn", "acq"]
    config = LabelformerConfig.from_labels(
        names,
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        norm_position="pre",
        lexical_scorer=True,
    )
    heads = {
        "generation": LabelformerForMultiLabelGeneration(config),
        "classification": LabelformerForMultiLabelClassification(LabelformerConfig.from_dict(config.to_dict())),
    }
    targets = torch.tensor([[name in labels for name in names] for labels in TEXT_LABELS], dtype=torch.float32)
    for name, head in heads.items():
        fit_lexical_scorer(head.lexical_scorer, tokenizer(TEXTS)["input_ids"], targets, tokenizer.all_special_ids)
        head.lexical_scorer.scale.fill_(0.5)
        head.eval()
        if name == "classification":
            head.fold_threshold(0.4)
        head.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    return heads, tokenizer


def test_auto_classes_pick_the_saved_head_in_process(tmp_path):
    from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    heads, _tokenizer = _saved_multilabel_heads(tmp_path)
    assert type(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "generation")) is type(heads["generation"])
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "classification")
    assert type(loaded) is type(heads["classification"])
    assert type(AutoModel.from_pretrained(tmp_path / "generation")) is LabelformerModel
    loaded.eval()  # (from_pretrained leaves models in eval mode, but be explicit)
    torch.testing.assert_close(loaded.classifier.bias, heads["classification"].classifier.bias)  # folded threshold
    torch.testing.assert_close(loaded.lexical_scorer.weight, heads["classification"].lexical_scorer.weight)
    # the tokenizer saved beside the model is found on its own
    assert loaded.predict_labels(TEXTS) == heads["classification"].predict_labels(TEXTS, tokenizer=_tokenizer)


def test_multilabel_folders_load_in_a_fresh_process(tmp_path):
    heads, tokenizer = _saved_multilabel_heads(tmp_path)
    for name in heads:  # the code of the optional lexical part and of fast decoding travels with the weights
        assert {"lexical_labelformer.py", "decoding_labelformer.py"} <= {p.name for p in (tmp_path / name).iterdir()}
    expected = {
        "generation": heads["generation"].predict_labels(TEXTS, tokenizer=tokenizer, num_beams=2, return_scores=True),
        "classification": heads["classification"].predict_labels(TEXTS, tokenizer=tokenizer, return_scores=True),
    }
    result = run_isolated(
        f"""
        import json
        from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
        root = {str(tmp_path)!r}
        gen = AutoModelForSeq2SeqLM.from_pretrained(root + "/generation", trust_remote_code=True)
        cls = AutoModelForSequenceClassification.from_pretrained(root + "/classification", trust_remote_code=True)
        texts = {TEXTS!r}
        print(json.dumps({{
            "classes": [type(gen).__name__, type(cls).__name__],
            "generation": gen.predict_labels(texts, num_beams=2, return_scores=True),
            "classification": cls.predict_labels(texts, return_scores=True),
        }}))
        """,
        cwd=tmp_path,
    )
    assert result["classes"] == ["LabelformerForMultiLabelGeneration", "LabelformerForMultiLabelClassification"]
    for name in ("generation", "classification"):
        assert [list(r) for r in result[name]] == [list(r) for r in expected[name]]
        for got, want in zip(result[name], expected[name]):
            assert got == pytest.approx(want, abs=1e-5)
