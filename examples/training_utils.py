"""Pieces of the training script that are not about training itself: output folders, checkpoints,
weight averaging, sharded prediction. Application code for `train_multilabel.py`, kept apart so that
script reads like the Accelerate examples."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from modeling.evaluation_labelformer import atomic_directory, predict_texts, write_json
from modeling.tokenization_labelformer import save_tokenizer

#: Checkpoints kept in ``<output_dir>/checkpoints`` (the newest ones).
SAVE_TOTAL_LIMIT = 2
logger = logging.getLogger("train_multilabel")


class TrainingError(RuntimeError):
    """A failure the user can act on; the message says what happened and what to do."""


def check_output_dir(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--output_dir {out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir and not args.resume_from_checkpoint:
        raise TrainingError(
            f"--output_dir {out} exists and is not empty. Pass --overwrite_output_dir to replace it, "
            "or --resume_from_checkpoint latest to continue the run in it."
        )


def find_checkpoint(args: argparse.Namespace) -> Path | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise TrainingError(f"{path} is not a checkpoint folder (no trainer_state.json).")
        return path
    found = list_checkpoints(args.output_dir)
    if not found:
        raise TrainingError(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}/checkpoints.")
    return found[-1]


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones are hidden ``.tmp-`` folders)."""
    return sorted((Path(output_dir) / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (weight decay 0.01); no weight decay on biases, LayerNorms and embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "embed" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.98), fused=device.type == "cuda")


def predict_split(accelerator: Accelerator, model, tokenizer, texts: list[str], args, num_beams: int, desc: str):
    """Predictions for ``texts``, sharded over processes and gathered in input order."""
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = list(range(rank, len(texts), world))
    bar = tqdm(total=len(texts), desc=desc, disable=not accelerator.is_local_main_process or args.no_progress)
    model = accelerator.unwrap_model(model)
    preds = predict_texts(
        model, tokenizer, [texts[i] for i in shard], num_beams=num_beams, batch_size=64,
        max_length=args.max_length, progress=lambda n: bar.update(n * world),
    )  # fmt: skip
    bar.close()
    gathered = gather_object([(i, p) for i, p in zip(shard, preds)])
    ordered = dict(gathered)
    return [ordered[i] for i in range(len(texts))]


def save_checkpoint(accelerator: Accelerator, args, state: dict[str, Any]) -> None:
    """Write ``checkpoints/checkpoint-<step>`` atomically and keep the newest ``--save_total_limit``."""
    root = Path(args.output_dir) / "checkpoints"
    target = root / f"checkpoint-{state['global_step']}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    # Every process writes its own RNG state: they share one temporary folder, renamed at the end.
    tmp = root / f".tmp-checkpoint-{state['global_step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(state, tmp / "trainer_state.json")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for old in list_checkpoints(args.output_dir)[:-SAVE_TOTAL_LIMIT]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved %s", target)
    accelerator.wait_for_everyone()


def save_model(accelerator: Accelerator, model, tokenizer, folder: Path) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)

        def write(tmp: Path) -> None:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            save_tokenizer(tokenizer, tmp)

        atomic_directory(folder, write)
    accelerator.wait_for_everyone()


def quiesce_process_group(accelerator: Accelerator) -> None:
    """Let the process group go idle before ``end_training`` destroys it (multi-process runs).

    Seen with gloo on CPU (about 1 run in 20): when the DDP wrapper outlived the destroyed group,
    freeing it ran the group's destructor, which joins the gloo worker thread while holding the
    GIL, and that thread could still be freeing the last collective's tensors, which needs the GIL:
    a deadlock at exit. The caller drops its DDP wrapper first (the group registry still holds the
    group, so nothing is destroyed then); this frees Accelerate's references and pauses without
    the GIL so the worker threads finish their last work before the group is destroyed.
    """
    accelerator.free_memory()
    time.sleep(0.5)


def global_mean_loss(accelerator: Accelerator, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss as a mean over all target tokens of all processes (not a mean of per-process means).

    DDP averages gradients over processes, so each process scales its token-mean loss by its share
    of the global token count; one process and N processes then take the same step.
    """
    loss = model(**batch).loss
    if accelerator.num_processes == 1:
        return loss
    labels = batch["labels"]
    local = (labels != -100).sum() if labels.dtype == torch.long else torch.tensor(labels.numel(), device=labels.device)
    total = accelerator.reduce(local.detach().clone(), reduction="sum")
    return loss * local * accelerator.num_processes / total


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _last_checkpoint(args: argparse.Namespace) -> str:
    found = list_checkpoints(args.output_dir)
    return str(found[-1]) if found else "none yet"
