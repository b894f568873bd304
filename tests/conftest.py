"""Shared fixtures: one tiny config for every test, offline Hub, deterministic seeds."""

from __future__ import annotations

import os

# Must be set before huggingface_hub is first imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gzip  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from configuration import LabelformerConfig  # noqa: E402
from modeling.data_labelformer import REUTERS_DIR  # noqa: E402

TINY = dict(
    vocab_size=40,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    dropout=0.0,
)


def tiny_config(**overrides) -> LabelformerConfig:
    """The tiny config every test starts from; ``overrides`` change single fields."""
    return LabelformerConfig(**{**TINY, **overrides})


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def random_batch(config: LabelformerConfig, batch: int = 3, src_len: int = 9, tgt_len: int = 6, pad_tail: int = 3):
    """Random source ids with the last row padded by ``pad_tail`` tokens, plus random target labels."""
    input_ids = torch.randint(3, config.vocab_size, (batch, src_len))
    attention_mask = torch.ones_like(input_ids)
    if pad_tail:
        attention_mask[-1, -pad_tail:] = 0
        input_ids[-1, -pad_tail:] = config.pad_token_id
    labels = torch.randint(3, config.decoder_vocab_size, (batch, tgt_len))
    return input_ids, attention_mask, labels


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict[str, str]:
    """Small train/test files cut from the embedded Reuters data."""
    folder = tmp_path_factory.mktemp("data")
    files = {}
    for split, n in (("train", 160), ("test", 40)):
        with gzip.open(REUTERS_DIR / f"{split}.jsonl.gz", "rt") as f:
            rows = [json.loads(next(f)) for _ in range(n)]
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"body": r["text"], "topics": r["labels"]}) + "\n" for r in rows))
        files[split] = str(path)
    return files
