"""Multi-label data: loading, label vocabularies, label-sequence targets and batch collation.

A multi-label data set here is any table with a text column and a label column, where labels are
either a list of strings or one string with a delimiter. Everything is normalised to two columns,
``text`` (str) and ``labels`` (list of str).

Label ids are assigned by descending training-set frequency (ties alphabetically), so the
``"frequency"`` target order (most frequent label first, as in SGM, Yang et al. 2018) is simply
ascending label id.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import site
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .configuration_labelformer import EOS_TOKEN_ID, NUM_SPECIAL_DECODER_TOKENS, LabelformerConfig

logger = logging.get_logger(__name__)

#: The repository root: where the files outside the packages live in a checkout or an editable install.
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Where a regular (non-editable) install puts them: setup.cfg's ``[options.data_files]`` installs
#: ``hub_card.md`` and ``data/reuters21578/*`` under ``<prefix>/share/labelformer``.
INSTALLED_SHARE = Path("share") / "labelformer"


def shipped_path(repo_relative: str, installed_relative: str) -> Path:
    """A file or folder shipped beside the packages, wherever this install keeps it.

    ``repo_relative`` is its place under the repository root (a checkout or ``pip install -e``),
    ``installed_relative`` its place under ``<prefix>/share/labelformer`` after ``pip install`` of a
    wheel (``sys.prefix``, then the user base of ``pip install --user``). Returns the first that
    exists; if none does, the repository path, so an error names where the file belongs.
    """
    candidates = [REPO_ROOT / repo_relative]
    for prefix in dict.fromkeys((sys.prefix, site.USER_BASE)):
        if prefix:
            candidates.append(Path(prefix) / INSTALLED_SHARE / installed_relative)
    return next((path for path in candidates if path.exists()), candidates[0])


def reuters_dir() -> Path:
    """The folder of the embedded default data set (Reuters-21578 ApteMod: ``train.jsonl.gz``, ``test.jsonl.gz``)."""
    return shipped_path("data/reuters21578", "reuters21578")


#: The embedded default data set, as found when the package was imported (see `reuters_dir`).
REUTERS_DIR = reuters_dir()
_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".tsv": "csv"}
#: Characters that join several labels in one string; such a string without ``label_delimiter`` is refused.
LIKELY_DELIMITERS = (";", "|", ",")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _format_of(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    suffix = Path(name).suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"Cannot read {path!r}: the extension must be one of {sorted(_FORMATS)} (optionally .gz).")
    return _FORMATS[suffix]


def normalize_labels(value: Any, delimiter: str | None, where: str) -> list[str]:
    """A row's labels as a list of unique, stripped strings (order kept).

    Raises:
        ValueError: the value is neither a list of strings nor a string, naming ``where``.
    """
    if isinstance(value, str):
        parts = value.split(delimiter) if delimiter else [value]  # "" keeps the string whole
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        parts = list(value)
    else:
        raise ValueError(
            f"{where}: labels must be a list of strings or a string (split with --label_delimiter), "
            f"got {type(value).__name__} {value!r}."
        )
    return list(dict.fromkeys(p.strip() for p in parts if p.strip()))


def _unreadable(files: dict[str, str], fmt: str, error: Exception) -> ValueError:
    """A clear error for data files `datasets` could not parse: the first bad line of JSON lines files."""
    for path in files.values() if fmt == "json" else ():
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
        except (OSError, UnicodeDecodeError) as bad:
            return ValueError(f"Could not read {path}: {bad}.")
        if lines and lines[0][1].lstrip().startswith("{"):  # JSON lines (not one JSON document)
            for n, line in lines:
                try:
                    json.loads(line)
                except json.JSONDecodeError as bad:
                    return ValueError(f"{path} line {n}: not valid JSON ({bad.msg}, column {bad.colno}).")
    cause = error.__cause__ or error
    names = ", ".join(files.values())
    return ValueError(f"Could not read {names} as {fmt}: {type(cause).__name__}: {str(cause).splitlines()[0]}")


def _check_delimiter(where: str, value: Any) -> None:
    """Refuse a string label that looks like several labels joined (``"grain;wheat"``) when no delimiter is set."""
    for char in LIKELY_DELIMITERS:
        if isinstance(value, str) and char in value:
            raise ValueError(
                f"{where}: the label {value!r} looks like several labels joined by {char!r}. Pass --label_delimiter "
                f"'{char}' (label_delimiter='{char}') to split them, or --label_delimiter '' to keep each string as "
                "one label."
            )


def load_multilabel_dataset(
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    text_column: str = "text",
    label_column: str = "labels",
    label_delimiter: str | None = None,
    validation_fraction: float = 0.1,
    seed: int = 42,
    max_train_samples: int | None = None,
    allow_empty_labels: bool = True,
):
    """Load a multi-label data set as a `datasets.DatasetDict` with ``train``, ``validation`` and ``test``.

    With no arguments, the embedded Reuters-21578 ApteMod files are used. Local files may be
    jsonl/json/csv/tsv/parquet (optionally gzipped); ``dataset_name`` is a Hub data set for users
    with a network. Without a validation split, ``validation_fraction`` of train is carved out with
    ``seed`` (never tune on test). String labels are split at ``label_delimiter``; without one, a
    string that contains ``;``, ``|`` or ``,`` is refused (pass ``""`` to keep strings whole). With
    ``allow_empty_labels=False`` a training row without labels is refused. Errors name the file and
    its 1-based line (JSON lines) or row (other formats).

    Returns:
        DatasetDict whose splits have columns ``text`` (str) and ``labels`` (list of str).
    """
    import datasets

    if dataset_name is None and train_file is None:
        folder = reuters_dir()
        if not (folder / "train.jsonl.gz").is_file():
            raise FileNotFoundError(
                f"The embedded Reuters-21578 data is not in {str(folder)!r} (nor under "
                f"<prefix>/{INSTALLED_SHARE.as_posix()}/reuters21578). Install Labelformer from its repository "
                "(pip install -e . or a wheel built from it), or pass train_file= / dataset_name=."
            )
        train_file = str(folder / "train.jsonl.gz")
        test_file = test_file or str(folder / "test.jsonl.gz")
    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, dataset_config_name)
    else:
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        files = {split: path for split, path in files.items() if path is not None}
        for split, path in files.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"The {split} file {path!r} does not exist.")
        formats = {_format_of(path) for path in files.values()}
        if len(formats) > 1:
            raise ValueError(f"All data files must have one format, got {sorted(formats)}.")
        fmt = formats.pop()
        kwargs = {"delimiter": "\t"} if any(p.endswith((".tsv", ".tsv.gz")) for p in files.values()) else {}
        try:
            raw = datasets.load_dataset(fmt, data_files=files, **kwargs)
        except Exception as error:  # datasets wraps parser errors in DatasetGenerationError
            raise _unreadable(files, fmt, error) from error
    if "train" not in raw:
        raise ValueError(f"The data set has no 'train' split (splits: {list(raw)}).")

    def normalise(split: str, ds):
        missing = [c for c in (text_column, label_column) if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"The {split} split has no column {missing[0]!r}; its columns are {ds.column_names}. "
                "Name the right ones with --text_column / --label_column."
            )
        texts, labels, empty = [], [], 0
        path = files.get(split) if dataset_name is None else None
        unit = "line" if path is not None and _format_of(path) == "json" else "row"
        for i, (text, value) in enumerate(zip(ds[text_column], ds[label_column])):
            where = f"{path or split} {unit} {i + 1}"
            if not isinstance(text, str):
                raise ValueError(f"{where}: the text must be a string, got {type(text).__name__}.")
            if label_delimiter is None:
                _check_delimiter(where, value)
            empty += not text.strip()
            texts.append(text)
            labels.append(normalize_labels(value, label_delimiter, where))
            if split == "train" and not labels[-1] and not allow_empty_labels:
                raise ValueError(
                    f"{where} has no labels. Remove it, or allow empty label sets (--allow_empty_labels, "
                    "allow_empty_labels=True)."
                )
        if empty:
            logger.warning(
                "%s: %d of %d texts are empty; they are kept (the model sees only EOS).", split, empty, len(ds)
            )
        return datasets.Dataset.from_dict({"text": texts, "labels": labels})

    splits = {split: normalise(split, ds) for split, ds in raw.items()}
    if "validation" not in splits:
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"`validation_fraction` must be in (0, 1), got {validation_fraction}.")
        carved = splits["train"].train_test_split(test_size=validation_fraction, seed=seed)
        splits["train"], splits["validation"] = carved["train"], carved["test"]
    if max_train_samples is not None:
        splits["train"] = splits["train"].select(range(min(max_train_samples, len(splits["train"]))))
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------------
# Label vocabulary
# ---------------------------------------------------------------------------------------------


def build_label_vocabulary(label_sets: Iterable[Sequence[str]], allow_empty: bool = False) -> list[str]:
    """All labels of the training data, most frequent first (ties alphabetically).

    Raises:
        ValueError: a row has no labels and ``allow_empty`` is False (the error names the row).
    """
    counts: Counter[str] = Counter()
    for i, labels in enumerate(label_sets):
        if not labels and not allow_empty:
            raise ValueError(
                f"Training row {i} has no labels. Remove it, or allow empty label sets "
                "(allow_empty=True / --allow_empty_labels, which sets min_labels=0)."
            )
        counts.update(labels)
    if not counts:
        raise ValueError("The training data has no labels at all.")
    return sorted(counts, key=lambda label: (-counts[label], label))


def split_unknown_labels(
    label_sets: Iterable[Sequence[str]], label2id: dict[str, int]
) -> tuple[list[list[str]], Counter[str]]:
    """Drop labels the model does not know; returns the kept label sets and a count of the dropped ones."""
    kept, unknown = [], Counter()
    for labels in label_sets:
        kept.append([label for label in labels if label in label2id])
        unknown.update(label for label in labels if label not in label2id)
    return kept, unknown


def report_unknown_labels(unknown: Counter[str], split: str) -> None:
    """Log labels found in ``split`` but never seen in training (they cannot be predicted)."""
    if unknown:
        top = ", ".join(f"{label} ({n})" for label, n in unknown.most_common(10))
        logger.warning(
            "%s: %d occurrences of %d labels unseen in training cannot be predicted (the model has no token for "
            "them): %s",
            split,
            sum(unknown.values()),
            len(unknown),
            top,
        )


def order_label_ids(label_ids: Sequence[int], order: str, rng: random.Random | None = None) -> list[int]:
    """Write a label set as a sequence: ``frequency`` (ascending id), ``alphabetical`` or ``random``.

    ``alphabetical`` needs names: pass ids already sorted by name through `order_labels` instead.
    """
    if order == "random":
        shuffled = list(label_ids)
        (rng or random).shuffle(shuffled)
        return shuffled
    return sorted(label_ids)


def order_labels(
    labels: Sequence[str], label2id: dict[str, int], order: str, rng: random.Random | None = None
) -> list[int]:
    """Label names -> label ids in the target order given by ``order`` (see `LabelformerConfig.label_order`)."""
    ids = [label2id[label] for label in labels]
    if order == "alphabetical":
        return [label2id[label] for label in sorted(labels)]
    return order_label_ids(ids, order, rng)


def label_target(label_ids: Sequence[int]) -> list[int]:
    """Decoder target for one document: label tokens (label id + 3) followed by EOS."""
    return [i + NUM_SPECIAL_DECODER_TOKENS for i in label_ids] + [EOS_TOKEN_ID]


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Shuffled indices in which each run of ``batch_size`` has similar lengths (less padding).

    Each epoch: a seeded permutation is cut into mega-batches of ``batch_size * mega_batches``
    rows, each mega-batch is sorted by length (longest first) and cut into batches, and the order
    of all batches is shuffled. The order depends only on ``(seed, epoch)``, so a resumed run
    sees the same batches. Use it as a DataLoader ``sampler`` with the same ``batch_size`` and
    call `set_epoch` before each epoch.

    Args:
        lengths: tokens per row (after truncation), one per row of the data set.
        batch_size: rows per batch.
        mega_batches: batches per sorted group; larger = less padding, less randomness.
        seed: base seed of the permutation.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, mega_batches: int = 50, seed: int = 0) -> None:
        if batch_size < 1 or mega_batches < 1:
            raise ValueError(f"batch_size and mega_batches must be >= 1, got {batch_size} and {mega_batches}.")
        self.lengths = torch.as_tensor(list(lengths))
        self.batch_size = batch_size
        self.group = batch_size * mega_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """This epoch's batches of row indices (the last one may be short)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        batches = []
        for start in range(0, len(order), self.group):
            chunk = order[start : start + self.group]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)].tolist()
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # keep the (possibly short) last batch last, so that only one batch is ever partial
        last = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return shuffled + last

    def __iter__(self):
        for batch in self.batches():
            yield from batch


