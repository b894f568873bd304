#!/usr/bin/env python
"""bf16 inference (`predict_labels(..., dtype=torch.bfloat16)`) against fp32: speed and test quality.

Speed: the `speed.py` label head (``--size``, random weights, 15 labels + EOS) over 90 and 10,000 labels,
one batch of ``predict_batch`` (what `predict_labels` runs per batch) at b1 and b16, fp32 against bf16
autocast entered per call (so each call also pays for casting the weights). Quality (with ``--model``): a
saved model folder's test micro-F1 on the embedded Reuters split through `predict_labels`, fp32 and bf16,
with the wall-clock time of each pass over the test set.

    python benchmarks/bf16_inference.py --model outputs/quick --json bf16.json
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

from modeling import LabelformerForMultiLabelGeneration, load_multilabel_dataset  # noqa: E402
from modeling.evaluation_labelformer import evaluate_predictions  # noqa: E402


def speed_table(size_name: str, repeats: int) -> list[dict]:
    """Milliseconds per `predict_batch` call, fp32 and bf16, per label count and batch size."""
    size = speed.SIZES[size_name]
    rows = []
    for labels in (speed.NUM_LABELS, 10_000):
        torch.manual_seed(0)
        model = speed.build_model("labelformer-multilabel", size, num_labels=labels).eval()
        for batch in (1, size["gen_batch"]):
            ids = torch.randint(4, size["vocab"], (batch, size["shapes"][0][1]))
            mask = torch.ones_like(ids)

            def fp32(model=model, ids=ids, mask=mask):
                return model.predict_batch(ids, mask)

            def bf16(model=model, ids=ids, mask=mask):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model.predict_batch(ids, mask)

            with torch.inference_mode():
                fp32_ms, bf16_ms = median_ms(fp32, repeats), median_ms(bf16, repeats)
            rows.append({"labels": labels, "batch": batch, "fp32_ms": fp32_ms, "bf16_ms": bf16_ms,
                         "speedup": fp32_ms / bf16_ms})  # fmt: skip
    return rows


def quality(folder: str) -> dict:
    """Reuters test micro-/macro-F1 and seconds of ``folder``'s `predict_labels`, fp32 and bf16."""
    model = LabelformerForMultiLabelGeneration.from_pretrained(folder).eval()
    test = load_multilabel_dataset()["test"]
    texts, references = list(test["text"]), test["labels"]
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    result = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        start = time.perf_counter()
        predictions = model.predict_labels(texts, allow_empty=True, dtype=dtype)
        seconds = time.perf_counter() - start
        metrics = evaluate_predictions(predictions, references, labels)
        result[name] = {"micro_f1": metrics["micro_f1"], "macro_f1": metrics["macro_f1"], "seconds": seconds}
    result["micro_f1_change"] = result["bf16"]["micro_f1"] - result["fp32"]["micro_f1"]
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
                    "speed": speed_table(args.size, args.repeats)}  # fmt: skip
    print("| labels | batch | fp32 | bf16 | speed-up |\n|---:|---:|---:|---:|---:|")
    for row in result["speed"]:
        print(f"| {row['labels']:,} | {row['batch']} | {row['fp32_ms']:.1f} ms | {row['bf16_ms']:.1f} ms | "
              f"{row['speedup']:.2f}x |")  # fmt: skip
    if args.model:
        result["quality"] = quality(args.model)
        q = result["quality"]
        fp32, bf16 = q["fp32"], q["bf16"]
        print(f"\n{args.model}, Reuters test: micro-F1 {fp32['micro_f1']:.4f} (fp32, {fp32['seconds']:.1f} s) "
              f"-> {bf16['micro_f1']:.4f} (bf16, {bf16['seconds']:.1f} s)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
