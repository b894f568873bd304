"""A deterministic WordPiece vocabulary: the same texts and settings give the same vocabulary, in any process.

`tokenizers`' own ``WordPieceTrainer`` (BPE merges with a ``##`` continuation prefix) numbers the
``##`` pieces in the iteration order of a hash map that is seeded per process, and breaks ties
between equally frequent merges by those numbers, so two runs on the same texts can learn different
vocabularies. This learner runs the same algorithm (Sennrich et al. 2016, with WordPiece's prefix)
over words in sorted order and breaks ties by the pieces' text, so nothing depends on the process.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

PREFIX = "##"


def _merge(symbols: list[str], left: str, right: str, merged: str) -> list[str]:
    """``symbols`` with every adjacent (left, right), read left to right, replaced by ``merged``."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_wordpiece_vocab(
    word_counts: Mapping[str, int], vocab_size: int, min_frequency: int, special_tokens: Sequence[str]
) -> list[str]:
    """The vocabulary, in id order: special tokens, every character (sorted), every ``##`` character
    (sorted), then merged pieces in the order learned, until ``vocab_size`` or no pair occurs
    ``min_frequency`` times. Ties between equally frequent pairs go to the smaller ``(left, right)``.
    """
    words = sorted(word_counts)
    counts = [word_counts[word] for word in words]
    symbols = [[word[0], *(PREFIX + char for char in word[1:])] for word in words if word]
    vocab = list(dict.fromkeys([*special_tokens, *sorted({s for w in symbols for s in w if not s.startswith(PREFIX)})]))
    vocab += sorted({s for w in symbols for s in w if s.startswith(PREFIX)} - set(vocab))
    known = set(vocab)
    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (word, count) in enumerate(zip(symbols, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative:
            continue  # an outdated entry: the pair's count changed since it was pushed
        if -negative < min_frequency:
            break
        left, right = pair
        merged = left + right[len(PREFIX) :] if right.startswith(PREFIX) else left + right
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        changed = set()
        for i in sorted(where.pop(pair)):
            old, new = symbols[i], _merge(symbols[i], left, right, merged)
            for p in zip(old, old[1:]):
                pair_counts[p] -= counts[i]
                changed.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += counts[i]
                changed.add(p)
                where[p].add(i)
            symbols[i] = new
        pair_counts.pop(pair, None)
        for p in sorted(changed - {pair}):
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return vocab


def count_words(texts: Iterable[str], normalizer, pre_tokenizer) -> dict[str, int]:
    """Occurrences of each word after ``normalizer`` and ``pre_tokenizer`` (`tokenizers` components)."""
    counts: dict[str, int] = defaultdict(int)
    for text in texts:
        if isinstance(text, str):
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
                counts[word] += 1
    return dict(counts)


__all__ = ["count_words", "learn_wordpiece_vocab"]
