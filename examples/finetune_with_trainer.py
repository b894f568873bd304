#!/usr/bin/env python
"""Fine-tune a saved Labelformer label generator on new data with the Hugging Face `Seq2SeqTrainer`.

########################################################################
# This script shows:
#   - loading a trained Labelformer folder (local or a Hub repo id) with `AutoModelForSeq2SeqLM`;
#   - turning multi-label rows into label-sequence targets for `DataCollatorForSeq2Seq`
#     (`label_sequence_preprocessor`: the mapped rows hold only model inputs, so Trainer's defaults work);
#   - `Seq2SeqTrainer` with `predict_with_generate` (constrained label decoding) and metrics from the
#     model's own `decode_labels` (`multilabel_compute_metrics`);
#   - checkpoints that carry the model code, so they load with `trust_remote_code=True`.
#
#     python examples/finetune_with_trainer.py --model_name_or_path outputs/quick \
#         --train_file new_train.jsonl --validation_file new_val.jsonl --output_dir outputs/finetuned
#
# The label vocabulary is the model's: labels it does not know are counted, reported and dropped from the
# training targets; the validation metrics still count them as misses.
########################################################################
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from modeling import load_multilabel_dataset, split_unknown_labels  # noqa: E402
from modeling.data_labelformer import report_unknown_labels  # noqa: E402
from modeling.trainer_labelformer import label_sequence_preprocessor, multilabel_compute_metrics  # noqa: E402

logger = logging.getLogger("finetune_with_trainer")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--model_name_or_path", required=True, help="A Labelformer folder or Hub repo id.")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--train_file")
    p.add_argument("--validation_file")
    p.add_argument("--dataset_name")
    p.add_argument("--text_column", default="text")
    p.add_argument("--label_column", default="labels")
    p.add_argument("--label_delimiter")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--max_steps", type=int, default=-1)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--trust_remote_code", action="store_true", help="Run the model folder's own code.")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    out = Path(args.output_dir)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        print(f"error: --output_dir {out} is not empty (pass --overwrite_output_dir)", file=sys.stderr)
        return 2
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    if not hasattr(model, "decode_labels"):
        print(f"error: {args.model_name_or_path} is not a Labelformer label generator", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    config = model.config
    data = load_multilabel_dataset(
        train_file=args.train_file,
        validation_file=args.validation_file,
        dataset_name=args.dataset_name,
        text_column=args.text_column,
        label_column=args.label_column,
        label_delimiter=args.label_delimiter,
        seed=args.seed,
    )
    for split in data:
        report_unknown_labels(split_unknown_labels(data[split]["labels"], config.label2id)[1], split)

    # "random" label order is drawn once here; the Accelerate script re-draws it every epoch
    encode = label_sequence_preprocessor(tokenizer, config, max_length=args.max_length)
    encoded = data.map(encode, batched=True, remove_columns=data["train"].column_names)
    steps_per_epoch = -(-len(encoded["train"]) // args.batch_size)
    total_steps = args.max_steps if args.max_steps > 0 else int(steps_per_epoch * args.epochs)
    training_args = Seq2SeqTrainingArguments(
        output_dir=str(out),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=int(0.05 * total_steps),  # an int: works across transformers 5.x releases
        weight_decay=0.01,
        eval_strategy="epoch" if args.max_steps < 0 else "steps",
        eval_steps=None if args.max_steps < 0 else max(1, args.max_steps // 2),
        save_strategy="epoch" if args.max_steps < 0 else "steps",
        save_steps=None if args.max_steps < 0 else max(1, args.max_steps // 2),
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="micro_f1",
        predict_with_generate=True,
        generation_max_length=config.effective_max_labels + 2,
        generation_num_beams=args.num_beams,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs a GPU (torch warns without one)
        seed=args.seed,
        logging_steps=10,
    )

    # scored against the raw label sets: labels the model has no token for count as misses
    compute_metrics = multilabel_compute_metrics(model, references=data["validation"]["labels"])

    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["validation"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    trainer.save_model(str(out))
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    print({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
