"""Model cards for the Hub: fill `hub_card.md` from a trained model and its test metrics."""

from __future__ import annotations

import os
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


def _table(rows: dict[str, Any]) -> str:
    return "\n".join(f"| {key} | {value} |" for key, value in rows.items())


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
) -> Any:
    """A `huggingface_hub.ModelCard` from ``hub_card.md`` with metadata and ``model-index`` filled in.

    Args:
        model: a trained Labelformer head.
        metrics: test metrics (keys of `compute_multilabel_metrics`); they go into ``model-index``.
        training_args: hyperparameters to list in the card.
        repo_id: the Hub repository the card is for (used in the code examples).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if not Path(template_path).is_file():
        raise FileNotFoundError(f"Model card template {str(template_path)!r} not found.")
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
        "parameters": f"{sum(p.numel() for p in model.parameters()):,}",
    }
    metric_rows = {_METRIC_NAMES[k][1]: f"{v:.4f}" for k, v in (metrics or {}).items() if k in _METRIC_NAMES}
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
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


def _head_class(model_dir: Path) -> type:
    import json

    from . import LabelformerForConditionalGeneration, LabelformerModel
    from .multilabel_labelformer import LabelformerForMultiLabelClassification, LabelformerForMultiLabelGeneration
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
    run's ``test_metrics.json`` and ``training_args.json`` when ``model_dir`` has them), plus the
    run's reports.
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
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    args_file = model_dir / "training_args.json"
    training_args = None
    if args_file.is_file():
        keep = ("head", "epochs", "batch_size", "learning_rate", "weight_decay", "warmup_ratio", "dropout",
                "label_order", "max_length", "seed")  # fmt: skip
        training_args = {k: v for k, v in json.loads(args_file.read_text()).items() if k in keep}
    card = build_model_card(
        model, {k: v for k, v in (metrics or {}).items() if k in _METRIC_NAMES}, training_args=training_args,
        repo_id=repo_id,
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


__all__ = ["HUB_CARD_TEMPLATE", "REUTERS_DESCRIPTION", "build_model_card", "prepare_hub_folder", "push_to_hub"]
