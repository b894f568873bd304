"""Data loading, label vocabulary and unknown labels."""

from __future__ import annotations

import configparser
import gzip
import json
import logging
import random
import shutil
import site
import sys
from pathlib import Path

import pytest

from modeling import (
    LabelformerConfig,
    MultiLabelCollator,
    build_label_vocabulary,
    data_labelformer,
    hub_labelformer,
    load_multilabel_dataset,
    split_unknown_labels,
    train_tokenizer,
)
from modeling.data_labelformer import REPO_ROOT, label_target, normalize_labels, order_labels, report_unknown_labels

SPECIAL = 3


def write_jsonl(path, rows, compress=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if compress:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


ROWS = [{"body": f"document {i}", "topics": ["a", "b"] if i % 3 == 0 else ["a"]} for i in range(20)]


def test_label_vocabulary_is_frequency_ordered_and_rejects_empty_rows():
    assert build_label_vocabulary([["b", "c"], ["c"], ["a", "c"], ["b"]]) == ["c", "b", "a"]
    with pytest.raises(ValueError, match="Training row 1 has no labels"):
        build_label_vocabulary([["a"], []])
    assert build_label_vocabulary([["a"], []], allow_empty=True) == ["a"]


def test_unknown_labels_are_counted_not_fatal(caplog):
    kept, unknown = split_unknown_labels([["a", "x"], ["y", "x"], ["b"]], {"a": 0, "b": 1})
    assert kept == [["a"], [], ["b"]]
    assert unknown == {"x": 2, "y": 1}
    logger = logging.getLogger("modeling.data_labelformer")
    logger.addHandler(caplog.handler)
    try:
        report_unknown_labels(unknown, "test")
    finally:
        logger.removeHandler(caplog.handler)
    assert "3 occurrences of 2 labels unseen in training" in caplog.text


def test_normalize_labels():
    assert normalize_labels("a; b ;a", ";", "row 0") == ["a", "b"]
    assert normalize_labels(["x", "y", "x"], None, "row 0") == ["x", "y"]
    with pytest.raises(ValueError, match="row 3: labels must be a list of strings or a string"):
        normalize_labels(7, None, "row 3")


def test_label_orders():
    label2id = {"earn": 0, "acq": 1, "grain": 2, "wheat": 3}
    labels = ["wheat", "earn", "grain"]
    assert order_labels(labels, label2id, "frequency") == [0, 2, 3]
    assert order_labels(labels, label2id, "alphabetical") == [0, 2, 3]  # earn, grain, wheat
    assert order_labels(["wheat", "acq"], label2id, "alphabetical") == [1, 3]
    seen = {tuple(order_labels(labels, label2id, "random", random.Random(s))) for s in range(30)}
    assert len(seen) > 1 and all(sorted(p) == [0, 2, 3] for p in seen)
    assert label_target([0, 2, 3]) == [3, 5, 6, 2]


@pytest.mark.parametrize("order", ["frequency", "alphabetical", "random"])
def test_collator_builds_ordered_targets(order):
    tokenizer = train_tokenizer(["alpha beta gamma delta"] * 10, vocab_size=40)
    config = LabelformerConfig.from_labels(["z", "a", "m"], vocab_size=len(tokenizer), label_order=order)
    collator = MultiLabelCollator(tokenizer, config, max_length=8)
    rows = [{"text": "alpha beta", "labels": ["m", "z", "a"]}, {"text": "gamma", "labels": ["a", "unknown"]}]
    epochs = [collator(rows)["labels"] for _ in range(8)]
    first = epochs[0]
    assert first[1].tolist() == [1 + SPECIAL, 2, -100, -100]  # unknown labels are dropped
    expected = {"frequency": [3, 4, 5, 2], "alphabetical": [4, 5, 3, 2]}
    if order == "random":
        assert len({tuple(e[0].tolist()) for e in epochs}) > 1  # re-shuffled on every pass
        assert all(sorted(e[0, :3].tolist()) == [3, 4, 5] and e[0, 3] == 2 for e in epochs)
        # rows with a `row` index draw their order from (seed, epoch, row) alone: batch-independent
        indexed = [{**row, "row": i} for i, row in enumerate(rows)]
        alone = MultiLabelCollator(tokenizer, config, max_length=8, epoch=3)([indexed[0]])["labels"][0]
        together = MultiLabelCollator(tokenizer, config, max_length=8, epoch=3)(indexed[::-1])["labels"][1]
        assert alone.tolist() == together.tolist()
    else:
        assert first[0].tolist() == expected[order]
    classification = MultiLabelCollator(tokenizer, config, head="classification")(rows)["labels"]
    assert classification.tolist() == [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="`head` must be"):
        MultiLabelCollator(tokenizer, config, head="ranking")


def test_jsonl_with_custom_columns_and_carved_validation(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl.gz", ROWS, compress=True)
    ds = load_multilabel_dataset(train_file=train, text_column="body", label_column="topics", validation_fraction=0.25)
    assert set(ds) == {"train", "validation"}
    assert len(ds["train"]) == 15 and len(ds["validation"]) == 5
    assert ds["train"].column_names == ["text", "labels"]
    again = load_multilabel_dataset(
        train_file=train, text_column="body", label_column="topics", validation_fraction=0.25
    )
    assert again["validation"]["text"] == ds["validation"]["text"]  # fixed seed


def test_csv_with_delimited_labels(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("text,tags\n" + "".join(f"doc {i},a|b\n" for i in range(10)))
    val = tmp_path / "val.csv"
    val.write_text("text,tags\nhello,b\n")
    ds = load_multilabel_dataset(
        train_file=str(csv), validation_file=str(val), label_column="tags", label_delimiter="|"
    )
    assert ds["train"][0]["labels"] == ["a", "b"] and ds["validation"]["labels"] == [["b"]]


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_multilabel_dataset(train_file=str(tmp_path / "missing.jsonl"))
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ValueError, match="no column 'text'; its columns are"):
        load_multilabel_dataset(train_file=train, label_column="topics")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "labels": 3}])
    with pytest.raises(ValueError, match="bad.jsonl line 1: labels must be a list"):
        load_multilabel_dataset(train_file=bad)
    xml = tmp_path / "train.xml"
    xml.write_text("<docs/>")
    with pytest.raises(ValueError, match="extension"):
        load_multilabel_dataset(train_file=str(xml))


