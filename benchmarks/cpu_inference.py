#!/usr/bin/env python
"""CPU inference in fp32, bf16 autocast and int8 (`quantize_int8`): speed and test quality.

Speed: the `speed.py` label head (``--size``, random weights, 15 labels + EOS) over 90 and 10,000 labels,
one batch of ``predict_batch`` (what `predict_labels` runs per batch) at b1 and the size's generation
batch: fp32; bf16 autocast entered per call (so each call also pays for casting the weights, as
``predict_labels(..., dtype=torch.bfloat16)`` does); and the model's int8 copy (``model.quantize_int8()``,
made once). Quality (with ``--model``): a saved model folder's test micro-/macro-F1 on the embedded
Reuters split through `predict_labels` in each precision, with the wall-clock time of each pass (after
an untimed warm-up call on 64 texts).

    python benchmarks/cpu_inference.py --model outputs/quick --json cpu_inference.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import speed  # noqa: E402
from profile_label_decoding import median_ms  # noqa: E402
from transformers import AutoModelForSeq2SeqLM  # noqa: E402

from modeling import load_multilabel_dataset  # noqa: E402
from modeling.evaluation_labelformer import evaluate_predictions  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8")


def _runners(model) -> dict:
    """One ``(ids, mask) -> predictions`` function per precision (the int8 copy is made here, once)."""
    int8 = model.quantize_int8()

    def bf16(ids, mask):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.predict_batch(ids, mask)

    return {"fp32": model.predict_batch, "bf16": bf16, "int8": int8.predict_batch}


def speed_table(size_name: str, repeats: int) -> list[dict]:
    """Milliseconds per `predict_batch` call in each precision, per label count and batch size."""
    size = speed.SIZES[size_name]
    rows = []
    for labels in (speed.NUM_LABELS, 10_000):
        torch.manual_seed(0)
        model = speed.build_model("labelformer-multilabel", size, num_labels=labels).eval()
        runners = _runners(model)
        for batch in (1, size["gen_batch"]):
            ids = torch.randint(4, size["vocab"], (batch, size["shapes"][0][1]))
            mask = torch.ones_like(ids)
            row = {"labels": labels, "batch": batch}
            with torch.inference_mode():
                for name, run in runners.items():
                    row[f"{name}_ms"] = median_ms(lambda run=run, ids=ids, mask=mask: run(ids, mask), repeats)
            row.update({f"{name}_speedup": row["fp32_ms"] / row[f"{name}_ms"] for name in PRECISIONS[1:]})
            rows.append(row)
    return rows


def quality(folder: str) -> dict:
    """Reuters test micro-/macro-F1 and seconds of ``folder``'s `predict_labels` in each precision."""
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()  # one Transformer or an ensemble
    int8 = model.quantize_int8()
    test = load_multilabel_dataset()["test"]
    texts, references = list(test["text"]), test["labels"]
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    calls = {"fp32": (model, None), "bf16": (model, torch.bfloat16), "int8": (int8, None)}
    result = {}
    for name, (predictor, dtype) in calls.items():
        predictor.predict_labels(texts[:64], allow_empty=True, dtype=dtype)  # warm-up, untimed: first calls cost more
        start = time.perf_counter()
        predictions = predictor.predict_labels(texts, allow_empty=True, dtype=dtype)
        seconds = time.perf_counter() - start
        metrics = evaluate_predictions(predictions, references, labels)
        result[name] = {"micro_f1": metrics["micro_f1"], "macro_f1": metrics["macro_f1"], "seconds": seconds}
    for name in PRECISIONS[1:]:
        result[f"{name}_micro_f1_change"] = result[name]["micro_f1"] - result["fp32"]["micro_f1"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(speed.SIZES), default="small")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model", help="A saved generation-head folder trained on the embedded Reuters data.")
    p.add_argument("--json", help="Also write the results here.")
    args = p.parse_args(argv)
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("warning: this CPU has no bf16 kernels; bf16 will be slow here", file=sys.stderr)
    torch.set_num_threads(args.threads)
    result: dict = {"machine": speed.cpu_name(), "threads": args.threads, "torch": torch.__version__,
                    "quantized_engine": torch.backends.quantized.engine,
                    "speed": speed_table(args.size, args.repeats)}  # fmt: skip
    print("| labels | batch | fp32 | bf16 | int8 | bf16 speed-up | int8 speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["speed"]:
        print(f"| {row['labels']:,} | {row['batch']} | {row['fp32_ms']:.1f} ms | {row['bf16_ms']:.1f} ms | "
              f"{row['int8_ms']:.1f} ms | {row['bf16_speedup']:.2f}x | {row['int8_speedup']:.2f}x |")  # fmt: skip
    if args.model:
        result["quality"] = quality(args.model)
        print(f"\n{args.model}, Reuters test (micro-F1, macro-F1, seconds):")
        for name in PRECISIONS:
            q = result["quality"][name]
            print(f"  {name}: {q['micro_f1']:.4f} {q['macro_f1']:.4f} {q['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
