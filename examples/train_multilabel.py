#!/usr/bin/env python
"""Train a Labelformer multi-label classifier with Accelerate, from scratch, on CPU or many GPUs.

########################################################################
# This script shows:
#   - a tokenizer trained from scratch (no download) and a Labelformer head built from the data
#     (label-sequence generation by default, the threshold or the parallel head as options);
#   - training with Accelerate: one code path for 1 CPU and N GPUs, bf16 autocast where the GPU or
#     CPU has bf16 kernels, clipping, AdamW with warmup and linear decay;
#   - validation each epoch, early stopping on validation micro-F1, atomic checkpoints, exact resume;
#   - optional weight averaging (`--average_from_epoch`): from that epoch on, the mean of the weights
#     since then is what validation scores and the run keeps;
#   - after training, the optional hybrid part (`--lexical_scorer`, on by default): a tf-idf linear
#     model fit with scikit-learn whose scale is chosen on validation and which the model's own
#     forward() then adds to its label logits; the threshold head's threshold is folded into its bias;
#   - optionally (`--ensemble_with`), several Transformers in the shipped model: earlier runs' best
#     models (same split and tokenizer, other seeds) join this run's in one ensemble model whose
#     forward() averages their probabilities;
#   - the saved model, tokenizer, model card, metrics (the Transformer alone and the shipped model).
#
# Run on the embedded Reuters-21578 data, on 2 CPU cores in under 10 minutes:
#     python examples/train_multilabel.py --preset quick --output_dir outputs/quick
# A seconds-long smoke run:
#     python examples/train_multilabel.py --preset tiny --output_dir outputs/tiny
# On several GPUs, unchanged:
#     accelerate launch --multi_gpu --num_processes 4 examples/train_multilabel.py --preset base ...
########################################################################
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_utils import (  # noqa: E402
    TrainingError,
    WeightAverage,
    apply_learning_rate,
    check_finite_update,
    check_finite_weights_after_step,
    find_checkpoint,
    global_mean_loss,
    make_optimizer,
    predict_split,
    prepare_output_dir,
    quiesce_process_group,
    recorded_args,
    save_checkpoint,
    save_model,
    verify_checkpoint,
)

from modeling import (  # noqa: E402
    LabelformerConfig,
    LabelformerEnsembleForMultiLabelGeneration,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
    LabelformerForParallelLabelGeneration,
    MultiLabelCollator,
    build_label_vocabulary,
    fit_lexical_scorer,
    load_multilabel_dataset,
    split_unknown_labels,
    train_tokenizer,
)
from modeling.data_labelformer import report_unknown_labels  # noqa: E402
from modeling.ensemble_labelformer import check_compatible_configs  # noqa: E402
from modeling.evaluation_labelformer import (  # noqa: E402
    METRIC_KEYS,
    atomic_directory,
    calibrate_lexical_scale,
    calibrate_threshold_head,
    evaluate_predictions,
    per_label_table,
    plot_training_curve,
    write_json,
)
from modeling.hub_labelformer import TRAINING_DATA_FILE, build_model_card, describe_training_data  # noqa: E402
from modeling.prediction_labelformer import tokenizer_fingerprint  # noqa: E402
from modeling.tokenization_labelformer import save_tokenizer  # noqa: E402

logger = logging.getLogger("train_multilabel")

HEADS = {
    "generation": LabelformerForMultiLabelGeneration,
    "parallel": LabelformerForParallelLabelGeneration,
    "threshold": LabelformerForMultiLabelClassification,
}
# Model and optimisation settings per preset; any flag given on the command line wins.
PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a CPU: a smoke run for users and tests (300 training documents)
    "tiny": dict(vocab_size=500, max_length=32, d_model=32, encoder_layers=1, decoder_layers=1, attention_heads=2,
                 ffn_dim=64, epochs=2, batch_size=16, learning_rate=2e-3, max_train_samples=300),
    # 2 CPU cores, under 10 minutes end to end (tokenizer, training, calibration, test evaluation)
    # (bf16 autocast where the CPU has it pays for d_model 256: see benchmarks/RESULTS.md, 2026-12-04)
    "quick": dict(vocab_size=8000, max_length=128, d_model=256, encoder_layers=2, decoder_layers=1, attention_heads=4,
                  ffn_dim=1024, dropout=0.0, epochs=12, batch_size=32, learning_rate=1e-3, early_stopping_patience=4,
                  num_beams=1),  # no extra beam pass over test: about 20 s of the 10 minutes
}  # fmt: skip
# 2 CPU cores, about 20 minutes of training: the quick model on 256 tokens of a 16k vocabulary, longer, and from
# epoch 6 on the mean of the weights since then (examples/reproduce_reuters.py; benchmarks/RESULTS.md, 2026-12-04)
PRESETS["reproduce"] = {
    **PRESETS["quick"], "vocab_size": 16000, "max_length": 256, "epochs": 16, "average_from_epoch": 6,
}  # fmt: skip
# GPUs: the reproduce recipe at d_model 512 with 6 encoder + 2 decoder layers, lr 5e-4 (about 5 minutes on one
# H200 for Reuters). On Reuters and debtags it does not beat `reproduce`: the model-size search on an H200
# (benchmarks/RESULTS.md, 2026-12-04) found no gain in width or depth at 7,000 training documents.
PRESETS["base"] = {
    **PRESETS["reproduce"], "d_model": 512, "attention_heads": 8, "ffn_dim": 2048, "encoder_layers": 6,
    "decoder_layers": 2, "learning_rate": 5e-4,
}  # fmt: skip
DEFAULTS: dict[str, Any] = dict(
    vocab_size=16000, max_length=256, d_model=256, encoder_layers=2, decoder_layers=1, attention_heads=4,
    ffn_dim=1024, dropout=0.1, epochs=10, batch_size=32, learning_rate=1e-3, early_stopping_patience=3,
    average_from_epoch=0, num_beams=3,
)  # fmt: skip
WARMUP_RATIO = 0.05
SHOW_EXAMPLES = 5  # test predictions printed at the end


def build_config(args: argparse.Namespace, labels: list[str], tokenizer, max_labels_seen: int) -> LabelformerConfig:
    """The model's config; ``max_labels`` defaults to the most labels a training document has."""
    return LabelformerConfig.from_labels(
        labels,
        vocab_size=len(tokenizer),
        d_model=args.d_model,
        encoder_layers=args.encoder_layers,
        decoder_layers=args.decoder_layers,
        encoder_attention_heads=args.attention_heads,
        decoder_attention_heads=args.attention_heads,
        encoder_ffn_dim=args.ffn_dim,
        decoder_ffn_dim=args.ffn_dim,
        dropout=args.dropout,
        norm_position="pre",
        max_position_embeddings=max(512, args.max_length),
        label_order=args.label_order,
        min_labels=0 if args.allow_empty_labels else 1,
        max_labels=args.max_labels or max_labels_seen,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),  # predict_labels refuses any other tokenizer
    )


