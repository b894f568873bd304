"""Label names as evidence: which labels does a document name?

Rare labels are the weak spot of a model trained from scratch: with 1 to 10 training documents
it almost never predicts them, and macro-F1 (the mean over labels) pays for it. Their names
often say what to look for ("nickel", "rape-oil", "platinum"). A label is *named* in a document
when every word of its name occurs among the document's input tokens; the multi-label heads can
add ``config.label_name_bias`` to the logits of the named labels when they decide (fit on
validation data like the threshold, never part of the training loss). With
``config.label_name_feature`` they also *learn* how much a name counts (`LabelNameEvidence`), in
the training loss and when deciding.

    config.label_name_token_ids = label_name_token_ids(labels, tokenizer)
    named = named_labels(input_ids, config.label_name_token_ids)  # [b, num_labels] bool
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: Name words shorter than this are ignored ("l" in "l-cattle"); a name without any word never matches.
MIN_WORD_LENGTH = 3


def label_name_words(label: str, min_word_length: int = MIN_WORD_LENGTH) -> list[str]:
    """The words of a label name: split at anything but letters and digits, short words dropped.

    ``"rape-oil"`` -> ``["rape", "oil"]``; ``"l-cattle"`` -> ``["cattle"]``; ``"C15"`` -> ``["C15"]``.
    """
    return [word for word in re.split(r"[^0-9A-Za-z]+", label) if len(word) >= min_word_length]


def label_name_token_ids(
    labels: Sequence[str], tokenizer: Any, min_word_length: int = MIN_WORD_LENGTH
) -> list[list[list[int]]]:
    """Per label, the token ids of each word of its name, for ``config.label_name_token_ids``.

    Each word is tokenized alone, as the tokenizer would see it at the start of a word in a text
    (so ``"oil"`` also matches the first piece of ``"oilseed"`` when the tokenizer splits it there).
    Words that tokenize to a special token such as ``[UNK]`` are left out: they would match any
    unknown word.

    Args:
        labels: label names in label-id order (``config.id2label``).
        tokenizer: the model's (input) tokenizer.
        min_word_length: shorter name words are ignored.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    result = []
    for label in labels:
        words = label_name_words(label, min_word_length)
        ids = [list(map(int, tokenizer(word, add_special_tokens=False)["input_ids"])) for word in words]
        # a word the tokenizer cannot spell ([UNK]) would match every unknown word: such a word is dropped
        result.append([word_ids for word_ids in ids if word_ids and not special.intersection(word_ids)])
    return result


def named_labels(input_ids: torch.Tensor, name_token_ids: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """Which labels each input names: ``[b, s]`` token ids -> ``[b, num_labels]`` bool.

    A label is named when each of its words' token ids occur consecutively somewhere in the row
    (padding never matches: no word holds the padding id). Labels without words are never named.
    """
    batch, length = input_ids.shape
    words = sorted({tuple(word) for label in name_token_ids for word in label})
    index = {word: i for i, word in enumerate(words)}
    present = torch.zeros(batch, len(words) + 1, dtype=torch.bool, device=input_ids.device)
    present[:, -1] = True  # the padding slot of `parts` below
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for word in words:
        by_length.setdefault(len(word), []).append(word)
    for size, group in by_length.items():
        if size > length:
            continue
        windows = input_ids.unfold(1, size, 1)  # [b, s - size + 1, size]
        targets = torch.tensor(group, dtype=input_ids.dtype, device=input_ids.device)  # [m, size]
        found = (windows[:, :, None, :] == targets[None, None]).all(-1).any(1)  # [b, m]
        present[:, [index[word] for word in group]] = found
    width = max((len(label) for label in name_token_ids), default=0)
    parts = torch.full((len(name_token_ids), max(width, 1)), len(words), dtype=torch.long, device=input_ids.device)
    for label, label_words in enumerate(name_token_ids):
        for j, word in enumerate(label_words):
            parts[label, j] = index[tuple(word)]
    has_words = torch.tensor([bool(label) for label in name_token_ids], dtype=torch.bool, device=input_ids.device)
    return present[:, parts].all(-1) & has_words  # [b, L]


#: Where `LabelNameEvidence.shared` starts: a named label starts one logit unit more likely.
LABEL_NAME_FEATURE_INIT = 1.0


class LabelNameEvidence(nn.Module):
    """The learned weight of label-name evidence (``config.label_name_feature``).

    ``named`` ``[b, L]`` (`named_labels`) -> logit term ``[b, L]`` = ``named * (shared + weight)``:
    ``shared`` (a scalar, starting at `LABEL_NAME_FEATURE_INIT`) is what a name is worth to any
    label, ``weight`` ``[L]`` (starting at 0) each label's correction, learned from the labels'
    own training documents. Labels with few documents keep about the shared value.
    """

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.shared = nn.Parameter(torch.full((), LABEL_NAME_FEATURE_INIT))
        self.weight = nn.Parameter(torch.zeros(num_labels))

    def forward(self, named: torch.Tensor) -> torch.Tensor:
        """``[b, L]`` bool -> ``[b, L]`` logit term in the parameters' dtype."""
        return named.to(self.weight.dtype) * (self.shared + self.weight)


__all__ = [
    "LABEL_NAME_FEATURE_INIT",
    "MIN_WORD_LENGTH",
    "LabelNameEvidence",
    "label_name_token_ids",
    "label_name_words",
    "named_labels",
]
