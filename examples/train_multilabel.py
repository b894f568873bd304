#!/usr/bin/env python
"""Train a Labelformer multi-label classifier with Accelerate, from scratch, on CPU or many GPUs.

########################################################################
# This script shows:
#   - a tokenizer trained from scratch (no download) and a Labelformer head built from the data
#     (label-sequence generation by default, or the sigmoid threshold baseline);
#   - training with Accelerate: mixed precision where the hardware has it, gradient
#     accumulation, clipping, AdamW with warmup and decay, one code path for 1 CPU and N GPUs;
#   - length-grouped batches (less padding), optional weight averaging (EMA);
#   - evaluation each epoch with our metrics, early stopping on validation micro-F1;
#   - atomic checkpoints and exact resume (model, optimizer, scheduler, RNG, data position);
#   - the final model, tokenizer, model card, metrics, per-label table and training curve.
#
# Run on the embedded Reuters-21578 data, on 2 CPU cores in under 10 minutes:
#     python examples/train_multilabel.py --preset quick --output_dir outputs/quick
# On several GPUs, unchanged:
#     accelerate launch --multi_gpu --num_processes 4 examples/train_multilabel.py --preset base ...
########################################################################
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from modeling import (  # noqa: E402
    LabelformerConfig,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
    LabelformerForParallelLabelGeneration,
    MultiLabelCollator,
    build_label_vocabulary,
    fit_lexical_scorer,
    label_name_token_ids,
    load_multilabel_dataset,
    out_of_fold_lexical_margins,
    split_unknown_labels,
    train_tokenizer,
)
from modeling.data_labelformer import LengthGroupedSampler, report_unknown_labels  # noqa: E402
from modeling.evaluation_labelformer import (  # noqa: E402
    METRIC_KEYS,
    atomic_directory,
    evaluate_predictions,
    per_label_table,
    plot_training_curve,
    predict_texts,
    threshold_validation_inputs,
    tune_decoding_bias,
    write_json,
)
from modeling.hub_labelformer import REUTERS_DESCRIPTION, build_model_card  # noqa: E402
from modeling.lexical_labelformer import LEXICAL_C  # noqa: E402
from modeling.set_search_labelformer import SET_SEARCH_ROUNDS  # noqa: E402
from modeling.tokenization_labelformer import save_tokenizer  # noqa: E402

logger = logging.getLogger("train_multilabel")

HEADS = {
    "generation": LabelformerForMultiLabelGeneration,
    "parallel": LabelformerForParallelLabelGeneration,
    "threshold": LabelformerForMultiLabelClassification,
}

# Model and optimisation settings per preset; any flag given on the command line wins.
PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores, under 10 minutes end to end (tokenizer, training, test evaluation).
    "quick": dict(
        vocab_size=8000, max_length=96, d_model=128, encoder_layers=2, decoder_layers=1, attention_heads=4,
        ffn_dim=512, dropout=0.1, epochs=10, batch_size=32, learning_rate=2e-3, warmup_ratio=0.05,
        norm_position="pre", early_stopping_patience=4,
    ),
    # Transformer-base (Vaswani et al.) for GPUs.
    "base": dict(
        vocab_size=32000, max_length=256, d_model=512, encoder_layers=6, decoder_layers=6, attention_heads=8,
        ffn_dim=2048, dropout=0.1, epochs=40, batch_size=64, learning_rate=5e-4, warmup_ratio=0.05,
        norm_position="pre", early_stopping_patience=5,
    ),
}  # fmt: skip
DEFAULTS: dict[str, Any] = dict(
    vocab_size=16000, max_length=256, d_model=256, encoder_layers=2, decoder_layers=1, attention_heads=4,
    ffn_dim=1024, dropout=0.1, epochs=10, batch_size=32, learning_rate=1e-3, warmup_ratio=0.05,
    norm_position="pre", early_stopping_patience=3, ema_decay=0.0,
)  # fmt: skip


class TrainingError(RuntimeError):
    """A failure the user can act on; the message says what happened and what to do."""


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------


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


def load_data(args: argparse.Namespace):
    return load_multilabel_dataset(
        train_file=args.train_file,
        validation_file=args.validation_file,
        test_file=args.test_file,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        text_column=args.text_column,
        label_column=args.label_column,
        label_delimiter=args.label_delimiter,
        validation_fraction=args.validation_fraction,
        seed=args.seed if args.split_seed is None else args.split_seed,
        max_train_samples=args.max_train_samples,
    )


def get_tokenizer(args: argparse.Namespace, accelerator: Accelerator, texts: list[str], resuming: bool):
    """The given tokenizer, the run's own (when resuming), or a new one trained on the training texts."""
    saved = Path(args.output_dir) / "tokenizer"
    if args.tokenizer_name_or_path:
        return AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
    if not resuming and accelerator.is_main_process:
        tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size, model_max_length=args.max_length)
        atomic_directory(saved, lambda folder: save_tokenizer(tokenizer, folder))
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(saved)


