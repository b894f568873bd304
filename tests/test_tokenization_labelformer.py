"""The from-scratch tokenizer."""

from __future__ import annotations

from transformers import AutoTokenizer

from modeling import train_tokenizer

TEXTS = ["Wheat prices rose sharply in Chicago.", "Company earnings were up 12 pct.", "Grain exports fell."] * 10


def test_special_ids_eos_and_truncation():
    tokenizer = train_tokenizer(TEXTS, vocab_size=80, model_max_length=6)
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [
        0,
        1,
        2,
        3,
    ]
    ids = tokenizer("wheat prices")["input_ids"]
    assert ids[-1] == 2 and 3 not in ids
    assert tokenizer("")["input_ids"] == [2]  # an empty text still has one token
    long = tokenizer(" ".join(["grain"] * 50), truncation=True)["input_ids"]
    assert len(long) == 6 and long[-1] == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "wheat prices"


def test_save_and_load_round_trip(tmp_path):
    tokenizer = train_tokenizer(TEXTS, vocab_size=80, model_max_length=32)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS[:3] + ["unseen words, Zürich!"]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.model_max_length == 32 and loaded.pad_token_id == 0