@pytest.mark.parametrize("char", [";", "|", ","])
def test_joined_string_labels_need_a_delimiter(tmp_path, char):
    csv = tmp_path / "train.csv"
    csv.write_text(
        "text,tags\n" + "".join(f'doc {i},"{"grain" + char + "wheat" if i == 3 else "earn"}"\n' for i in range(8))
    )
    with pytest.raises(ValueError) as error:
        load_multilabel_dataset(train_file=str(csv), label_column="tags")
    assert f"train.csv row 4: the label 'grain{char}wheat' looks like several labels" in str(error.value)
    assert f"--label_delimiter '{char}'" in str(error.value)
    split = load_multilabel_dataset(
        train_file=str(csv), label_column="tags", label_delimiter=char, validation_fraction=0.5
    )
    whole = load_multilabel_dataset(
        train_file=str(csv), label_column="tags", label_delimiter="", validation_fraction=0.5
    )
    everything = [*split["train"]["labels"], *split["validation"]["labels"]]
    assert ["grain", "wheat"] in everything and [f"grain{char}wheat"] not in everything
    assert [f"grain{char}wheat"] in [*whole["train"]["labels"], *whole["validation"]["labels"]]


def test_errors_name_the_file_and_its_1_based_line(tmp_path):
    rows = [{"text": f"doc {i}", "labels": ["a"]} for i in range(30)]
    rows[16]["labels"] = []  # line 17
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    load_multilabel_dataset(train_file=train)  # empty label sets are allowed unless refused
    with pytest.raises(ValueError, match=r"train.jsonl line 17 has no labels.*--allow_empty_labels"):
        load_multilabel_dataset(train_file=train, allow_empty_labels=False)
    good = write_jsonl(tmp_path / "good.jsonl", rows[:16])
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]) + '{"text": "x", "labels": ["a"\n')
    with pytest.raises(ValueError, match=r"broken.jsonl line 5: not valid JSON"):
        load_multilabel_dataset(train_file=str(broken))
    with pytest.raises(ValueError, match=r"broken.jsonl line 5: not valid JSON"):
        load_multilabel_dataset(train_file=good, test_file=str(broken))


