"""Pieces of the training script that are not about training itself: output folders, checkpoints,
weight averaging, sharded prediction. Application code for `train_multilabel.py`, kept apart so that
script reads like the Accelerate examples."""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_model as load_model_weights
from safetensors.torch import save_model as save_model_weights
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from modeling.evaluation_labelformer import (
    atomic_directory,
    predict_texts,
    recover_directories,
    replace_directory,
    write_json,
)
from modeling.loading_labelformer import verify_checksums, write_checksums
from modeling.tokenization_labelformer import save_tokenizer

#: Checkpoints kept in ``<output_dir>/checkpoints`` (the newest ones).
SAVE_TOTAL_LIMIT = 2
#: The weight average's file in a checkpoint (`WeightAverage`).
AVERAGED_WEIGHTS = "averaged_model.safetensors"
logger = logging.getLogger("train_multilabel")


class TrainingError(RuntimeError):
    """A failure the user can act on; the message says what happened and what to do."""


#: What a run writes at the top of --output_dir (glob patterns); `prepare_output_dir` deletes nothing else.
RUN_OUTPUTS = (
    "checkpoints", "best_model", "tokenizer", "README.md", "config.json", "generation_config.json",
    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "checksums.sha256",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "*_labelformer.py", "history.json",
    "per_label_metrics.md", "test_metrics.json", "training_args.json", "training_curve.png", "training_data.json",
)  # fmt: skip
#: Flags a resumed run may change; any other change is refused (the checkpoint's state assumes it).
RESUMABLE_CHANGES = {
    "preset", "learning_rate", "resume_from_checkpoint", "overwrite_output_dir", "output_dir", "no_progress",
    "stop_after_steps", "num_beams", "save_every_steps", "early_stopping_patience",
}  # fmt: skip


