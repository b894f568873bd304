"""A tiny text version of the synthetic multi-label task, for tests that need raw strings."""

from __future__ import annotations

import random

import torch

from modeling import LabelformerConfig, LabelformerForMultiLabelGeneration, MultiLabelCollator, train_tokenizer

KEYWORDS = {"grain": ["wheat", "corn", "barley"], "energy": ["crude", "oil", "gas"], "money": ["dollar", "yen", "rate"]}
FILLER = ["the", "a", "of", "said", "in", "on", "for", "at", "with", "by", "market", "week", "year"]


def make_texts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        classes = sorted(rng.sample(sorted(KEYWORDS), rng.randint(1, 2)))
        words = [rng.choice(FILLER) for _ in range(10)]
        for c in classes:
            words.insert(rng.randrange(len(words)), rng.choice(KEYWORDS[c]))
        rows.append({"text": " ".join(words), "labels": classes})
    return rows


def trained_text_model(steps: int = 80):
    """A tokenizer and a label generator trained briefly on the tiny text task."""
    torch.manual_seed(0)
    rows = make_texts(400, 0)
    tokenizer = train_tokenizer([r["text"] for r in rows], vocab_size=80, model_max_length=32)
    config = LabelformerConfig.from_labels(
        sorted(KEYWORDS), vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        norm_position="pre", dropout=0.0,
    )  # fmt: skip
    model = LabelformerForMultiLabelGeneration(config)
    collator = MultiLabelCollator(tokenizer, config, max_length=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = collator([rows[(step * 32 + i) % len(rows)] for i in range(32)])
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer
