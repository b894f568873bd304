#!/usr/bin/env python
"""Masked-LM pretraining of the encoder on the training split's own texts, then the threshold head from it.

Self-supervised and still "from scratch": no labels, no other data and no pretrained weights; only
the texts of the training split (the validation and test documents are not read). The encoder
(the recipe's sizes) learns to fill in masked tokens (BERT's scheme: 15% of the real tokens, of
which 80% become a mask, 10% a random token, 10% stay), then `examples/train_multilabel.py` trains
the recipe's threshold head from that encoder (``--init_encoder_from``) and the table reports its
best validation epoch, next to what the same head reaches from random weights.

    python benchmarks/mlm_pretraining.py --output_dir runs/mlm --tokenizer runs/reuters/tokenizer --epochs 8

Documents longer than ``--max_length`` are cut into several windows, so every token is seen. The
mask is the tokenizer's mask token or, for Labelformer tokenizers (which have none), ``[BOS]``: the
encoder never reads that token, so its embedding row is free to stand for "masked".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.reuters_ablations import run_variant  # noqa: E402
from examples.reproduce_reuters import RECIPE, SEED, VALIDATION_FRACTION  # noqa: E402
from examples.train_multilabel import make_optimizer  # noqa: E402
from modeling import LabelformerConfig, LabelformerModel, load_multilabel_dataset, train_tokenizer  # noqa: E402
from modeling.modeling_labelformer import LabelformerEncoder  # noqa: E402
from modeling.tokenization_labelformer import save_tokenizer  # noqa: E402


def document_windows(token_ids: list[list[int]], length: int, eos_id: int, min_tokens: int = 8) -> list[list[int]]:
    """Cut each document's ids (no special tokens) into windows of ``length - 1`` ids plus EOS.

    The first window of a document is always kept (it is what the classifier reads); later windows
    shorter than ``min_tokens`` are dropped.
    """
    windows = []
    for ids in token_ids:
        for start in range(0, max(1, len(ids)), length - 1):
            piece = ids[start : start + length - 1]
            if start == 0 or len(piece) >= min_tokens:
                windows.append([*piece, eos_id])
    return windows


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: list[int],
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``[b, s]`` ids -> (corrupted inputs ``[b, s]``, targets ``[b, s]`` with -100 = not scored).

    Only real, non-special tokens are chosen; a chosen token becomes ``mask_id`` (80%), a random
    non-special token (10%) or stays (10%).
    """
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids))
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & candidates
    targets = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    draw = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.masked_fill(chosen & (draw < 0.8), mask_id)
    swap = chosen & (draw >= 0.8) & (draw < 0.9)
    first = max(special_ids) + 1
    inputs[swap] = torch.randint(first, vocab_size, (int(swap.sum()),), generator=generator)
    return inputs, targets