def prepare_output_dir(args: argparse.Namespace) -> None:
    """Make ``--output_dir`` ready (main process, before anything reads it).

    Finishes or removes what a killed run left half-done (see `recover_directories`). A non-empty
    folder needs ``--resume_from_checkpoint`` or ``--overwrite_output_dir``; the latter deletes only
    what a run writes (`RUN_OUTPUTS`), keeps any other file, and refuses to delete an input file.
    """
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--output_dir {out} exists and is not a folder.")
    if out.is_dir():
        for folder in (out, out / "checkpoints"):
            if folder.is_dir() and (touched := recover_directories(folder)):
                logger.warning("cleaned up after an interrupted run in %s: %s", folder, ", ".join(touched))
        entries = sorted(out.iterdir())
        ours = [p for p in entries if any(fnmatch.fnmatchcase(p.name, pattern) for pattern in RUN_OUTPUTS)]
        if entries and not args.overwrite_output_dir and not args.resume_from_checkpoint:
            raise TrainingError(
                f"--output_dir {out} exists and is not empty. Pass --overwrite_output_dir to replace the files of "
                "an earlier run in it (other files are kept), or --resume_from_checkpoint latest to continue it."
            )
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            inputs = [Path(p).resolve() for p in (args.train_file, args.test_file) if p]
            for path in ours:
                clash = [i for i in inputs if i == path.resolve() or path.resolve() in i.parents]
                if clash:
                    raise TrainingError(
                        f"--overwrite_output_dir would delete {clash[0]}, an input of this run: move it out of {out}."
                    )
            for path in ours:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            if kept := [p.name for p in entries if p not in ours]:
                logger.warning("--overwrite_output_dir: kept %d files no run writes: %s", len(kept), ", ".join(kept))
    out.mkdir(parents=True, exist_ok=True)


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


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write (disk full, read-only folder) into a `TrainingError` naming ``path``."""
    try:
        yield
    except OSError as error:
        raise TrainingError(
            f"Could not write {path}: {error.strerror or error} ({error.filename or path}). Free disk space or "
            "pick a writable --output_dir; finished checkpoints are kept (--resume_from_checkpoint latest)."
        ) from error
    except Exception as error:  # torch.save: RuntimeError "basic_ios::clear"; safetensors: SafetensorError
        if not isinstance(error, RuntimeError) and type(error).__name__ != "SafetensorError":
            raise
        if "basic_ios" not in str(error) and "write" not in str(error).lower() and "Io" not in str(error):
            raise
        raise TrainingError(
            f"Could not write {path} (the disk may be full or the folder read-only): {str(error).splitlines()[0]}. "
            "Free disk space or pick a writable --output_dir; finished checkpoints are kept."
        ) from error


def save_checkpoint(
    accelerator: Accelerator, args, state: dict[str, Any], averaged: torch.nn.Module | None = None
) -> None:
    """Write ``checkpoints/checkpoint-<step>`` atomically and keep the newest ``SAVE_TOTAL_LIMIT``.

    ``averaged`` (a `WeightAverage`, when the run averages weights) goes in as ``AVERAGED_WEIGHTS``.

    All processes write into one temporary folder (each its own RNG state); the main process adds
    the trainer state, the run's flags and a ``checksums.sha256`` manifest, then swaps it in with
    `replace_directory`, so a kill at any instant leaves the previous copy or the new one.
    """
    root = Path(args.output_dir) / "checkpoints"
    target = root / f"checkpoint-{state['global_step']}"
    tmp = root / f".tmp-checkpoint-{state['global_step']}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with writing(root):
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with writing(target):
            accelerator.save_state(str(tmp), safe_serialization=True)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_json(state, tmp / "trainer_state.json")
                if averaged is not None:
                    save_model_weights(averaged, str(tmp / AVERAGED_WEIGHTS))
                write_json(vars(args), tmp / "training_args.json")
                write_checksums(tmp)
                replace_directory(tmp, target)
                for old in list_checkpoints(args.output_dir)[:-SAVE_TOTAL_LIMIT]:
                    shutil.rmtree(old, ignore_errors=True)
                logger.info("saved %s", target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written copy filling the disk
        raise
    accelerator.wait_for_everyone()


class WeightAverage(AveragedModel):
    """The running mean of the model's weights at the ends of epochs (stochastic weight averaging,
    Izmailov et al. 2018): ``update_parameters(model)`` adds the weights of the epoch just finished;
    ``module`` is a copy of the model holding the mean, which validation scores like any other epoch's
    model. Saved in each checkpoint as safetensors (`save_checkpoint`), so a resumed run continues the
    same mean."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, use_buffers=True)
        self.module.eval()

    def load(self, checkpoint: Path) -> None:
        """Restore the mean a checkpoint holds (written by `save_checkpoint`)."""
        path = checkpoint / AVERAGED_WEIGHTS
        if not path.is_file():
            raise TrainingError(
                f"Cannot resume with --average_from_epoch: {path} is missing (the checkpoint lost it, or was written "
                "without weight averaging), so the running mean of the weights cannot continue. Resume from another "
                "checkpoint of this run (--resume_from_checkpoint <folder>), or start a new run."
            )
        load_model_weights(self, str(path))


def recorded_args(folder: Path) -> dict[str, Any] | None:
    """The flags a run recorded in ``folder / "training_args.json"`` (a checkpoint, or a run's output folder),
    with ``split_seed`` filled in from ``seed`` for runs from before it (they split by ``--seed``); ``None``
    if the folder has no record."""
    record = Path(folder) / "training_args.json"
    if not record.is_file():
        return None
    saved = json.loads(record.read_text())
    saved.setdefault("split_seed", saved.get("seed"))
    return saved


