"""Hub sharing without a network: push to a fake Hub, reload everything in a fresh process."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import pipeline

from modeling import (
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
    LabelformerForParallelLabelGeneration,
)
from modeling.hub_labelformer import build_model_card, prepare_hub_folder, push_to_hub, remote_code_files

from .isolation import run_isolated
from .synthetic import synthetic_config
from .textdata import make_texts, trained_text_model

TEXTS = [r["text"] for r in make_texts(6, seed=7)]
METRICS = {"micro_f1": 0.91, "macro_f1": 0.6, "example_f1": 0.92, "subset_accuracy": 0.86, "hamming_loss": 0.01,
           "jaccard": 0.9}  # fmt: skip
#: What the training script writes: the calibration, the Transformer alone and the shipped model.
TEST_METRICS = {"calibration": {"lexical_scale": 0.0}, "transformer": {**METRICS, "micro_f1": 0.5}, "shipped": METRICS}
#: Code every label generator's folder carries (among others: the files these import).
GENERATOR_CODE = {
    "configuration_labelformer.py",
    "decoding_labelformer.py",
    "generation_labelformer.py",
    "lexical_labelformer.py",
    "modeling_labelformer.py",
    "pipeline_labelformer.py",
    "prediction_labelformer.py",
}


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    model, tokenizer = trained_text_model()
    folder = tmp_path_factory.mktemp("trained")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "test_metrics.json").write_text(json.dumps(TEST_METRICS))
    (folder / "training_args.json").write_text(json.dumps({"head": "generation", "epochs": 2, "preset": "tiny"}))
    return folder


def code_warning(card_text: str) -> set[str]:
    """The file names the card's remote-code warning lists."""
    match = re.search(r"\*\*custom code\*\*\s*\(([^)]*)\)", card_text)
    assert match, "the card has no remote-code warning"
    return set(re.findall(r"`([^`]+\.py)`", match.group(1)))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> SimpleNamespace:
    """Patch HfApi so that a push writes the commit's files into a local folder."""
    hub = tmp_path / "hub"
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        (hub / repo_id).mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        calls.append(("create_commit", repo_id, commit_message))
        for op in operations:
            target = hub / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = op.path_or_fileobj
            if isinstance(source, (str, Path)):
                source = Path(source).read_bytes()
            target.write_bytes(source if isinstance(source, bytes) else source.read())
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0", pr_url=None)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return SimpleNamespace(root=hub, calls=calls)


def test_push_and_reload_in_a_fresh_process(trained_dir, fake_hub, tmp_path):
    model = LabelformerForMultiLabelGeneration.from_pretrained(trained_dir).eval()
    expected = model.predict_labels(TEXTS, num_beams=2, return_scores=True)
    assert any(expected)
    push_to_hub(trained_dir, "someone/labelformer-tiny")
    repo = fake_hub.root / "someone" / "labelformer-tiny"
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "create_commit"]
    files = {p.name for p in repo.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "test_metrics.json"} <= files
    assert GENERATOR_CODE <= {name for name in files if name.endswith(".py")} == set(remote_code_files(model))
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert "local_files_only" not in json.loads((repo / "tokenizer_config.json").read_text())
    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "generation_labelformer.LabelformerForMultiLabelGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_labelformer.LabelformerConfig"
    assert config["custom_pipelines"]["multi-label-generation"]["impl"].startswith("pipeline_labelformer.")

    result = run_isolated(
        f"""
        import json
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline
        repo = {str(repo)!r}
        texts = {TEXTS!r}
        model = AutoModelForSeq2SeqLM.from_pretrained(repo, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)  # the config is remote code
        classifier = pipeline("multi-label-generation", model=repo, trust_remote_code=True)
        print(json.dumps({{
            "predicted": model.predict_labels(texts, tokenizer=tokenizer, num_beams=2, return_scores=True),
            "pipeline_one": classifier(texts[0], num_beams=2),
            "pipeline_batch": classifier(texts, num_beams=2),
            "tokens": tokenizer(texts[0])["input_ids"],
        }}))
        """,
        cwd=tmp_path,
    )
    assert [list(r) for r in result["predicted"]] == [list(r) for r in expected]
    for got, want in zip(result["predicted"], expected):
        assert got == pytest.approx(want, abs=1e-6)
    as_pipeline = [[{"label": k, "score": pytest.approx(v, abs=1e-6)} for k, v in row.items()] for row in expected]
    assert result["pipeline_one"] == as_pipeline[0]
    assert result["pipeline_batch"] == as_pipeline