def build_model(args: argparse.Namespace, labels: list[str], tokenizer, max_labels_seen: int):
    """The head of ``--head``; ``max_labels`` defaults to the most labels a training document has.

    With ``--label_names`` the threshold and generation heads get each label name's token ids
    (``label_name_token_ids``), so their label-name bias can be fit on validation data; with
    ``--label_name_feature`` they also learn a weight for the names in training (`LabelNameEvidence`).
    """
    names = label_name_token_ids(labels, tokenizer) if args.label_names and args.head != "parallel" else None
    config = LabelformerConfig.from_labels(
        labels,
        vocab_size=len(tokenizer),
        label_name_token_ids=names,
        label_name_feature=bool(args.label_name_feature and names is not None),
        d_model=args.d_model,
        encoder_layers=args.encoder_layers,
        decoder_layers=args.decoder_layers,
        encoder_attention_heads=args.attention_heads,
        decoder_attention_heads=args.attention_heads,
        encoder_ffn_dim=args.ffn_dim,
        decoder_ffn_dim=args.ffn_dim,
        dropout=args.dropout,
        activation_function=args.activation,
        norm_position=args.norm_position,
        position_embedding_type=args.position_embedding_type,
        max_position_embeddings=max(512, args.max_length),
        label_order=args.label_order,
        label_smoothing=args.label_smoothing,
        min_labels=0 if args.allow_empty_labels else 1,
        max_labels=args.max_labels or max_labels_seen,
        scheduled_sampling_prob=args.scheduled_sampling,
        auxiliary_bce_weight=args.auxiliary_bce_weight if args.head == "generation" else 0.0,
        global_label_logits=bool(args.global_label_logits),
        lexical_scorer=bool(args.lexical_scorer),
        # stacking: validation during training decodes with the weight the network was trained beside
        lexical_logit_weight=args.lexical_stacking,
        lexical_training_weight=args.lexical_stacking,
        parallel_loss=args.parallel_loss,
    )
    return HEADS[args.head](config)


def init_encoder_from(model: torch.nn.Module, folder: str) -> None:
    """Copy the encoder (and its token embeddings) of a saved Labelformer model of any head into ``model``.

    Two-stage training: e.g. train the threshold head, whose per-label BCE gives the encoder a dense
    signal, then start the label generator from its encoder. Sizes and tokenizer must match.
    """
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise TrainingError(f"--init_encoder_from {folder}: no model.safetensors there (a saved Labelformer model).")
    weights = load_file(str(path))
    source = {}
    for key, value in weights.items():
        for prefix in ("model.encoder.", "encoder."):
            if key.startswith(prefix):
                source[key[len(prefix) :]] = value
                break
    encoder = model.get_encoder()
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(source))
    wrong = sorted(k for k in expected.keys() & source.keys() if expected[k].shape != source[k].shape)
    if missing or wrong:
        raise TrainingError(
            f"--init_encoder_from {folder}: its encoder does not fit this model (missing {missing[:3]}, "
            f"other shapes {wrong[:3]}). Use the same model sizes and tokenizer as that run."
        )
    encoder.load_state_dict({k: source[k] for k in expected})
    load_matching(getattr(model, "label_name_evidence", None), weights, "label_name_evidence.")  # learned name weights
    # a threshold head's classifier starts the generator's document-level label logits
    if getattr(model.config, "global_label_logits", False) and load_matching(
        model.auxiliary_classifier, weights, "classifier."
    ):
        logger.info("document-level label logits initialised from the classifier in %s", folder)
    logger.info("encoder initialised from %s", folder)