# ---------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------


@dataclass
class MultiLabelCollator:
    """Turn rows ``{"text": str, "labels": [str]}`` into a model batch.

    For ``head="generation"`` the batch has ``labels`` ``[b, t]``: each label set in the
    config's ``label_order`` then EOS, padded with -100. ``"random"`` order draws a new
    permutation each time a row is collated, so every epoch sees fresh orders. For
    ``head="classification"`` ``labels`` is a ``[b, num_labels]`` 0/1 float matrix.
    Labels unknown to the config are dropped (count them with `split_unknown_labels` first).

    Rows that carry a ``row`` index get their random order from ``(seed, epoch, row)`` alone, so
    the targets of an epoch do not depend on which batches were collated before (exact resume).
    """

    tokenizer: Any
    config: LabelformerConfig
    max_length: int = 256
    head: str = "generation"
    seed: int = 0
    epoch: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if self.head not in ("generation", "classification", "parallel"):
            raise ValueError(f"`head` must be 'generation', 'classification' or 'parallel', got {self.head!r}.")
        self.rng = random.Random(self.seed)

    def _rng_for(self, row: dict[str, Any]) -> random.Random:
        if "row" in row:
            return random.Random(f"{self.seed}:{self.epoch}:{row['row']}")
        return self.rng

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            [row["text"] for row in rows],
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        label2id = self.config.label2id
        label_sets = [[label for label in row["labels"] if label in label2id] for row in rows]
        if self.head == "classification":
            targets = torch.zeros(len(rows), self.config.num_labels)
            for i, labels in enumerate(label_sets):
                targets[i, [label2id[label] for label in labels]] = 1.0
        else:
            order = self.config.label_order
            sequences = [
                label_target(order_labels(labels, label2id, order, self._rng_for(row)))
                for row, labels in zip(rows, label_sets)
            ]
            targets = torch.full((len(rows), max(map(len, sequences))), -100, dtype=torch.long)
            for i, sequence in enumerate(sequences):
                targets[i, : len(sequence)] = torch.tensor(sequence)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": targets}


__all__ = [
    "INSTALLED_SHARE",
    "REPO_ROOT",
    "REUTERS_DIR",
    "LengthGroupedSampler",
    "MultiLabelCollator",
    "build_label_vocabulary",
    "label_target",
    "load_multilabel_dataset",
    "normalize_labels",
    "order_label_ids",
    "order_labels",
    "report_unknown_labels",
    "reuters_dir",
    "shipped_path",
    "split_unknown_labels",
]
