"""Train a subword tokenizer from scratch (no download) and wrap it for `transformers`.

The special tokens take the ids the model expects: ``[PAD]`` 0, ``[BOS]`` 1, ``[EOS]`` 2,
``[UNK]`` 3. Every encoded text ends with ``[EOS]``, so even an empty document has one token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .wordpiece_labelformer import count_words, learn_wordpiece_vocab

SPECIAL_TOKENS = {"pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]"}


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 16000,
    model_max_length: int = 256,
    lowercase: bool = True,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a WordPiece tokenizer on ``texts`` and return it as a `PreTrainedTokenizerFast`.

    Args:
        texts: training texts (an iterable is consumed once).
        vocab_size: target vocabulary size, special tokens included.
        model_max_length: the length `tokenizer(..., truncation=True)` truncates to by default.
        lowercase: lowercase and strip accents before splitting.
        min_frequency: a merge must occur this often to enter the vocabulary.

    Returns:
        A tokenizer that `save_pretrained` writes and `AutoTokenizer.from_pretrained` reads back.
    """
    if vocab_size < 16:
        raise ValueError(f"`vocab_size` must be at least 16, got {vocab_size}.")
    tokenizer = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    steps = [normalizers.NFD(), normalizers.StripAccents()]
    if lowercase:
        steps.insert(0, normalizers.Lowercase())
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    # Our own learner, not tokenizers' WordPieceTrainer: that one breaks ties in a per-process hash
    # order, so two runs on the same texts could get different vocabularies (wordpiece_labelformer.py).
    words = count_words(texts, tokenizer.normalizer, tokenizer.pre_tokenizer)
    vocab = learn_wordpiece_vocab(words, vocab_size, min_frequency, list(SPECIAL_TOKENS.values()))
    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer.model = models.WordPiece(ids, unk_token=SPECIAL_TOKENS["unk_token"])
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values()))
    eos = SPECIAL_TOKENS["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, tokenizer.token_to_id(eos))]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **SPECIAL_TOKENS)
    expected = {"pad_token": 0, "bos_token": 1, "eos_token": 2, "unk_token": 3}
    actual = {name: wrapped.convert_tokens_to_ids(token) for name, token in SPECIAL_TOKENS.items()}
    if actual != expected:  # the learner puts special tokens first, in the given order
        raise RuntimeError(f"special token ids {actual} differ from the model's {expected}")
    return wrapped


# Loading options that `from_pretrained` records in a tokenizer's init kwargs. Saved as they are,
# `local_files_only: true` (set by offline mode) would follow the tokenizer to the Hub.
_LOAD_TIME_KEYS = ("local_files_only", "is_local", "cache_dir", "token", "revision")


def save_tokenizer(tokenizer: Any, folder: str | os.PathLike) -> None:
    """`tokenizer.save_pretrained(folder)` without the loading options of this session."""
    tokenizer.save_pretrained(folder)
    config_file = Path(folder) / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in _LOAD_TIME_KEYS:
            config.pop(key, None)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


__all__ = ["SPECIAL_TOKENS", "save_tokenizer", "train_tokenizer"]