def test_embedded_reuters_is_the_default():
    ds = load_multilabel_dataset()
    assert len(ds["train"]) + len(ds["validation"]) == 7770
    assert len(ds["test"]) == 3019
    labels = build_label_vocabulary(ds["train"]["labels"])
    assert labels[:2] == ["earn", "acq"]


def test_length_grouped_sampler_covers_every_row_once_with_homogeneous_batches():
    from modeling.data_labelformer import LengthGroupedSampler

    g = __import__("random").Random(0)
    lengths = [g.randint(1, 500) for _ in range(1003)]
    sampler = LengthGroupedSampler(lengths, batch_size=16, mega_batches=8, seed=3)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == 1003 % 16
    assert list(sampler) == [i for b in batches for i in b]
    # padding: tokens in padded batches, grouped vs a plain shuffle of the same batch size
    shuffled = [list(range(i, min(i + 16, 1003))) for i in range(0, 1003, 16)]
    padded = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)  # noqa: E731
    assert padded(batches) < 0.7 * padded(shuffled)
    # deterministic per (seed, epoch), different across epochs
    again = LengthGroupedSampler(lengths, batch_size=16, mega_batches=8, seed=3)
    assert again.batches() == batches
    sampler.set_epoch(1)
    assert sampler.batches() != batches
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedSampler(lengths, batch_size=0)


def _install_data_files(prefix: Path) -> list[Path]:
    """Lay out setup.cfg's ``[options.data_files]`` under ``prefix`` as ``pip install`` of a wheel does."""
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    installed = []
    for destination, files in config["options.data_files"].items():
        for name in filter(None, (line.strip() for line in files.splitlines())):
            assert (REPO_ROOT / name).is_file(), f"setup.cfg ships {name}, which is not in the repository"
            target = prefix / destination / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO_ROOT / name, target)
            installed.append(target)
    return installed


def test_a_regular_install_finds_the_shipped_data_and_card_template(tmp_path, monkeypatch):
    """Outside a checkout, the embedded data set and the card template come from <prefix>/share/labelformer."""
    prefix = tmp_path / "prefix"
    installed = _install_data_files(prefix)
    share = prefix / "share" / "labelformer"
    assert {path.relative_to(share).as_posix() for path in installed} >= {
        "hub_card.md",
        "reuters21578/train.jsonl.gz",
        "reuters21578/test.jsonl.gz",
    }
    # In the checkout, the repository's own files win.
    assert data_labelformer.reuters_dir() == REPO_ROOT / "data" / "reuters21578"
    assert hub_labelformer.HUB_CARD_TEMPLATE == REPO_ROOT / "hub_card.md"

    monkeypatch.setattr(data_labelformer, "REPO_ROOT", tmp_path / "not-a-checkout")
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.setattr(site, "USER_BASE", str(tmp_path / "user"))
    assert data_labelformer.reuters_dir() == share / "reuters21578"
    template = data_labelformer.shipped_path("hub_card.md", "hub_card.md")
    assert template == share / "hub_card.md"
    assert template.read_text() == (REPO_ROOT / "hub_card.md").read_text()
    data = load_multilabel_dataset()
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (6993, 777, 3019)

    # A `pip install --user` puts them under the user base instead.
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(site, "USER_BASE", str(prefix))
    assert data_labelformer.reuters_dir() == share / "reuters21578"


def test_missing_embedded_data_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(data_labelformer, "REPO_ROOT", tmp_path / "not-a-checkout")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.setattr(site, "USER_BASE", str(tmp_path / "user"))
    with pytest.raises(FileNotFoundError, match="embedded Reuters-21578 data is not in .*not-a-checkout"):
        load_multilabel_dataset()