def resolve_mixed_precision(choice: str) -> str:
    """``auto``: bf16 autocast where the hardware computes in bf16 (a CUDA GPU with bf16, or a CPU whose oneDNN
    has bf16 kernels, e.g. AVX-512 BF16 or AMX), fp32 elsewhere."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def training_function(args: argparse.Namespace) -> dict[str, Any]:
    """Train, early-stop on validation micro-F1, calibrate, evaluate the best model on test."""
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # N processes without a GPU train together over gloo
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    for noisy in ("accelerate", "matplotlib", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if accelerator.is_main_process:
        prepare_output_dir(args)  # cleans up after a killed run; never deletes files a run does not write
    accelerator.wait_for_everyone()
    checkpoint = find_checkpoint(args)
    if checkpoint is not None:
        verify_checkpoint(checkpoint, args, accelerator.num_processes)
    set_seed(args.seed)

    # ---- data, tokenizer, model
    data = load_multilabel_dataset(
        train_file=args.train_file, test_file=args.test_file, dataset_name=args.dataset_name,
        text_column=args.text_column, label_column=args.label_column, label_delimiter=args.label_delimiter,
        seed=args.split_seed, max_train_samples=args.max_train_samples, allow_empty_labels=args.allow_empty_labels,
    )  # fmt: skip
    train_labels = data["train"]["labels"]
    labels = build_label_vocabulary(train_labels, allow_empty=args.allow_empty_labels)
    label2id = {label: i for i, label in enumerate(labels)}
    for split in ("validation", "test"):
        if split in data:
            report_unknown_labels(split_unknown_labels(data[split]["labels"], label2id)[1], split)
    max_labels_seen = max(1, max(len(x) for x in train_labels))
    # the members' tokenizer: one tokenizer reads the text for every member
    member_tokenizer = AutoTokenizer.from_pretrained(args.ensemble_with[0]) if args.ensemble_with else None
    if member_tokenizer is not None:  # before anything is written: a member that cannot join is found now
        check_members(args, build_config(args, labels, member_tokenizer, max_labels_seen))
    saved_tokenizer = Path(args.output_dir) / "tokenizer"
    if checkpoint is None and accelerator.is_main_process:
        if member_tokenizer is not None:
            tokenizer = member_tokenizer
        else:
            tokenizer = train_tokenizer(
                data["train"]["text"], vocab_size=args.vocab_size, model_max_length=args.max_length
            )
        atomic_directory(saved_tokenizer, lambda folder: save_tokenizer(tokenizer, folder))
    accelerator.wait_for_everyone()
    tokenizer = AutoTokenizer.from_pretrained(saved_tokenizer)
    model = HEADS[args.head](build_config(args, labels, tokenizer, max_labels_seen))
    logger.info(
        "%s: %d labels, %s parameters, %d train / %d validation documents, %d process(es) (%s), autocast %s",
        type(model).__name__, len(labels), f"{sum(p.numel() for p in model.parameters()):,}",
        len(data["train"]), len(data["validation"]), accelerator.num_processes, accelerator.distributed_type,
        accelerator.mixed_precision,
    )  # fmt: skip

    train_set = data["train"].add_column("row", list(range(len(data["train"]))))
    head = "classification" if args.head == "threshold" else "generation"
    collator = MultiLabelCollator(tokenizer, model.config, args.max_length, head=head, seed=args.seed)
    # A private generator: creating a DataLoader iterator draws a seed from the loader's generator, and
    # drawing it from the global RNG would shift dropout masks after a resume.
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collator,
                              generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    optimizer = make_optimizer(model, args, accelerator.device)
    total_steps = args.epochs * math.ceil(len(train_loader) / accelerator.num_processes)
    # The prepared scheduler steps once per process per optimizer step: count in process-steps.
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(WARMUP_RATIO * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )  # fmt: skip
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if args.average_from_epoch and accelerator.distributed_type == DistributedType.FSDP:
        raise TrainingError("--average_from_epoch needs whole weights on every process; FSDP shards them. Train "
                            "with DDP (the default multi-GPU config) or without --average_from_epoch.")  # fmt: skip
    averaged = WeightAverage(accelerator.unwrap_model(model)) if args.average_from_epoch else None
    state: dict[str, Any] = {"epoch": 0, "batches_done": 0, "global_step": 0, "best_micro_f1": -1.0, "best_epoch": -1,
                             "epochs_without_improvement": 0, "history": []}  # fmt: skip
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if averaged is not None:
            averaged.load(checkpoint)
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        logger.info("resumed from %s (epoch %d, step %d)", checkpoint, state["epoch"], state["global_step"])
    apply_learning_rate(scheduler, args.learning_rate, state)  # a resume may lower it (see its docstring)
    if accelerator.is_main_process:  # the flags, and which learning rate trained which steps
        run_args = {**vars(args), "learning_rates": state["learning_rates"]}
        write_json(run_args, Path(args.output_dir) / "training_args.json")

    # ---- training loop
    best_dir = Path(args.output_dir) / "best_model"
    bar = tqdm(total=total_steps, initial=state["global_step"], desc="training",
               disable=not accelerator.is_local_main_process or args.no_progress)  # fmt: skip
    while state["epoch"] < args.epochs:
        model.train()
        train_loader.set_epoch(state["epoch"])
        collator.epoch = state["epoch"]
        skip = state["batches_done"]
        for batch in accelerator.skip_first_batches(train_loader, skip) if skip else train_loader:
            loss = global_mean_loss(accelerator, model, batch)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
            logged = accelerator.reduce(loss.detach(), reduction="mean").item()
            check_finite_update(logged, grad_norm, state, args.output_dir)  # NaN/inf: stop before the step
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state["batches_done"] += 1
            state["global_step"] += 1
            check_finite_weights_after_step(model, state, args.output_dir)  # so no saved weight is NaN/inf
            bar.update(1)
            bar.set_postfix(loss=f"{logged:.4f}")
            state["history"].append({"step": state["global_step"], "loss": logged})
            if args.save_every_steps and state["global_step"] % args.save_every_steps == 0:
                save_checkpoint(accelerator, args, state, averaged)
            if args.stop_after_steps and state["global_step"] >= args.stop_after_steps:
                logger.warning("stopped after %d steps (--stop_after_steps); continue with "
                               "--resume_from_checkpoint latest", state["global_step"])  # fmt: skip
                return {}

        # ---- end of epoch: validate (the Transformer alone, or from --average_from_epoch on the mean of
        # the weights since then), early stopping, checkpoint
        state["epoch"] += 1
        state["batches_done"] = 0
        model.eval()
        candidate, averaged_from = model, None
        if averaged is not None and state["epoch"] >= args.average_from_epoch:
            averaged.update_parameters(accelerator.unwrap_model(model))
            candidate, averaged_from = averaged.module, args.average_from_epoch
        predictions = predict_split(accelerator, candidate, tokenizer, data["validation"]["text"], args, 1,
                                    f"validation {state['epoch']}")  # fmt: skip
        metrics = evaluate_predictions(predictions, data["validation"]["labels"], labels)
        improved = metrics["micro_f1"] > state["best_micro_f1"]
        if improved:
            save_model(accelerator, candidate, tokenizer, best_dir)
        state["history"].append({"epoch": state["epoch"], "averaged_from": averaged_from,
                                 **{f"validation_{k}": v for k, v in metrics.items()}})  # fmt: skip
        logger.info("epoch %d%s: validation micro-F1 %.4f macro-F1 %.4f subset %.4f", state["epoch"],
                    f" (weights averaged since epoch {averaged_from})" if averaged_from else "",
                    metrics["micro_f1"], metrics["macro_f1"], metrics["subset_accuracy"])  # fmt: skip
        if improved:
            state.update(best_micro_f1=metrics["micro_f1"], best_epoch=state["epoch"], epochs_without_improvement=0)
        else:
            state["epochs_without_improvement"] += 1
        save_checkpoint(accelerator, args, state, averaged)
        if state["epochs_without_improvement"] >= args.early_stopping_patience:
            logger.info("early stopping: no improvement for %d epochs", args.early_stopping_patience)
            if averaged is not None and state["epoch"] < args.average_from_epoch:
                logger.warning("early stopping came before epoch %d: no weights were averaged (lower "
                               "--average_from_epoch or raise --early_stopping_patience)",
                               args.average_from_epoch)  # fmt: skip
            break
    bar.close()
    results = finish(accelerator, args, data, labels, state, best_dir)
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        del model, optimizer, train_loader, scheduler  # the DDP wrapper goes while the group is alive
        quiesce_process_group(accelerator)
    accelerator.end_training()
    return results


#: Flags of a member's run that must equal this run's: the members saw the same training documents.
SAME_DATA_FLAGS = ("split_seed", "train_file", "dataset_name", "text_column", "label_column", "label_delimiter",
                   "max_train_samples", "allow_empty_labels")  # fmt: skip


def check_members(args: argparse.Namespace, config: LabelformerConfig) -> None:
    """Refuse an ``--ensemble_with`` folder that is not one generation-head Transformer, whose config cannot join
    ``config`` (this run's), or whose run (its ``training_args.json`` beside ``best_model``) split other data."""
    configs = []
    for folder in args.ensemble_with:
        member = LabelformerConfig.from_pretrained(folder)
        if member.architectures != ["LabelformerForMultiLabelGeneration"]:
            raise TrainingError(f"--ensemble_with {folder} holds {member.architectures}, not one generation-head "
                                "Transformer: pass a run's best_model folder (the Transformer alone).")  # fmt: skip
        configs.append(member)
        saved = recorded_args(Path(folder).parent)
        if saved is None:
            logger.warning("--ensemble_with %s: no training_args.json beside it, so its training split is not "
                           "checked; it must not have trained on this run's validation documents", folder)  # fmt: skip
            continue
        differ = [f"--{k} {saved.get(k)!r} (this run: {getattr(args, k)!r})" for k in SAME_DATA_FLAGS
                  if saved.get(k) != getattr(args, k)]  # fmt: skip
        if differ:
            raise TrainingError(f"--ensemble_with {folder} was trained on other data: {', '.join(differ)}. Members "
                                "must share the data and --split_seed (else one trained on the other's validation "
                                "documents).")  # fmt: skip
    try:
        check_compatible_configs([config, *configs])
    except ValueError as error:
        raise TrainingError(f"--ensemble_with: {error}") from error


def load_members(folders: list[str]) -> list[LabelformerForMultiLabelGeneration]:
    """The saved generation models of ``--ensemble_with``, in eval mode."""
    return [LabelformerForMultiLabelGeneration.from_pretrained(folder).eval() for folder in folders]


def with_lexical_part(model, tokenizer, data, args, fitted=None):
    """The best model with the hybrid part: a copy whose config has ``lexical_scorer=True``, fit on the
    training texts with scikit-learn (or copied from the ``fitted`` scorer of the same data); its scale (and the
    threshold head's threshold) chosen on validation."""
    config = LabelformerConfig.from_dict({**model.config.to_dict(), "lexical_scorer": True})
    hybrid = type(model)(config)
    loaded = hybrid.load_state_dict(model.state_dict(), strict=False)
    if loaded.unexpected_keys or any(not key.startswith("lexical_scorer.") for key in loaded.missing_keys):
        raise TrainingError(f"Adding the lexical part lost weights: {loaded}.")
    hybrid = hybrid.to(model.device).eval()
    if fitted is not None:
        hybrid.lexical_scorer.load_state_dict(fitted.state_dict())
        return hybrid
    encoded = tokenizer(list(data["train"]["text"]), truncation=True, max_length=args.max_length)["input_ids"]
    targets = torch.zeros(len(encoded), config.num_labels)
    for row, names in enumerate(data["train"]["labels"]):
        targets[row, [config.label2id[name] for name in names if name in config.label2id]] = 1
    fit_lexical_scorer(hybrid.lexical_scorer, encoded, targets, tokenizer.all_special_ids)
    return hybrid


def finish(accelerator: Accelerator, args, data, labels: list[str], state: dict[str, Any], best_dir: Path) -> dict:
    """Calibrate the best model on validation, evaluate the Transformer alone and the shipped model on test,
    and write the shipped model, card, metrics, table and curve to --output_dir.

    With ``--ensemble_with`` the shipped model is the ensemble of this run's Transformer and those members
    (with the lexical part), and the test rows also hold ``ensemble`` (the members alone) and
    ``transformer_lexical`` (this run's Transformer with the lexical part): the ensemble's measured gain.
    ``calibration`` then holds ``transformer_lexical`` (that model's scale) and, for the shipped model,
    ``ensemble_validation_micro_f1`` (scale 0) in place of ``transformer_validation_micro_f1``."""
    out = Path(args.output_dir)
    transformer = HEADS[args.head].from_pretrained(best_dir).to(accelerator.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(best_dir)
    rows = [data["validation"][i] for i in range(len(data["validation"]))]
    candidates = {"transformer": transformer}  # name -> model whose test row is reported
    if args.ensemble_with:
        members = [transformer, *(member.to(accelerator.device) for member in load_members(args.ensemble_with))]
        candidates["ensemble"] = LabelformerEnsembleForMultiLabelGeneration.from_members(members)
    shipped, calibration = candidates.get("ensemble", transformer), {}
    hybrid = args.lexical_scorer and args.head != "parallel"  # the shipped model gets the lexical part
    if hybrid:
        if args.ensemble_with:
            single = with_lexical_part(transformer, tokenizer, data, args)
            calibration["transformer_lexical"] = calibrate_lexical_scale(single, tokenizer, rows, args.max_length)
            candidates["transformer_lexical"] = single
            shipped = with_lexical_part(shipped, tokenizer, data, args, fitted=single.lexical_scorer)
        else:
            shipped = with_lexical_part(transformer, tokenizer, data, args)
    if args.head == "threshold":
        calibration.update(calibrate_threshold_head(shipped, tokenizer, rows, args.max_length))
    elif hybrid:
        calibration.update(calibrate_lexical_scale(shipped, tokenizer, rows, args.max_length))
        if args.ensemble_with:  # scale 0 is the ensemble alone, not this run's Transformer
            calibration["ensemble_validation_micro_f1"] = calibration.pop("transformer_validation_micro_f1")
    if calibration:
        logger.info("calibration on validation: %s", calibration)
    results: dict[str, Any] = {"calibration": calibration}
    tested = "test" in data
    if tested:
        references, texts = data["test"]["labels"], data["test"]["text"]
        for name, model in (*candidates.items(), ("shipped", shipped)):
            predictions = predict_split(accelerator, model, tokenizer, texts, args, 1, f"test ({name})")
            results[name] = evaluate_predictions(predictions, references, labels)
        if args.head == "generation" and args.num_beams > 1:
            beam = predict_split(accelerator, shipped, tokenizer, texts, args, args.num_beams, "test (beam)")
            results["shipped_beam"] = {"num_beams": args.num_beams, **evaluate_predictions(beam, references, labels)}
    if accelerator.is_main_process:
        shipped.save_pretrained(out, safe_serialization=True)
        save_tokenizer(tokenizer, out)
        metrics = {k: results["shipped"][k] for k in METRIC_KEYS} if tested else {}
        training_args = {k: getattr(args, k) for k in ("head", "epochs", "batch_size", "learning_rate", "dropout",
                                                          "label_order", "max_length", "seed")}  # fmt: skip
        training_args["best epoch (validation micro-F1)"] = f"{state['best_epoch']} ({state['best_micro_f1']:.4f})"
        best = next((h for h in state["history"] if h.get("epoch") == state["best_epoch"]), {})
        if best.get("averaged_from"):
            training_args["weights"] = f"mean of epochs {best['averaged_from']} to {state['best_epoch']}"
        if args.ensemble_with:  # the other members' seeds, from their runs' records
            records = [recorded_args(Path(folder).parent) for folder in args.ensemble_with]
            seeds = [str(record.get("seed")) if record else "not recorded" for record in records]
            training_args["ensemble"] = f"this run's Transformer and {len(seeds)} more (seeds {', '.join(seeds)})"
        train_labels = data["train"]["labels"]
        training_data = describe_training_data(
            train_file=args.train_file, dataset_name=args.dataset_name, dataset_license=args.dataset_license,
            split_sizes={split: len(data[split]) for split in data}, num_labels=len(labels),
            labels_per_document=sum(map(len, train_labels)) / max(1, len(train_labels)), test_file=args.test_file,
        )  # fmt: skip
        write_json(training_data.to_dict(), out / TRAINING_DATA_FILE)
        build_model_card(shipped, metrics, data=training_data, training_args=training_args).save(out / "README.md")
        write_json(results, out / "test_metrics.json")
        write_json(state["history"], out / "history.json")
        plot_training_curve(state["history"], out / "training_curve.png")
        if tested:
            (out / "per_label_metrics.md").write_text(per_label_table(predictions, references, labels))
            accelerator.print("\nTest metrics     Transformer alone   shipped model")
            for key in METRIC_KEYS:
                accelerator.print(f"  {key:16s} {results['transformer'][key]:.4f}              {metrics[key]:.4f}")
            accelerator.print("\nExample predictions of the shipped model (test):")
            examples = shipped.predict_labels(list(texts[:SHOW_EXAMPLES]), tokenizer, return_scores=True)
            for text, gold, pred in zip(texts, references, examples):
                accelerator.print(f"  {text.split(chr(10), 1)[0][:70]!r}\n    gold: {sorted(gold)}  predicted: "
                                  f"{ {k: round(v, 3) for k, v in pred.items()} }")  # fmt: skip
        accelerator.print(f"\nSaved the model, tokenizer and model card to {out}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="Model and schedule settings; flags given win.")
    p.add_argument("--head", choices=sorted(HEADS), default="generation")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite_output_dir", action="store_true")
    g = p.add_argument_group("data (default: the embedded Reuters-21578 ApteMod)")
    g.add_argument("--train_file", help="jsonl/json/csv/tsv/parquet, optionally gzipped; 10%% becomes validation.")
    g.add_argument("--test_file")
    g.add_argument("--dataset_name", help="A Hub data set (needs a network).")
    g.add_argument("--dataset_license", help="The data's licence, for the model card (default: unknown).")
    g.add_argument("--text_column", default="text")
    g.add_argument("--label_column", default="labels")
    g.add_argument("--label_delimiter", help="Split string labels at this character (e.g. ';'); '' keeps them whole.")
    g.add_argument("--allow_empty_labels", action="store_true", help="Allow documents without labels.")
    g.add_argument("--max_train_samples", type=int)
    g = p.add_argument_group("model")
    for name in ("vocab_size", "max_length", "d_model", "encoder_layers", "decoder_layers", "attention_heads",
                 "ffn_dim", "max_labels"):  # fmt: skip
        g.add_argument(f"--{name}", type=int)
    g.add_argument("--dropout", type=float)
    g.add_argument("--label_order", choices=["frequency", "alphabetical", "random"], default="frequency")
    g.add_argument(
        "--lexical_scorer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Threshold and generation heads: add the hybrid tf-idf linear part after training.",
    )
    g.add_argument(
        "--ensemble_with",
        nargs="+",
        metavar="FOLDER",
        help="Generation head: best_model folders of earlier runs (same data and --split_seed, another --seed) "
        "that join this run's Transformer in the shipped model, an ensemble averaging their probabilities. This "
        "run reads text with their tokenizer.",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch_size", type=int, help="Per process.")
    g.add_argument("--learning_rate", type=float)
    g.add_argument("--early_stopping_patience", type=int)
    g.add_argument("--average_from_epoch", type=int, help="From this epoch on, validate and keep the mean of the "
                   "weights since then (stochastic weight averaging); 0: off.")  # fmt: skip
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--split_seed", type=int, help="Seed of the train/validation split (default: --seed). Runs whose "
                   "models form an ensemble (--ensemble_with) must share it.")  # fmt: skip
    g.add_argument("--mixed_precision", choices=["auto", "bf16", "no"], default="auto",
                   help="Training autocast; auto: bf16 where the GPU or CPU computes in bf16.")  # fmt: skip
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--save_every_steps", type=int, default=0, help="Also checkpoint every N steps (0: per epoch).")
    g.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or 'latest' in --output_dir.")
    g.add_argument("--stop_after_steps", type=int, help="Stop as if interrupted after this many steps (testing).")
    g.add_argument(
        "--num_beams",
        type=int,
        help="Also evaluate test with this beam width (generation; default 3, "
        "1 in the quick preset and those built on it).",
    )
    g.add_argument("--no_progress", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for key, value in {**DEFAULTS, **PRESETS.get(args.preset, {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for name in ("epochs", "batch_size", "max_length", "vocab_size", "early_stopping_patience", "num_beams",
                 "d_model", "encoder_layers", "decoder_layers", "attention_heads", "ffn_dim"):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)}).")
    if not 0.0 <= args.dropout < 1.0:  # checked here, before minutes of data loading
        p.error(f"--dropout must be in [0, 1) (got {args.dropout}).")
    for name in ("max_labels", "max_train_samples", "save_every_steps", "stop_after_steps"):
        value, least = getattr(args, name), 0 if name == "save_every_steps" else 1
        if value is not None and value < least:
            p.error(f"--{name} must be >= {least} (got {value}).")
    if not 0 <= args.average_from_epoch <= args.epochs:
        p.error(f"--average_from_epoch must be 0 (off) or an epoch up to --epochs {args.epochs} "
                f"(got {args.average_from_epoch}).")  # fmt: skip
    if args.split_seed is None:
        args.split_seed = args.seed
    if args.ensemble_with and args.head != "generation":
        p.error(f"--ensemble_with builds an ensemble of generation heads; this run trains --head {args.head}.")
    missing = [folder for folder in args.ensemble_with or [] if not Path(folder, "config.json").is_file()
               or not Path(folder, "tokenizer.json").is_file()]  # fmt: skip
    if missing:
        p.error(f"--ensemble_with: {', '.join(missing)} holds no saved model with its tokenizer (config.json, "
                "tokenizer.json); pass runs' best_model folders.")  # fmt: skip
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        p.error(f"--learning_rate must be a finite number > 0 (got {args.learning_rate}).")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        training_function(args)
    except (TrainingError, ValueError, OSError, SafetensorError) as error:  # OSError etc.: input, full disk, ...
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Finished in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