def load_matching(module: torch.nn.Module | None, weights: dict[str, torch.Tensor], prefix: str) -> bool:
    """Load the tensors of ``weights`` under ``prefix`` into ``module`` when they are exactly its state
    (same names and shapes); return whether they were loaded."""
    if module is None:
        return False
    found = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    state = module.state_dict()
    if found.keys() != state.keys() or any(found[k].shape != state[k].shape for k in state):
        return False
    module.load_state_dict(found)
    return True


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, LayerNorms and embeddings.

    ``--encoder_lr_scale`` multiplies the learning rate of the encoder (and the token embeddings it
    holds), e.g. 0.1 to fine-tune a pretrained encoder gently under a fresh decoder. At 1 the groups
    are the two of earlier versions, so their checkpoints still resume.
    """
    split = args.encoder_lr_scale != 1.0
    encoder_ids = {id(param) for param in model.get_encoder().parameters()} if split else set()
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim < 2 or "embed" in name)
        buckets.setdefault((decay, id(param) in encoder_ids), []).append(param)
    groups = [
        {
            "params": params,
            "weight_decay": args.weight_decay if decay else 0.0,
            "lr": args.learning_rate * (args.encoder_lr_scale if in_encoder else 1.0),
        }
        for (decay, in_encoder), params in sorted(buckets.items(), key=lambda item: item[0], reverse=True)
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.98), fused=device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# Evaluation and checkpoints
# ---------------------------------------------------------------------------------------------


def predict_split(accelerator: Accelerator, model, tokenizer, texts: list[str], args, num_beams: int, desc: str):
    """Predictions for ``texts``, sharded over processes and gathered in input order."""
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = list(range(rank, len(texts), world))
    bar = tqdm(total=len(texts), desc=desc, disable=not accelerator.is_local_main_process or args.no_progress)
    model = accelerator.unwrap_model(model)
    preds = predict_texts(
        model, tokenizer, [texts[i] for i in shard], num_beams=num_beams, batch_size=args.eval_batch_size,
        max_length=args.max_length, progress=lambda n: bar.update(n * world),
    )  # fmt: skip
    bar.close()
    gathered = gather_object([(i, p) for i, p in zip(shard, preds)])
    ordered = dict(gathered)
    return [ordered[i] for i in range(len(texts))]


def tune_threshold(accelerator: Accelerator, model, tokenizer, dataset, args) -> float:
    """Fit the threshold head's decision rule on validation data: the threshold, and with it the label-name
    bias when the config holds label names and the lexical logit weight when the model has a lexical
    scorer (`tune_decision_rule`)."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    probs, targets, named, lexical = threshold_validation_inputs(
        unwrapped, tokenizer, [dataset[i] for i in range(len(dataset))], args.max_length, args.eval_batch_size
    )
    return unwrapped.tune_decision_rule(probs, targets, named, lexical)["threshold"]


