"""Model cards for the Hub: fill `hub_card.md` from a trained model and its test metrics."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .data_labelformer import shipped_path

logger = logging.get_logger(__name__)

#: The card template: ``hub_card.md`` at the top of the repository (or its installed copy, see `shipped_path`).
HUB_CARD_TEMPLATE = shipped_path("hub_card.md", "hub_card.md")

REUTERS_DESCRIPTION = (
    "Reuters-21578, ApteMod split: 7,770 training and 3,019 test newswire documents from 1987 with "
    "90 topic categories (about 1.24 labels per document). 10% of the training documents (fixed seed) "
    "were held out for validation and early stopping; the test set was used once, at the end."
)

_METRIC_NAMES = {
    "micro_f1": ("f1", "micro-F1"),
    "macro_f1": ("f1", "macro-F1"),
    "example_f1": ("f1", "example-based F1"),
    "subset_accuracy": ("accuracy", "subset accuracy (exact match)"),
    "hamming_loss": ("hamming_loss", "Hamming loss"),
    "jaccard": ("jaccard", "Jaccard index"),
}


#: What the card template's remote-code warning says in place of the list of code files.
CODE_FILES_SLOT = "{{ code_files }}"


def _table(rows: dict[str, Any]) -> str:
    return "\n".join(f"| {key} | {value} |" for key, value in rows.items())


def remote_code_files(model: Any) -> list[str]:
    """The ``.py`` files ``model.save_pretrained`` writes beside the weights, sorted by name.

    The same walk as `transformers.dynamic_module_utils.custom_object_save`: the head's module and the
    config's module, plus every file they import relatively. For a folder already written, list its
    ``*.py`` files instead (`prepare_hub_folder` does).
    """
    from transformers.dynamic_module_utils import get_relative_import_files

    names = set()
    for cls in (type(model), type(model.config)):
        module_file = sys.modules[cls.__module__].__file__
        names.add(Path(module_file).name)
        names.update(Path(needed).name for needed in get_relative_import_files(module_file))
    return sorted(names)


def _card_template(template_path: str | os.PathLike) -> str:
    """The template text with `CODE_FILES_SLOT` where the remote-code warning lists the code files."""
    text = Path(template_path).read_text(encoding="utf-8")
    if CODE_FILES_SLOT not in text:
        raise ValueError(
            f"The card template {str(template_path)!r} has no {CODE_FILES_SLOT} for the remote-code warning: "
            "a card must name every Python file that trust_remote_code=True runs."
        )
    return text


def build_model_card(
    model: Any,
    metrics: dict[str, float] | None = None,
    dataset_name: str = "Reuters-21578 ApteMod",
    dataset_id: str = "reuters21578",
    dataset_description: str = REUTERS_DESCRIPTION,
    training_args: dict[str, Any] | None = None,
    repo_id: str | None = None,
    eval_split: str = "test",
    template_path: str | os.PathLike = HUB_CARD_TEMPLATE,
    code_files: Sequence[str] | None = None,
) -> Any:
    """A `huggingface_hub.ModelCard` from ``hub_card.md`` with metadata and ``model-index`` filled in.

    Args:
        model: a trained Labelformer head.
        metrics: test metrics (keys of `compute_multilabel_metrics`); they go into ``model-index``.
        training_args: hyperparameters to list in the card.
        repo_id: the Hub repository the card is for (used in the code examples).
        code_files: the ``.py`` files the model's folder carries, named in the card's remote-code
            warning; by default those ``save_pretrained`` writes for this model (`remote_code_files`).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if not Path(template_path).is_file():
        raise FileNotFoundError(f"Model card template {str(template_path)!r} not found.")
    template = _card_template(template_path)
    code_files = sorted(code_files) if code_files is not None else remote_code_files(model)
    config = model.config
    head = type(model).__name__
    auto_class = (
        "AutoModelForSequenceClassification"
        if head == "LabelformerForMultiLabelClassification"
        else "AutoModelForSeq2SeqLM"
    )
    name = repo_id.split("/")[-1] if repo_id else f"labelformer-{dataset_id}"
    eval_results = [
        EvalResult(
            task_type="text-classification",
            task_name="Multi-label text classification",
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_split=eval_split,
            metric_type=_METRIC_NAMES[key][0],
            metric_name=_METRIC_NAMES[key][1],
            metric_value=round(float(value), 4),
        )
        for key, value in (metrics or {}).items()
        if key in _METRIC_NAMES
    ]
    card_data = ModelCardData(
        language="en",
        license="other",
        license_name="reuters-21578-research-only",
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["custom_code", "multi-label-classification", "labelformer", "seq2seq", "from-scratch"],
        datasets=[dataset_id],
        metrics=sorted({_METRIC_NAMES[k][0] for k in _METRIC_NAMES}),
        model_name=name,
        eval_results=eval_results or None,
    )
    labels = [config.id2label[i] for i in range(config.num_labels)]
    architecture = {
        "d_model": config.d_model,
        "encoder / decoder layers": f"{config.encoder_layers} / {config.decoder_layers}",
        "attention heads": config.encoder_attention_heads,
        "feed-forward width": config.encoder_ffn_dim,
        "activation": config.activation_function,
        "positions": config.position_embedding_type,
        "norm placement": config.norm_position,
        "source vocabulary": config.vocab_size,
        "label order": config.label_order,
        "min / max labels": f"{config.min_labels} / {config.effective_max_labels}",
        "lexical part": _lexical_part(model),
        "parameters": f"{sum(p.numel() for p in model.parameters()):,}",
    }
    metric_rows = {_METRIC_NAMES[k][1]: f"{v:.4f}" for k, v in (metrics or {}).items() if k in _METRIC_NAMES}
    return ModelCard.from_template(
        card_data,
        template_str=template,
        code_files=", ".join(f"`{name}`" for name in code_files),
        model_name=name,
        repo_id=repo_id or "path/to/model",
        head_class=head,
        auto_class=auto_class,
        num_labels=len(labels),
        labels_preview=", ".join(labels[:10]) + (", ..." if len(labels) > 10 else ""),
        dataset_name=dataset_name,
        dataset_description=dataset_description,
        eval_split=eval_split,
        architecture_table=_table(architecture),
        training_table=_table(training_args or {"(not recorded)": ""}),
        metrics_table=_table(metric_rows) if metric_rows else "| (not evaluated) | |",
    )