def test_pushed_card_is_ours_and_its_metadata_parses(trained_dir, fake_hub):
    push_to_hub(trained_dir, "someone/card-check")
    repo = fake_hub.root / "someone" / "card-check"
    card = ModelCard.load(repo / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert {"custom_code", "multi-label-classification", "labelformer"} <= set(data["tags"])
    # the shipped model's metrics, not the Transformer alone's
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["micro-F1"] == pytest.approx(METRICS["micro_f1"])
    assert results["subset accuracy (exact match)"] == pytest.approx(METRICS["subset_accuracy"])
    assert len(results) == len(METRICS)
    text = card.text
    assert "trust_remote_code=True" in text and "someone/card-check" in text
    assert "Attention Is All You Need" in text and "Reuters-21578, Distribution 1.0" in text
    assert "| head | generation |" in text and "preset" not in text  # training_args.json, the card's keys only
    assert "| lexical part | none |" in text
    # the remote-code warning names exactly the Python files the repository holds
    assert code_warning(text) == {p.name for p in repo.glob("*.py")}
    assert code_warning(text) >= GENERATOR_CODE
    for gone in ("multilabel_labelformer", "lexical_logit_weight", "label_name", "set search", "decoding bias",
                 "eos_logit_bias", "ensemble", "stacking"):  # fmt: skip
        assert gone not in text.lower(), gone


@pytest.mark.parametrize(
    "head", [LabelformerForMultiLabelGeneration, LabelformerForMultiLabelClassification,
             LabelformerForParallelLabelGeneration],
)  # fmt: skip
def test_card_names_the_code_every_head_saves(head, tmp_path):
    """The default list (without a folder) is what `save_pretrained` writes, for every head."""
    lexical = head is not LabelformerForParallelLabelGeneration
    model = head(synthetic_config(lexical_scorer=lexical)).eval()
    if lexical:
        model.lexical_scorer.scale.fill_(2.0)
    model.save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.glob("*.py")}
    assert set(remote_code_files(model)) == saved
    card = build_model_card(model, {"micro_f1": 0.5})
    assert code_warning(card.text) == saved
    assert ("| lexical part | tf-idf linear model added to the label logits (scale 2) |" in card.text) == lexical
    auto = "AutoModelForSequenceClassification" if head is LabelformerForMultiLabelClassification else "Seq2SeqLM"
    assert auto in card.text and head.__name__ in card.text
    # a template without the slot for the code files is refused
    template = tmp_path / "template.md"
    template.write_text("---\n{{ card_data }}\n---\nNo warning here.\n")
    with pytest.raises(ValueError, match="code_files"):
        build_model_card(model, template_path=template)


def test_push_to_hub_example_dry_run_writes_the_folder(trained_dir, tmp_path):
    from examples.push_to_hub import main

    target = tmp_path / "dry"
    assert main(["--model_dir", str(trained_dir), "--repo_id", "someone/dry", "--dry_run", str(target)]) == 0
    assert (target / "model.safetensors").is_file() and (target / "test_metrics.json").is_file()
    assert code_warning((target / "README.md").read_text()) == {p.name for p in target.glob("*.py")}
    assert main(["--model_dir", str(tmp_path / "missing"), "--repo_id", "someone/x", "--dry_run", str(target)]) == 2
    assert prepare_hub_folder(trained_dir, tmp_path / "again") == tmp_path / "again"


def test_an_ensemble_folder_is_prepared_for_the_hub(trained_dir, tmp_path):
    from modeling import LabelformerEnsembleForMultiLabelGeneration, LabelformerForMultiLabelGeneration

    member = LabelformerForMultiLabelGeneration.from_pretrained(trained_dir)
    ensemble = LabelformerEnsembleForMultiLabelGeneration.from_members([member, member])
    folder = tmp_path / "ensemble"
    ensemble.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "test_metrics.json", "training_args.json"):
        shutil.copy(trained_dir / name, folder / name)
    target = prepare_hub_folder(folder, tmp_path / "hub")
    card = (target / "README.md").read_text()
    assert "LabelformerEnsembleForMultiLabelGeneration" in card and "| Transformers in the model | 2 " in card
    assert "ensemble_labelformer.py" in code_warning(card)


def test_pipeline_in_process(trained_dir):
    model = LabelformerForMultiLabelGeneration.from_pretrained(trained_dir)
    classifier = pipeline("multi-label-generation", model=str(trained_dir), trust_remote_code=True)
    outputs = classifier(TEXTS)
    assert [[x["label"] for x in row] for row in outputs] == model.predict_labels(TEXTS)
    with pytest.raises(ValueError, match=r"^The text is empty"):
        classifier("   ")
    with pytest.raises(ValueError, match=r"^The text is empty"):  # a generator's items have no index to name
        list(classifier(text for text in [TEXTS[0], "  "]))
    with pytest.raises(ValueError, match="must be a string, got list"):  # a list item would lose all but one text
        list(classifier(texts for texts in [TEXTS[:2]]))


def test_loading_refuses_pickle_mismatched_labels_and_missing_weights(trained_dir, tmp_path):
    model = LabelformerForMultiLabelGeneration.from_pretrained(trained_dir)
    # a folder with only pickle weights
    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        LabelformerForMultiLabelGeneration.from_pretrained(pickled)
    # label maps edited to disagree with the weights
    edited = tmp_path / "edited"
    model.save_pretrained(edited)
    config = json.loads((edited / "config.json").read_text())
    config["id2label"]["3"] = "extra"
    config["label2id"]["extra"] = 3
    config["decoder_vocab_size"] += 1
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit its config|not a complete"):
        LabelformerForMultiLabelGeneration.from_pretrained(edited)
    # weights missing from the checkpoint
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    model.save_pretrained(partial)
    tensors = load_file(partial / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if "decoder.layers.0.cross_attn" not in k}
    save_file(kept, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a complete LabelformerForMultiLabelGeneration checkpoint"):
        LabelformerForMultiLabelGeneration.from_pretrained(partial)
    loose = LabelformerForMultiLabelGeneration.from_pretrained(partial, strict=False)
    assert isinstance(loose, LabelformerForMultiLabelGeneration)