def save_checkpoint(accelerator: Accelerator, args, state: dict[str, Any], average=None) -> None:
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
        if average is not None:
            average.save(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for old in list_checkpoints(args.output_dir)[: -args.save_total_limit]:
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


class WeightAverage:
    """Exponential moving average of the trainable weights (Polyak averaging), kept in float32.

    ``decay`` ramps up as ``min(decay, (1 + t) / (10 + t))`` over updates ``t`` so early, random
    weights fade quickly. `applied` swaps the average into the model (for evaluation and saving)
    and restores the raw weights afterwards. Saved as safetensors next to each checkpoint.
    """

    FILE = "weight_average.safetensors"

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        params = dict(model.named_parameters())
        raw = {name: params[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, value in self.shadow.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in raw.items():
                    params[name].copy_(value)

    def save(self, folder: Path) -> None:
        tensors = {name: value.contiguous() for name, value in self.shadow.items()}
        save_file(tensors, str(folder / self.FILE), metadata={"updates": str(self.updates)})

    def load(self, folder: Path) -> None:
        path = folder / self.FILE
        if not path.is_file():
            raise TrainingError(f"{folder} has no {self.FILE}: it was not written with --ema_decay.")
        with safe_open(str(path), framework="pt") as f:  # one read: metadata and tensors
            self.updates = int(f.metadata()["updates"])
            loaded = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
        if loaded.keys() != self.shadow.keys():
            raise TrainingError(f"{path} does not match the model's parameters; resume with the same settings.")
        for name, value in loaded.items():
            self.shadow[name].copy_(value)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def training_function(args: argparse.Namespace) -> dict[str, Any]:
    """Train, early-stop on validation micro-F1, evaluate the best model on test; returns test metrics."""
    mixed_precision = args.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    trackers = [name for name in ("tensorboard", "trackio") if _installed(name)] if args.report_to == "auto" else []
    if args.report_to not in ("auto", "none"):
        trackers = [args.report_to]
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    for noisy in ("accelerate", "matplotlib", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    checkpoint = find_checkpoint(args)
    if accelerator.is_main_process:
        check_output_dir(args)
        if args.overwrite_output_dir and not checkpoint and Path(args.output_dir).exists():
            shutil.rmtree(args.output_dir)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        write_json(vars(args), Path(args.output_dir) / "training_args.json")
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    # ---- data, tokenizer, model
    data = load_data(args)
    train_labels = data["train"]["labels"]
    labels = build_label_vocabulary(train_labels, allow_empty=args.allow_empty_labels)
    label2id = {label: i for i, label in enumerate(labels)}
    for split in ("validation", "test"):
        if split in data:
            report_unknown_labels(split_unknown_labels(data[split]["labels"], label2id)[1], split)
    tokenizer = get_tokenizer(args, accelerator, data["train"]["text"], resuming=checkpoint is not None)
    model = build_model(args, labels, tokenizer, max(1, max(len(x) for x in train_labels)))
    if args.init_encoder_from and checkpoint is None:
        init_encoder_from(model, args.init_encoder_from)
    if args.lexical_scorer and checkpoint is None:  # resuming loads the fitted scorer with the weights
        fit_lexical_scorer(model, tokenizer, data["train"]["text"], train_labels, args.lexical_c, args.max_length)
    stacked = None
    if args.lexical_stacking:  # recomputed on resume: deterministic for a seed, and not worth a checkpoint file
        stacked = out_of_fold_lexical_margins(
            model, tokenizer, data["train"]["text"], train_labels, args.lexical_c, args.max_length, seed=args.seed
        )
    logger.info(
        "%s: %d labels, %s parameters, %d train / %d validation documents, %d process(es) (%s)",
        type(model).__name__,
        len(labels),
        f"{sum(p.numel() for p in model.parameters()):,}",
        len(data["train"]),
        len(data["validation"]),
        accelerator.num_processes,
        accelerator.distributed_type,
    )

    train_set = data["train"].add_column("row", list(range(len(data["train"]))))
    collator = MultiLabelCollator(
        tokenizer, model.config, args.max_length, head="classification" if args.head == "threshold" else "generation",
        seed=args.seed, lexical_margins=stacked,
    )  # fmt: skip
    # A private generator: creating a DataLoader iterator draws a seed from the loader's generator, and
    # drawing it from the global RNG would shift dropout masks after a resume.
    sampler = None
    if args.group_by_length:
        encoded = tokenizer(list(data["train"]["text"]), truncation=True, max_length=args.max_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        # groups of the global batch: each process takes its slice of every global batch
        sampler = LengthGroupedSampler(lengths, args.batch_size * accelerator.num_processes, seed=args.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = make_optimizer(model, args, accelerator.device)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    # The prepared scheduler steps once per process per optimizer step (Accelerate's convention when
    # batches are not split), so its schedule is counted in process-steps.
    scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    accelerator.init_trackers("labelformer", config={k: v for k, v in vars(args).items() if v is not None})

    state: dict[str, Any] = {
        "epoch": 0,
        "batches_done": 0,
        "global_step": 0,
        "best_micro_f1": -1.0,
        "best_epoch": -1,
        "epochs_without_improvement": 0,
        "history": [],
    }
    unwrapped = accelerator.unwrap_model(model)
    average = WeightAverage(unwrapped, args.ema_decay) if args.ema_decay else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if average is not None:
            average.load(checkpoint)
        logger.info("resumed from %s (epoch %d, step %d)", checkpoint, state["epoch"], state["global_step"])

    # ---- training loop
    best_dir = Path(args.output_dir) / "best_model"
    bar = tqdm(
        total=total_steps, initial=state["global_step"], desc="training",
        disable=not accelerator.is_local_main_process or args.no_progress,
    )  # fmt: skip
    target_sampling = args.scheduled_sampling
    stop = state["global_step"] >= total_steps
    while not stop and state["epoch"] < args.epochs:
        epoch = state["epoch"]
        model.train()
        train_loader.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        collator.epoch = epoch
        loader = (
            accelerator.skip_first_batches(train_loader, state["batches_done"])
            if state["batches_done"]
            else train_loader
        )
        for batch in loader:
            if target_sampling:  # scheduled sampling: ramp linearly to the target probability
                accelerator.unwrap_model(model).scheduled_sampling_probability = target_sampling * min(
                    1.0, state["global_step"] / max(1, total_steps // 2)
                )
            with accelerator.accumulate(model):
                loss = global_mean_loss(accelerator, model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state["batches_done"] += 1
            if not accelerator.sync_gradients:
                continue
            state["global_step"] += 1
            if average is not None:
                average.update(unwrapped)
            # the mean over processes of the scaled losses is the global token mean (see global_mean_loss)
            logged = accelerator.reduce(loss.detach(), reduction="mean").item()
            if not math.isfinite(logged):
                raise TrainingError(
                    f"The training loss became {logged} at step {state['global_step']}. Nothing after the last "
                    f"checkpoint was saved ({_last_checkpoint(args)}). Lower --learning_rate, raise --warmup_ratio "
                    "or check the data, then resume with --resume_from_checkpoint latest."
                )
            bar.update(1)
            bar.set_postfix(loss=f"{logged:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            record = {"step": state["global_step"], "loss": logged, "learning_rate": scheduler.get_last_lr()[0]}
            state["history"].append(record)
            accelerator.log({"train/loss": logged, "train/learning_rate": record["learning_rate"]}, step=record["step"])
            if args.save_every_steps and state["global_step"] % args.save_every_steps == 0:
                save_checkpoint(accelerator, args, state, average)
            if args.stop_after_steps and state["global_step"] >= args.stop_after_steps:
                logger.warning(
                    "stopped after %d steps (--stop_after_steps); continue with --resume_from_checkpoint latest",
                    state["global_step"],
                )
                return {}
            if state["global_step"] >= total_steps:
                stop = True
                break

        # ---- end of epoch: validate, early stopping, checkpoint
        state["epoch"] += 1
        state["batches_done"] = 0
        model.eval()
        with average.applied(unwrapped) if average is not None else nullcontext():
            if args.head == "threshold":
                tune_threshold(accelerator, model, tokenizer, data["validation"], args)
            predictions = predict_split(
                accelerator, model, tokenizer, data["validation"]["text"], args, 1, f"validation {state['epoch']}"
            )
            metrics = evaluate_predictions(predictions, data["validation"]["labels"], labels)
            improved = metrics["micro_f1"] > state["best_micro_f1"]
            if improved:
                save_model(accelerator, model, tokenizer, best_dir)
        record = {"epoch": state["epoch"], "step": state["global_step"]}
        record.update({f"validation_{k}": v for k, v in metrics.items()})
        state["history"].append(record)
        accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=state["global_step"])
        logger.info(
            "epoch %d: validation micro-F1 %.4f macro-F1 %.4f subset %.4f",
            state["epoch"],
            metrics["micro_f1"],
            metrics["macro_f1"],
            metrics["subset_accuracy"],
        )
        if improved:
            state.update(best_micro_f1=metrics["micro_f1"], best_epoch=state["epoch"], epochs_without_improvement=0)
        else:
            state["epochs_without_improvement"] += 1
        save_checkpoint(accelerator, args, state, average)
        if state["epochs_without_improvement"] >= args.early_stopping_patience:
            logger.info("early stopping: no improvement for %d epochs", args.early_stopping_patience)
            break
    bar.close()
    results = finish(accelerator, args, data, labels, state, best_dir)
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        del model, optimizer, train_loader, scheduler  # the DDP wrapper goes while the group is alive
        quiesce_process_group(accelerator)
    accelerator.end_training()  # closes trackers and the process group: nothing distributed after this
    return results


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


def finish(accelerator: Accelerator, args, data, labels: list[str], state: dict[str, Any], best_dir: Path) -> dict:
    """Evaluate the best model on test; write the model, card, metrics, table and curve to --output_dir."""
    out = Path(args.output_dir)
    head_class = HEADS[args.head]
    model = head_class.from_pretrained(best_dir).to(accelerator.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(best_dir)
    results: dict[str, Any] = {}
    decoding_bias: dict[str, Any] | None = None
    if args.head == "generation" and args.tune_decoding_bias and "validation" in data:
        tuned = tune_decoding_bias(
            model,
            lambda m: predict_split(accelerator, m, tokenizer, data["validation"]["text"], args, 1, "tune bias"),
            data["validation"]["labels"],
            Counter(label for row in data["train"]["labels"] for label in row),
            set_search_rounds=args.set_search_rounds,
        )
        decoding_bias = {k: v for k, v in tuned.items() if k != "grid"}
        logger.info(
            "decoding bias: EOS %+.2f, prior weight %.2f, label names %.2f, lexical %.2f, set search %d rounds "
            "(reward %.2f) (validation micro-F1 %.4f; %.4f without)",
            tuned["eos_logit_bias"], tuned["prior_weight"], tuned["label_name_bias"], tuned["lexical_logit_weight"],
            tuned["set_search_rounds"], tuned["set_search_label_bias"], tuned["micro_f1"], tuned["unbiased_micro_f1"],
        )  # fmt: skip
    if "test" in data and not args.skip_test:
        references = data["test"]["labels"]
        texts = data["test"]["text"]
        predictions = predict_split(accelerator, model, tokenizer, texts, args, 1, "test")
        results = evaluate_predictions(predictions, references, labels)
        if args.head == "generation" and args.num_beams > 1:
            beam = predict_split(
                accelerator, model, tokenizer, texts, args, args.num_beams, f"test (beam {args.num_beams})"
            )
            results["beam"] = {"num_beams": args.num_beams, **evaluate_predictions(beam, references, labels)}
    if accelerator.is_main_process:
        model.save_pretrained(out, safe_serialization=True)
        save_tokenizer(tokenizer, out)
        metrics = {k: results[k] for k in METRIC_KEYS if k in results}
        training_args = {
            k: getattr(args, k)
            for k in ("head", "epochs", "batch_size", "learning_rate", "weight_decay", "warmup_ratio", "dropout",
                      "label_order", "max_length", "seed")
        }  # fmt: skip
        training_args["best epoch (validation micro-F1)"] = f"{state['best_epoch']} ({state['best_micro_f1']:.4f})"
        reuters = args.dataset_name is None and args.train_file is None
        card = build_model_card(
            model,
            metrics,
            dataset_name="Reuters-21578 ApteMod" if reuters else (args.dataset_name or Path(args.train_file).name),
            dataset_id="reuters21578" if reuters else (args.dataset_name or "custom"),
            dataset_description=REUTERS_DESCRIPTION if reuters else "User-provided data.",
            training_args=training_args,
        )
        card.save(out / "README.md")
        tested = bool(results)  # False with --skip_test (or no test split)
        if decoding_bias is not None:
            results["decoding_bias"] = decoding_bias
        if results:
            write_json(results, out / "test_metrics.json")
        if tested:
            (out / "per_label_metrics.md").write_text(per_label_table(predictions, references, labels))
        write_json(state["history"], out / "history.json")
        plot_training_curve(state["history"], out / "training_curve.png")
        if tested:
            accelerator.print("\nTest metrics:")
            for key in METRIC_KEYS:
                accelerator.print(f"  {key:16s} {results[key]:.4f}")
            if "beam" in results:
                accelerator.print(f"  beam {args.num_beams}: micro-F1 {results['beam']['micro_f1']:.4f}")
            accelerator.print("\nExample predictions (test):")
            for text, gold, pred in list(zip(texts, references, predictions))[: args.show_examples]:
                title = text.split("\n", 1)[0][:70]
                accelerator.print(f"  {title!r}\n    gold: {sorted(gold)}  predicted: {pred}")
        accelerator.print(f"\nSaved the model, tokenizer and model card to {out}")
    return results


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _last_checkpoint(args: argparse.Namespace) -> str:
    found = list_checkpoints(args.output_dir)
    return str(found[-1]) if found else "none yet"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``parse_args`` adds the presets, defaults and checks)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="Model/optimisation settings; explicit flags win.")
    p.add_argument("--head", choices=sorted(HEADS), default="generation")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite_output_dir", action="store_true")
    g = p.add_argument_group("data (default: the embedded Reuters-21578 ApteMod)")
    g.add_argument("--train_file")
    g.add_argument("--validation_file")
    g.add_argument("--test_file")
    g.add_argument("--dataset_name", help="A Hub data set (needs a network).")
    g.add_argument("--dataset_config_name")
    g.add_argument("--text_column", default="text")
    g.add_argument("--label_column", default="labels")
    g.add_argument("--label_delimiter", help="Split string labels on this (e.g. ';').")
    g.add_argument("--validation_fraction", type=float, default=0.1)
    g.add_argument(
        "--split_seed", type=int,
        help="Seed of the validation split (default: --seed). Fix it to train several seeds on one split (ensembles).",
    )  # fmt: skip
    g.add_argument("--allow_empty_labels", action="store_true", help="Allow rows with no label (min_labels=0).")
    g.add_argument("--max_train_samples", type=int)
    g = p.add_argument_group("model")
    g.add_argument("--tokenizer_name_or_path", help="Use this tokenizer instead of training one.")
    g.add_argument("--init_encoder_from", help="Start from the encoder of this saved model (e.g. a threshold run).")
    g.add_argument("--vocab_size", type=int)
    g.add_argument("--max_length", type=int, help="Tokens per document (truncation).")
    g.add_argument("--d_model", type=int)
    g.add_argument("--encoder_layers", type=int)
    g.add_argument("--decoder_layers", type=int)
    g.add_argument("--attention_heads", type=int)
    g.add_argument("--ffn_dim", type=int)
    g.add_argument("--dropout", type=float)
    g.add_argument("--activation", choices=["relu", "gelu"], default="relu")
    g.add_argument("--norm_position", choices=["post", "pre"])
    g.add_argument("--position_embedding_type", choices=["sinusoidal", "learned"], default="sinusoidal")
    g.add_argument("--label_order", choices=["frequency", "alphabetical", "random"], default="frequency")
    g.add_argument("--label_smoothing", type=float, default=0.0)
    g.add_argument("--max_labels", type=int, help="Default: the most labels any training document has.")
    g.add_argument("--parallel_loss", choices=["ordered", "hungarian"], default="ordered", help="--head parallel")
    g.add_argument("--scheduled_sampling", type=float, default=0.0, help="Final probability of feeding predictions.")
    g.add_argument("--auxiliary_bce_weight", type=float, default=0.0, help="Generation head: auxiliary BCE loss.")
    g.add_argument(
        "--global_label_logits", action=argparse.BooleanOptionalAction, default=False,
        help="Generation head: add a document-level classifier's per-label logits (mean-pooled encoder) to the "
        "label logits at every step. With --init_encoder_from a threshold run it starts from that run's classifier.",
    )  # fmt: skip
    g.add_argument(
        "--lexical_scorer", action=argparse.BooleanOptionalAction, default=None,
        help="Threshold and generation heads (default on; --no-lexical_scorer turns it off): fit a linear SVM on the "
        "tf-idf bag of each training document's tokens before training (convex; seconds on Reuters, 2 cores) and add "
        "its margins to the label logits when deciding, with a weight fit on validation (with the threshold, or with "
        "the decoding bias).",
    )  # fmt: skip
    g.add_argument(
        "--lexical_c", type=float, default=LEXICAL_C, help="The lexical scorer's SVM regularisation constant C."
    )
    g.add_argument(
        "--lexical_stacking", type=float, default=0.0,
        help="Stacking (needs --lexical_scorer): add this weight times out-of-fold lexical margins (5 scorers, each "
        "fit without a fifth of the training documents) to the label logits in the training loss, so the network "
        "learns what the SVM misses. 0 (default) = off; the decision weight is still fit on validation.",
    )  # fmt: skip
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--max_steps", type=int, help="Stop after this many optimizer steps (overrides --epochs).")
    g.add_argument("--batch_size", type=int, help="Per device.")
    g.add_argument("--eval_batch_size", type=int, default=64)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--warmup_ratio", type=float)
    g.add_argument("--lr_scheduler", default="linear", choices=["linear", "cosine", "constant_with_warmup"])
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--encoder_lr_scale", type=float, default=1.0, help="Encoder lr = this x --learning_rate.")
    g.add_argument("--early_stopping_patience", type=int)
    g.add_argument("--ema_decay", type=float, help="Evaluate and keep an EMA of the weights (e.g. 0.999); 0 = off.")
    g.add_argument(
        "--group_by_length", action=argparse.BooleanOptionalAction, default=False,
        help="Batch documents of similar length together: less padding, but on Reuters batches of short "
        "documents share their labels and validation micro-F1 rose more slowly (0.696 vs 0.796 after 4 epochs).",
    )  # fmt: skip
    g.add_argument("--mixed_precision", choices=["auto", "no", "fp16", "bf16"], default="auto")
    g.add_argument("--cpu", action="store_true", help="Train on the CPU even if a GPU is present.")
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("checkpoints, evaluation, logging")
    g.add_argument("--save_every_steps", type=int, default=0)
    g.add_argument("--save_total_limit", type=int, default=2)
    g.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or 'latest' in --output_dir.")
    g.add_argument("--stop_after_steps", type=int, help="Stop as if interrupted after this many steps (testing).")
    g.add_argument(
        "--tune_decoding_bias", action=argparse.BooleanOptionalAction, default=True,
        help="Generation head: after training, fit the EOS bias and the rare-label logit adjustment on validation.",
    )  # fmt: skip
    g.add_argument(
        "--set_search_rounds", type=int, default=SET_SEARCH_ROUNDS,
        help="Generation head, with --tune_decoding_bias: also try refining each decoded label set by this many "
        "rounds of set search (add or drop one label, scored on the whole set) and keep it if validation prefers "
        "it; 0 = never.",
    )  # fmt: skip
    g.add_argument(
        "--label_names", action=argparse.BooleanOptionalAction, default=True,
        help="Use the label names as evidence: a label whose name occurs in a document gets a logit bonus, fit on "
        "validation with the threshold (threshold head) or with the decoding bias (generation head).",
    )  # fmt: skip
    g.add_argument(
        "--label_name_feature", action=argparse.BooleanOptionalAction, default=False,
        help="With --label_names (threshold and generation heads): also learn, in training, how much a label's name "
        "in a document counts (one shared weight plus one per label, added to the named labels' logits).",
    )  # fmt: skip
    g.add_argument("--num_beams", type=int, default=3, help="Also evaluate test with this beam width (generation).")
    g.add_argument("--report_to", default="auto", help="'auto' (tensorboard/trackio if installed), 'none', or one.")
    g.add_argument("--show_examples", type=int, default=5)
    g.add_argument("--skip_test", action="store_true", help="Do not touch the test split (for tuning runs).")
    g.add_argument("--no_progress", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    settings = {**DEFAULTS, **PRESETS.get(args.preset, {})}
    for key, value in settings.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.label_name_feature and (not args.label_names or args.head == "parallel"):
        p.error("--label_name_feature needs --label_names and the threshold or generation head.")
    if args.global_label_logits and args.head != "generation":
        p.error(f"--global_label_logits is for --head generation (got --head {args.head}).")
    if args.lexical_scorer and args.head == "parallel":
        p.error("--lexical_scorer is for the threshold and generation heads (got --head parallel).")
    if args.lexical_scorer is None:  # on where the head supports it
        args.lexical_scorer = args.head != "parallel"
    if not args.lexical_c > 0:
        p.error(f"--lexical_c must be > 0 (got {args.lexical_c}).")
    if not (math.isfinite(args.lexical_stacking) and args.lexical_stacking >= 0):
        p.error(f"--lexical_stacking must be a finite number >= 0 (got {args.lexical_stacking}); 0 turns it off.")
    if args.lexical_stacking and not args.lexical_scorer:
        p.error("--lexical_stacking needs the lexical scorer (--lexical_scorer, threshold or generation head).")
    if args.set_search_rounds < 0:
        p.error(f"--set_search_rounds must be >= 0 (got {args.set_search_rounds}); 0 never tries set search.")
    if args.encoder_lr_scale <= 0:
        p.error(f"--encoder_lr_scale must be > 0 (got {args.encoder_lr_scale}); 1 trains all weights at one rate.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        training_function(args)
    except (TrainingError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Finished in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