class MaskedLMHead(nn.Module):
    """Hidden states ``[n, d]`` -> vocabulary logits ``[n, V]``; the output matrix is the input embedding."""

    def __init__(self, config: LabelformerConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.norm = nn.LayerNorm(config.d_model)
        self.embed_tokens = embed_tokens
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(nn.functional.gelu(self.dense(hidden_states)))
        return nn.functional.linear(hidden, self.embed_tokens.weight, self.bias)


def pretrain_encoder(
    windows: list[list[int]],
    config: LabelformerConfig,
    mask_id: int,
    special_ids: list[int],
    epochs: int,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    mask_probability: float = 0.15,
    seed: int = SEED,
    progress: bool = True,
) -> tuple[LabelformerEncoder, list[float]]:
    """Train a fresh encoder of ``config``'s sizes on masked-token prediction; returns it and each epoch's mean loss."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder = LabelformerModel(config).encoder  # LabelformerModel applies the library's initialisation
    head = MaskedLMHead(config, encoder.embeddings.embed_tokens)
    modules = nn.ModuleDict({"encoder": encoder, "head": head})  # the shared embedding counted once
    # train_multilabel.py's optimizer: AdamW, no weight decay on biases, norms and embeddings
    settings = SimpleNamespace(learning_rate=learning_rate, weight_decay=0.01, encoder_lr_scale=1.0)
    optimizer = make_optimizer(modules, settings, torch.device("cpu"))
    steps = epochs * math.ceil(len(windows) / batch_size)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(0.05 * steps), num_training_steps=steps)
    encoder.train()
    head.train()
    losses = []
    bar = tqdm(total=steps, desc="MLM pretraining", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(windows), generator=generator).tolist()
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            rows = [windows[i] for i in order[start : start + batch_size]]
            ids = torch.full((len(rows), max(map(len, rows))), config.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
                attention[r, : len(row)] = 1
            inputs, targets = mask_tokens(
                ids, attention, mask_id, config.vocab_size, special_ids, mask_probability, generator
            )
            scored = targets != -100
            if not scored.any():
                continue
            hidden = encoder(input_ids=inputs, attention_mask=attention).last_hidden_state  # [b, s, d]
            loss = nn.functional.cross_entropy(head(hidden[scored]), targets[scored])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total, count = total + loss.item(), count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.3f}")
        losses.append(total / max(1, count))
    bar.close()
    return encoder.eval(), losses


def save_encoder(encoder: LabelformerEncoder, folder: Path) -> Path:
    """Write ``folder/model.safetensors`` with ``encoder.*`` keys (what ``--init_encoder_from`` reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file({f"encoder.{k}": v.detach().contiguous() for k, v in encoder.state_dict().items()}, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", required=True, type=Path)
    p.add_argument("--tokenizer", type=Path, help="Tokenizer folder (default: train one like the recipe's).")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--mask_probability", type=float, default=0.15)
    p.add_argument("--max_train_samples", type=int, help="Pretrain on this many training documents (a quick try).")
    p.add_argument("--no_threshold", action="store_true", help="Only pretrain; skip the threshold head.")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if args.epochs < 1 or not 0 < args.mask_probability < 1:
        p.error("--epochs must be >= 1 and --mask_probability between 0 and 1 (exclusive).")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    data = load_multilabel_dataset(validation_fraction=VALIDATION_FRACTION, seed=SEED)
    texts = list(data["train"]["text"])[: args.max_train_samples]
    tokenizer_dir = args.tokenizer or args.output_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        save_tokenizer(
            train_tokenizer(texts, RECIPE["vocab_size"], model_max_length=RECIPE["max_length"]), tokenizer_dir
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.bos_token_id
    special_ids = sorted(set(tokenizer.all_special_ids))
    config = LabelformerConfig(
        vocab_size=len(tokenizer), d_model=RECIPE["d_model"], encoder_layers=RECIPE["encoder_layers"],
        encoder_attention_heads=RECIPE["attention_heads"], encoder_ffn_dim=RECIPE["ffn_dim"],
        dropout=RECIPE["dropout"], norm_position=RECIPE["norm_position"],
        max_position_embeddings=max(512, RECIPE["max_length"]),
    )  # fmt: skip
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    windows = document_windows(ids, RECIPE["max_length"], tokenizer.eos_token_id)
    start = time.time()
    encoder, losses = pretrain_encoder(
        windows, config, mask_id, special_ids, args.epochs, args.learning_rate,
        RECIPE["batch_size"], args.mask_probability, progress=not args.no_progress,
    )  # fmt: skip
    report = {"epochs": args.epochs, "learning_rate": args.learning_rate, "windows": len(windows),
              "tokens": sum(map(len, windows)), "mlm_loss_by_epoch": [round(x, 4) for x in losses],
              "pretraining_seconds": round(time.time() - start, 1)}  # fmt: skip
    encoder_dir = args.output_dir / "encoder"
    save_encoder(encoder, encoder_dir)
    if not args.no_threshold:
        namespace = SimpleNamespace(output_dir=str(args.output_dir), from_threshold=None)
        report["threshold"] = run_variant(
            "threshold, mlm pretrained", "threshold", {"init_encoder_from": str(encoder_dir)}, namespace, tokenizer_dir
        )
    (args.output_dir / "mlm_pretraining.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