def _lexical_part(model: Any) -> str:
    """The architecture table's entry for the optional hybrid part (`LexicalLabelScorer`)."""
    scorer = getattr(model, "lexical_scorer", None)
    if scorer is None:
        return "none"
    return f"tf-idf linear model added to the label logits (scale {float(scorer.scale):g})"


def _head_class(model_dir: Path) -> type:
    import json

    from .classification_labelformer import LabelformerForMultiLabelClassification
    from .generation_labelformer import LabelformerForMultiLabelGeneration
    from .modeling_labelformer import LabelformerForConditionalGeneration, LabelformerModel
    from .parallel_labelformer import LabelformerForParallelLabelGeneration

    heads = {
        cls.__name__: cls
        for cls in (
            LabelformerForMultiLabelGeneration,
            LabelformerForMultiLabelClassification,
            LabelformerForParallelLabelGeneration,
            LabelformerForConditionalGeneration,
            LabelformerModel,
        )
    }
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(model_dir)!r} has no config.json: it is not a saved model folder.")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    for name in architectures:
        if name in heads:
            return heads[name]
    raise ValueError(f"{str(model_dir)!r} holds {architectures}, not a Labelformer model.")


def prepare_hub_folder(model_dir: str | os.PathLike, target: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Write a self-contained Hub folder for the model in ``model_dir`` into ``target``.

    The folder holds safetensors weights, config (``auto_map``, ``custom_pipelines``), the model,
    config and pipeline code, the tokenizer and *our* model card as ``README.md`` (filled with the
    shipped model's metrics from the run's ``test_metrics.json`` and with its ``training_args.json``
    when ``model_dir`` has them; its remote-code warning names every ``.py`` file of the folder),
    plus the run's reports.
    """
    import json
    import shutil

    from transformers import AutoTokenizer

    from .tokenization_labelformer import save_tokenizer

    model_dir, target = Path(model_dir), Path(target)
    model = _head_class(model_dir).from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.save_pretrained(target)
    save_tokenizer(tokenizer, target)
    metrics_file = model_dir / "test_metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    # the training script writes {"calibration", "transformer", "shipped", ...}: the folder holds the shipped model
    metrics = metrics.get("shipped", metrics)
    args_file = model_dir / "training_args.json"
    training_args = None
    if args_file.is_file():
        keep = ("head", "epochs", "batch_size", "learning_rate", "dropout", "label_order", "max_length", "seed")
        training_args = {k: v for k, v in json.loads(args_file.read_text()).items() if k in keep}
    card = build_model_card(
        model, {k: v for k, v in metrics.items() if k in _METRIC_NAMES}, training_args=training_args,
        repo_id=repo_id, code_files=[path.name for path in target.glob("*.py")],
    )  # fmt: skip
    card.save(target / "README.md")
    for report in ("test_metrics.json", "per_label_metrics.md", "training_curve.png"):
        if (model_dir / report).is_file():
            shutil.copyfile(model_dir / report, target / report)
    return target


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload Labelformer model",
) -> Any:
    """Create ``repo_id`` if needed and upload the self-contained folder of `prepare_hub_folder`.

    Returns the commit info of `HfApi.create_commit` (one commit with every file).
    """
    import tempfile

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare_hub_folder(model_dir, tmp, repo_id=repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        ]
        commit = api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)
    logger.info("pushed %s to %s", model_dir, repo_id)
    return commit


__all__ = [
    "HUB_CARD_TEMPLATE",
    "REUTERS_DESCRIPTION",
    "build_model_card",
    "prepare_hub_folder",
    "push_to_hub",
    "remote_code_files",
]
