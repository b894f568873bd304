"""A small synthetic multi-label task whose label count varies per example.

Each of ``num_classes`` classes owns a few keyword tokens; a document is filler tokens with the
keywords of 1-3 random classes inserted at random places. Its labels are the classes present.
"""

from __future__ import annotations

import torch

from configuration import LabelformerConfig

NUM_CLASSES = 8
KEYWORDS_PER_CLASS = 3
FILLER = 20
FIRST_TOKEN = 4  # after [PAD] [BOS] [EOS] [UNK]
VOCAB = FIRST_TOKEN + NUM_CLASSES * KEYWORDS_PER_CLASS + FILLER
LABELS = [f"class_{c}" for c in range(NUM_CLASSES)]


def synthetic_batch(batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, list[list[str]]]:
    """``[batch, length]`` token ids and, per row, the label names present (in class order)."""
    filler_start = FIRST_TOKEN + NUM_CLASSES * KEYWORDS_PER_CLASS
    ids = torch.randint(filler_start, VOCAB, (batch, length), generator=generator)
    label_sets = []
    for row in range(batch):
        count = int(torch.randint(1, 4, (1,), generator=generator))
        classes = torch.randperm(NUM_CLASSES, generator=generator)[:count].tolist()
        slots = torch.randperm(length, generator=generator)[: 2 * count].tolist()
        for i, c in enumerate(classes):
            for slot in slots[2 * i : 2 * i + 2]:
                keyword = int(torch.randint(KEYWORDS_PER_CLASS, (1,), generator=generator))
                ids[row, slot] = FIRST_TOKEN + c * KEYWORDS_PER_CLASS + keyword
        label_sets.append([LABELS[c] for c in sorted(classes)])
    return ids, label_sets


def synthetic_config(**overrides) -> LabelformerConfig:
    settings = dict(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        dropout=0.0,
        max_position_embeddings=64,
    )
    return LabelformerConfig.from_labels(LABELS, **{**settings, **overrides})
