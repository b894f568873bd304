"""Model cards for the Hub: fill `hub_card.md` from a trained model and its test metrics."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .data_labelformer import shipped_path

logger = logging.get_logger(__name__)

#: The card template: ``hub_card.md`` at the top of the repository (or its installed copy, see `shipped_path`).
HUB_CARD_TEMPLATE = shipped_path("hub_card.md", "hub_card.md")

#: Card metadata licences used as they are; any other licence a user names becomes ``other`` + ``license_name``.
KNOWN_LICENSES = frozenset({
    "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-2.0", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "gpl-2.0", "gpl-3.0", "lgpl-3.0", "odc-by",
    "odbl", "pddl", "openrail", "unknown", "other",
})  # fmt: skip
GENERIC_INTENDED_USE = (
    "Multi-label classification of texts like the training data, with the label set above. The model only "
    "knows the labels it was trained on and is not meant for decisions about people. Rare labels (few "
    "training documents) are predicted much less reliably than frequent ones: see macro-F1 below."
)
REUTERS_INTENDED_USE = (
    "Topic labelling of English newswire-like text with the label set above. The model only knows the labels "
    "it was trained on, was trained on a small data set from the 1980s, and is not meant for decisions about "
    "people. Rare labels (few training documents) are predicted much less reliably than frequent ones: see "
    "macro-F1 below."
)
UNKNOWN_LICENSE_NOTE = (
    "unknown (not given: name it with `--dataset_license` when training or pushing, and check that it allows "
    "sharing a model trained on the data)"
)
REUTERS_SOURCE = (
    "Reuters-21578, ApteMod split: newswire documents from 1987 with topic categories (7,770 training and "
    "3,019 test documents, 90 categories in the full split); the copyright of the texts and annotations "
    "resides with Reuters Ltd., free distribution for research purposes only."
)
REUTERS_CITATION = (
    "Reuters-21578, Distribution 1.0 (David D. Lewis; Reuters Ltd. and Carnegie Group, Inc.), ApteMod split."
)


@dataclass
class TrainingData:
    """What a model card says about the data a model was trained on (see `describe_training_data`).

    Attributes:
        name: shown as "Trained on" and in ``model-index`` (a file name, a Hub data set id, ...).
        description: the card's "Training data" paragraph.
        license: the data's licence as the user gave it, or ``"unknown"``.
        hub_id: a Hub data set id for the card's ``datasets`` metadata (``None`` for local files).
        citation: the data set's citation, if any.
        intended_use: the card's "Intended uses and limits" paragraph.
    """

    name: str
    description: str
    license: str = "unknown"
    hub_id: str | None = None
    citation: str | None = None
    intended_use: str = GENERIC_INTENDED_USE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingData:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def describe_training_data(
    train_file: str | None = None,
    dataset_name: str | None = None,
    dataset_license: str | None = None,
    split_sizes: dict[str, int] | None = None,
    num_labels: int | None = None,
    labels_per_document: float | None = None,
    test_file: str | None = None,
) -> TrainingData:
    """The card's account of a training run's data: the embedded Reuters data when neither ``train_file`` nor
    ``dataset_name`` is given, else the user's file or Hub data set (licence ``dataset_license`` or unknown).

    Args:
        split_sizes: documents per split (``train``, ``validation``, ``test``) as the run used them.
        num_labels: the label vocabulary the model was built with.
        labels_per_document: mean labels per training document.
    """
    sizes = {k: v for k, v in (split_sizes or {}).items() if v is not None}
    counts = ", ".join(f"{sizes[s]:,} {s}" for s in ("train", "validation", "test") if s in sizes)
    run = f" This run used {counts} documents" if counts else ""
    if num_labels is not None:
        per_doc = f" ({labels_per_document:.2f} per training document)" if labels_per_document is not None else ""
        run += f"{',' if run else ' The model has'} {num_labels} labels{per_doc}"
    run += "." if run else ""
    if train_file is None and dataset_name is None:
        return TrainingData(
            name="Reuters-21578 ApteMod",
            description=REUTERS_SOURCE + run + " 10% of the training documents (fixed seed) were held out for "
            "validation and early stopping; the test set was used once, at the end.",
            license=dataset_license or "reuters-21578-research-only",
            hub_id="reuters21578",
            citation=REUTERS_CITATION,
            intended_use=REUTERS_INTENDED_USE,
        )
    if dataset_name is not None:
        source = f"The Hugging Face Hub data set `{dataset_name}`."
        name, hub_id = dataset_name, dataset_name
    else:
        files = [Path(train_file).name] + ([Path(test_file).name] if test_file else [])
        source = f"User-provided data: {' and '.join(f'`{f}`' for f in files)}."
        name, hub_id = Path(train_file).name, None
    return TrainingData(name=name, description=source + run, license=dataset_license or "unknown", hub_id=hub_id)


def _license_metadata(license_text: str) -> dict[str, str]:
    """``license`` (and ``license_name``) card metadata for a licence as the user wrote it."""
    slug = re.sub(r"[^a-z0-9.]+", "-", license_text.strip().lower()).strip("-") or "unknown"
    return {"license": slug} if slug in KNOWN_LICENSES else {"license": "other", "license_name": slug}


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
    data: TrainingData | None = None,
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
        data: the training data (`describe_training_data`); by default "not recorded", licence unknown.
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
    data = data or TrainingData(name="(not recorded)", description="Not recorded with this model.")
    slug = re.sub(r"[^a-z0-9]+", "-", data.name.lower()).strip("-")
    name = repo_id.split("/")[-1] if repo_id else f"labelformer-{slug}"
    eval_results = [
        EvalResult(
            task_type="text-classification",
            task_name="Multi-label text classification",
            dataset_type=data.hub_id or "custom",
            dataset_name=data.name,
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
        **_license_metadata(data.license),
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["custom_code", "multi-label-classification", "labelformer", "seq2seq", "from-scratch"],
        datasets=[data.hub_id] if data.hub_id else None,
        metrics=sorted({_METRIC_NAMES[k][0] for k in _METRIC_NAMES}),
        model_name=name,
        eval_results=eval_results or None,
    )
    labels = [config.id2label[i] for i in range(config.num_labels)]
    architecture = {
        "Transformers in the model": (
            f"{config.ensemble_size} (trained separately; their mean probability decides)"
            if config.ensemble_size > 1
            else 1
        ),
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
        dataset_name=data.name,
        dataset_description=data.description,
        dataset_license=data.license if data.license != "unknown" else UNKNOWN_LICENSE_NOTE,
        intended_use=data.intended_use,
        data_citation=f"- {data.citation}\n" if data.citation else "",
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
    from .ensemble_labelformer import LabelformerEnsembleForMultiLabelGeneration
    from .generation_labelformer import LabelformerForMultiLabelGeneration
    from .modeling_labelformer import LabelformerForConditionalGeneration, LabelformerModel
    from .parallel_labelformer import LabelformerForParallelLabelGeneration

    heads = {
        cls.__name__: cls
        for cls in (
            LabelformerForMultiLabelGeneration,
            LabelformerEnsembleForMultiLabelGeneration,
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


#: What the training script writes beside the model: the `TrainingData` its card describes.
TRAINING_DATA_FILE = "training_data.json"


def training_data_of(model_dir: str | os.PathLike, dataset_license: str | None = None) -> TrainingData:
    """The training data of a saved run: its ``training_data.json``, else what its ``training_args.json``
    says (the data's name, no sizes), else "not recorded". ``dataset_license`` overrides the recorded licence."""
    import json

    model_dir = Path(model_dir)
    if (model_dir / TRAINING_DATA_FILE).is_file():
        data = TrainingData.from_dict(json.loads((model_dir / TRAINING_DATA_FILE).read_text()))
        data.license = dataset_license or data.license
        return data
    if (model_dir / "training_args.json").is_file():
        args = json.loads((model_dir / "training_args.json").read_text())
        return describe_training_data(
            train_file=args.get("train_file"), dataset_name=args.get("dataset_name"), test_file=args.get("test_file"),
            dataset_license=dataset_license or args.get("dataset_license"),
        )  # fmt: skip
    return TrainingData(name="(not recorded)", description="Not recorded with this model.",
                        license=dataset_license or "unknown")  # fmt: skip


def prepare_hub_folder(
    model_dir: str | os.PathLike,
    target: str | os.PathLike,
    repo_id: str | None = None,
    dataset_license: str | None = None,
) -> Path:
    """Write a self-contained Hub folder for the model in ``model_dir`` into ``target``.

    The folder holds safetensors weights, config (``auto_map``, ``custom_pipelines``), the model,
    config and pipeline code, the tokenizer and *our* model card as ``README.md`` (filled with the
    shipped model's metrics from the run's ``test_metrics.json``, its training data (`training_data_of`;
    ``dataset_license`` overrides the licence) and its ``training_args.json`` when ``model_dir`` has them;
    its remote-code warning names every ``.py`` file of the folder), plus the run's reports.
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
        model, {k: v for k, v in metrics.items() if k in _METRIC_NAMES},
        data=training_data_of(model_dir, dataset_license), training_args=training_args, repo_id=repo_id,
        code_files=[path.name for path in target.glob("*.py")],
    )  # fmt: skip
    card.save(target / "README.md")
    for report in ("test_metrics.json", "per_label_metrics.md", "training_curve.png", TRAINING_DATA_FILE):
        if (model_dir / report).is_file():
            shutil.copyfile(model_dir / report, target / report)
    return target


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload Labelformer model",
    dataset_license: str | None = None,
) -> Any:
    """Create ``repo_id`` if needed and upload the self-contained folder of `prepare_hub_folder`.

    Returns the commit info of `HfApi.create_commit` (one commit with every file).
    """
    import tempfile

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare_hub_folder(model_dir, tmp, repo_id=repo_id, dataset_license=dataset_license)
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
    "TRAINING_DATA_FILE",
    "TrainingData",
    "build_model_card",
    "describe_training_data",
    "prepare_hub_folder",
    "push_to_hub",
    "remote_code_files",
    "training_data_of",
]
