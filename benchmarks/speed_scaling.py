#!/usr/bin/env python
"""How label decoding's cost grows with the number of labels and the source length.

One cell per (labels, source length): a fresh process builds the label head over that many labels
(forced to write 15 labels + EOS, 16 decoder steps) and times its ``generate()`` at batch 1 and batch
B (median of ``repeats`` after two warm-ups), and reads the process's peak resident memory while
decoding. The peak is reset after the model is built and has decoded once at each batch size
(Linux ``/proc/self/clear_refs``), so ``b<B>_decode_peak_mib`` is what decoding adds on top of the
loaded model in the steady state; where the reset is not
available the peak since start is reported and ``peak_reset`` is false. `speed.py` calls
`run_scaling` and `plot_scaling`; this file run as a script is one cell (it prints one JSON line).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed  # noqa: E402

LABELS = (90, 1000, 10000)
SOURCES = (128, 512, 1024)


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def cell(labels: int, source_len: int, size_name: str, threads: int, repeats: int) -> dict:
    """Times (s) and peak memory (MiB) of the label head's ``generate()`` for one table cell."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    size = speed.SIZES[size_name]
    device = torch.device("cpu")
    model = speed.build_model("labelformer-multilabel", size, num_labels=labels).eval()
    result = {"labels": labels, "source_len": source_len,
              "parameters_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}  # fmt: skip
    inputs = {batch: torch.randint(4, size["vocab"], (batch, source_len)) for batch in (1, size["gen_batch"])}
    with torch.inference_mode():
        for ids in inputs.values():  # first calls allocate once for all: measure the steady state
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids))
    for batch, ids in inputs.items():
        mask = torch.ones_like(ids)
        gc.collect()
        before = _status_mib("VmRSS")
        result["peak_reset"] = _reset_peak()
        with torch.inference_mode():
            result[f"b{batch}_s"] = speed.timed(lambda i=ids, a=mask: model.generate(input_ids=i, attention_mask=a),
                                                device, repeats)  # fmt: skip
            steps = model.generate(input_ids=ids, attention_mask=mask).shape[1] - 1
        result[f"b{batch}_steps"] = steps
        result[f"b{batch}_decode_peak_mib"] = _status_mib("VmHWM") - before
        result[f"b{batch}_process_peak_mib"] = _status_mib("VmHWM")
    return result


def run_scaling(size_name: str, threads: int, repeats: int, labels=LABELS, sources=SOURCES, log=print) -> dict:
    """Every (labels, source length) cell, each in a fresh process; ``log`` gets one line per cell."""
    cells = []
    for source_len in sources:
        for num_labels in labels:
            command = [sys.executable, __file__, str(num_labels), str(source_len), "--size", size_name,
                       "--threads", str(threads), "--repeats", str(repeats)]  # fmt: skip
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
            cells.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            log(format_cell(cells[-1], speed.SIZES[size_name]["gen_batch"]))
    batch = speed.SIZES[size_name]["gen_batch"]
    by_key = {(c["labels"], c["source_len"]): c for c in cells}
    # the target: decoding time with the most labels over the time with the fewest, at batch B
    growth = {
        str(s): by_key[(max(labels), s)][f"b{batch}_s"] / by_key[(min(labels), s)][f"b{batch}_s"] for s in sources
    }
    return {"batch": batch, "threads": threads, "repeats": repeats, "cells": cells,
            f"time_ratio_{max(labels)}_vs_{min(labels)}_labels_b{batch}": growth}  # fmt: skip


def format_cell(c: dict, batch: int) -> str:
    return (f"labels {c['labels']:6d}  source {c['source_len']:5d}  b1 {c['b1_s'] * 1e3:8.1f} ms  "
            f"b{batch} {c[f'b{batch}_s'] * 1e3:8.1f} ms  decoding peak +{c[f'b{batch}_decode_peak_mib']:7.1f} MiB "
            f"(process {c[f'b{batch}_process_peak_mib']:.0f} MiB, "
            f"parameters {c['parameters_mib']:.1f} MiB)")  # fmt: skip


def format_scaling(result: dict) -> str:
    """The scaling table as Markdown."""
    b = result["batch"]
    lines = [f"| labels | source tokens | b1 | b{b} | b{b} decoding peak memory | parameters |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in result["cells"]:
        lines.append(f"| {c['labels']:,} | {c['source_len']:,} | {c['b1_s'] * 1e3:.1f} ms "
                     f"| {c[f'b{b}_s'] * 1e3:.1f} ms | +{c[f'b{b}_decode_peak_mib']:.0f} MiB "
                     f"| {c['parameters_mib']:.1f} MiB |")  # fmt: skip
    return "\n".join(lines)


def plot_scaling(result: dict, path: str | Path, title: str = "") -> None:
    """Time and decoding peak memory against the source length, one line per label count, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = result["batch"]
    labels = sorted({c["labels"] for c in result["cells"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for num_labels in labels:
        cells = sorted((c for c in result["cells"] if c["labels"] == num_labels), key=lambda c: c["source_len"])
        xs = [c["source_len"] for c in cells]
        line = left.plot(xs, [c[f"b{b}_s"] * 1e3 for c in cells], marker="o", label=f"{num_labels:,} labels, b{b}")
        left.plot(xs, [c["b1_s"] * 1e3 for c in cells], marker="o", linestyle="--", color=line[0].get_color(),
                  label=f"{num_labels:,} labels, b1")  # fmt: skip
        right.plot(xs, [c[f"b{b}_decode_peak_mib"] for c in cells], marker="o", label=f"{num_labels:,} labels")
    left.set(xlabel="source tokens", ylabel="generate() time (ms)", title="label decoding time")
    right.set(xlabel="source tokens", ylabel="MiB above the loaded model", title=f"peak memory while decoding, b{b}")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One cell of the scaling table (prints JSON).")
    p.add_argument("labels", type=int)
    p.add_argument("source_len", type=int)
    p.add_argument("--size", choices=sorted(speed.SIZES), default="small")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(json.dumps(cell(args.labels, args.source_len, args.size, args.threads, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
