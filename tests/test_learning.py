"""The model actually learns: reversing short random sequences (issue 2's learning check)."""

from __future__ import annotations

import torch

from modeling import LabelformerForConditionalGeneration

from .conftest import tiny_config


def reverse_batch(batch: int, length: int, vocab: int, eos: int, generator: torch.Generator):
    source = torch.randint(3, vocab, (batch, length), generator=generator)
    target = torch.cat([source.flip(1), torch.full((batch, 1), eos)], dim=1)
    return source, target


def test_learns_to_reverse_sequences():
    config = tiny_config(
        vocab_size=13, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2
    )
    model = LabelformerForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=500, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(500):
        source, target = reverse_batch(64, 6, config.vocab_size, config.eos_token_id, generator)
        loss = model(input_ids=source, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    source, target = reverse_batch(256, 6, config.vocab_size, config.eos_token_id, torch.Generator().manual_seed(123))
    mask = torch.ones_like(source)
    generated = model.generate(input_ids=source, attention_mask=mask, max_new_tokens=7, do_sample=False)[:, 1:]
    accuracy = (generated[:, :6] == target[:, :6]).float().mean().item()
    assert accuracy >= 0.95, f"token accuracy {accuracy:.3f}"