def verify_checkpoint(checkpoint: Path, args: argparse.Namespace, num_processes: int) -> None:
    """Refuse a checkpoint that is corrupt, incomplete, or was written with flags a resume cannot change."""
    try:
        verified = verify_checksums(checkpoint)
    except ValueError as error:
        raise TrainingError(f"Cannot resume: {error} Resume from an older checkpoint instead.") from error
    if not verified:
        logger.warning(
            "%s has no checksums.sha256 (written by an older version): its files are not verified.", checkpoint
        )
    for rank in range(num_processes):
        name = checkpoint / f"random_states_{rank}.pkl"
        if not name.is_file():
            raise TrainingError(
                f"Cannot resume exactly: {name} is missing (the random state of process {rank}); the run continued "
                "from it would draw different dropout masks and orders. Resume with the process count the "
                "checkpoint was written with, or from a complete checkpoint."
            )
    saved = recorded_args(checkpoint)
    if saved is not None:
        changed = sorted(
            k for k, v in vars(args).items() if k in saved and saved[k] != v and k not in RESUMABLE_CHANGES
        )
        if saved.get("scheduled_sampling"):  # a flag this version removed: the run cannot go on as it started
            raise TrainingError(
                f"Cannot resume from {checkpoint}: it was trained with --scheduled_sampling "
                f"{saved['scheduled_sampling']}, which this version removed (it changed nothing measurable). Finish "
                "the run with the version that started it, or start a new run."
            )
        if changed:
            flags = ", ".join(f"--{k} {saved[k]!r} -> {getattr(args, k)!r}" for k in changed)
            raise TrainingError(
                f"Cannot resume from {checkpoint} with changed flags ({flags}): the saved model, optimizer and "
                "data order depend on them. Resume with the original values, or start a new run."
            )


def apply_learning_rate(scheduler, learning_rate: float, state: dict[str, Any]) -> None:
    """Resume with ``--learning_rate`` as the schedule's new peak: warmup/decay continue from the current step.

    Each change is recorded in ``state["learning_rates"]`` (``[{"step", "learning_rate"}, ...]``), which
    training_args.json repeats, so it tells which rate trained which steps.
    """
    schedule = state.setdefault("learning_rates", [{"step": 0, "learning_rate": scheduler.scheduler.base_lrs[0]}])
    inner = scheduler.scheduler  # the LambdaLR inside Accelerate's wrapper
    if inner.base_lrs[0] == learning_rate:
        return
    logger.warning("--learning_rate %g replaces %g from step %d on (the schedule's shape continues)",
                   learning_rate, inner.base_lrs[0], state["global_step"])  # fmt: skip
    inner.base_lrs = [learning_rate] * len(inner.base_lrs)
    for group, factor in zip(inner.optimizer.param_groups, inner.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]
    schedule.append({"step": state["global_step"], "learning_rate": learning_rate})


def check_finite_update(loss: float, grad_norm: torch.Tensor | None, state: dict[str, Any], output_dir: str) -> None:
    """Before the optimizer step: stop if the loss or the gradient norm is NaN or infinite."""
    norm = 0.0 if grad_norm is None else float(grad_norm)  # DeepSpeed clips inside its engine and returns None
    if not (math.isfinite(loss) and math.isfinite(norm)):
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
        raise TrainingError(
            f"The training {what} at step {state['global_step'] + 1} is not finite; the step was not applied. "
            f"{_newest_good_checkpoint(output_dir)} Lower --learning_rate or check the data, then resume "
            "with --resume_from_checkpoint latest (a new --learning_rate applies from there)."
        )


def check_finite_weights_after_step(model: torch.nn.Module, state: dict[str, Any], output_dir: str) -> None:
    """After the optimizer step: stop before any non-finite weight can be evaluated or saved."""
    params = [p.detach() for p in model.parameters() if p.is_floating_point()]
    if not bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all()):
        raise TrainingError(
            f"The weights became NaN or infinite at step {state['global_step']}; nothing of this step was saved. "
            f"{_newest_good_checkpoint(output_dir)} Lower --learning_rate, then resume with "
            "--resume_from_checkpoint latest."
        )


def _newest_good_checkpoint(output_dir: str) -> str:
    found = list_checkpoints(output_dir)
    if not found:
        return "No checkpoint was written yet."
    return f"The newest checkpoint, {found[-1]}, holds finite weights (every saved step is checked)."


def save_model(accelerator: Accelerator, model, tokenizer, folder: Path) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)

        def write(tmp: Path) -> None:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            save_tokenizer(tokenizer, tmp)

        with writing(folder):
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
