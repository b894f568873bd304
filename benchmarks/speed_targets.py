#!/usr/bin/env python
"""The speed issue's targets table: label decoding against CTranslate2, ``generate()`` against BART.

Every system runs in its own process, since two runtimes' thread pools in one process distort both
(by up to 2x on 2 cores): ``labelformer`` (the label head's ``generate()``, also of its int8 copy, and
``greedy_labels``, the seq2seq model's greedy and beam-4 ``generate()``), ``bart`` (the same-size BART's
``generate()``) and CTranslate2 running that BART converted (`speed_ctranslate2`), in float32 and int8.
The processes run in turn for ``rounds`` rounds (every other round in reverse order), each timing its
calls in turn (median of ``repeats``); a system's time is the median of its rounds. `speed.py` calls `run_targets`;
this file run as a script is one system's process (it prints one JSON line).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed  # noqa: E402

HERE = Path(__file__).resolve().parent
TORCH_SYSTEMS = ("labelformer", "bart")
CT2_SYSTEMS = ("ctranslate2-float32", "ctranslate2-int8")

#: (what is compared, our measurement, the reference's measurement(s), target at b1, target at batch B);
#: a ratio is reference time / our time (above 1: ours is faster) against the fastest reference listed.
TARGETS = (
    ("label decoding, head's generate() vs CTranslate2 (faster mode)", ("labelformer", "label generate()"),
     [(s, "translate") for s in CT2_SYSTEMS], 1.0, 1.0),
    ("label decoding, the head's int8 copy's generate() vs CTranslate2 (faster mode)",
     ("labelformer", "label generate() int8"), [(s, "translate") for s in CT2_SYSTEMS], 1.0, 1.0),
    ("label decoding, greedy_labels vs CTranslate2 (faster mode)", ("labelformer", "greedy_labels"),
     [(s, "translate") for s in CT2_SYSTEMS], None, None),
    ("greedy generate() vs BART", ("labelformer", "generate greedy"), [("bart", "generate greedy")], 2.0, 1.5),
    ("beam 4 generate() vs BART", ("labelformer", "generate beam 4"), [("bart", "generate beam 4")], 1.2, 1.2),
)  # fmt: skip
#: The absolute times printed first, as (row name, system, measurement).
TIME_ROWS = (
    ("CTranslate2 running the same-size BART, float32", "ctranslate2-float32", "translate"),
    ("CTranslate2, int8", "ctranslate2-int8", "translate"),
    (f"our greedy_labels ({speed.NUM_LABELS}-label vocabulary, 15 labels + EOS)", "labelformer", "greedy_labels"),
    ("our label head's generate() (the HF-standard call)", "labelformer", "label generate()"),
    ("the same, the head's int8 copy (`quantize_int8()`)", "labelformer", "label generate() int8"),
    ("our generate() greedy, 16 tokens", "labelformer", "generate greedy"),
    ("HF BART generate() greedy, same size", "bart", "generate greedy"),
    ("our generate() beam 4, 16 tokens", "labelformer", "generate beam 4"),
    ("HF BART generate() beam 4, same size", "bart", "generate beam 4"),
)


def ctranslate2_available() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


def torch_worker(system: str, size_name: str, threads: int, repeats: int) -> dict[str, float]:
    """One torch system's median times in seconds, ``{"<measurement> b<batch>": seconds}``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    size = speed.SIZES[size_name]
    device, src = torch.device("cpu"), size["shapes"][0][1]
    names = ("labelformer", "labelformer-multilabel") if system == "labelformer" else ("bart",)
    models = speed.build_models(size, device, torch.float32, "sdpa", names)
    models = {name: model.eval() for name, model in models.items()}
    if system == "labelformer":
        try:
            models["labelformer-multilabel int8"] = models["labelformer-multilabel"].quantize_int8()
        except RuntimeError as error:  # a torch without int8 CPU kernels: that row stays empty
            print(f"(int8 not measured: {error})", file=sys.stderr)
    calls = {}
    for batch in (1, size["gen_batch"]):
        ids = torch.randint(4, size["vocab"], (batch, src))
        mask = torch.ones_like(ids)
        seq2seq = models["bart" if system == "bart" else "labelformer"]
        for beams, name in ((1, "generate greedy"), (4, "generate beam 4")):
            kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=speed.NEW_TOKENS,
                          min_new_tokens=speed.NEW_TOKENS, num_beams=beams, do_sample=False)  # fmt: skip
            calls[f"{name} b{batch}"] = lambda m=seq2seq, kw=kwargs: m.generate(**kw)
        if system == "labelformer":
            head = models["labelformer-multilabel"]
            calls[f"label generate() b{batch}"] = lambda m=head, i=ids, a=mask: m.generate(
                input_ids=i, attention_mask=a
            )
            int8 = models.get("labelformer-multilabel int8")
            if int8 is not None:
                calls[f"label generate() int8 b{batch}"] = lambda m=int8, i=ids, a=mask: m.generate(
                    input_ids=i, attention_mask=a
                )
            calls[f"greedy_labels b{batch}"] = lambda m=head, i=ids, a=mask: m.greedy_labels(i, a)
    with torch.inference_mode():
        return speed.timed_side_by_side(calls, device, repeats)


def _run(command: list[str]) -> dict:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_targets(size_name: str, threads: int, rounds: int, repeats: int, ctranslate2: bool = True) -> dict:
    """The targets table's times and ratios, each system in its own process (see the module docstring).

    Returns ``{"times_s": {system: {measurement: seconds}}, "targets": [rows], ...}``; without
    ``ctranslate2`` (or when it is not installed) the CTranslate2 rows are ``None``.
    """
    size = speed.SIZES[size_name]
    batches = (1, size["gen_batch"])
    ctranslate2 = ctranslate2 and ctranslate2_available()
    systems = TORCH_SYSTEMS + (CT2_SYSTEMS if ctranslate2 else ())
    with tempfile.TemporaryDirectory() as workdir:
        commands = {
            system: [sys.executable, __file__, system, "--size", size_name, "--threads", str(threads),
                     "--repeats", str(repeats)]
            for system in TORCH_SYSTEMS
        }  # fmt: skip
        version = None
        if ctranslate2:
            from speed_ctranslate2 import convert_bart

            torch.manual_seed(0)
            bart = speed.build_model("bart", size).eval()
            for system in CT2_SYSTEMS:
                model_dir = convert_bart(bart, Path(workdir) / system, quantization=system.split("-")[1])
                commands[system] = [
                    sys.executable, str(HERE / "speed_ctranslate2.py"), str(model_dir), "--vocab", str(size["vocab"]),
                    "--source", str(size["shapes"][0][1]), "--steps", str(speed.NEW_TOKENS), "--threads", str(threads),
                    "--repeats", str(repeats), "--batches", *map(str, batches),
                ]  # fmt: skip
            del bart
        per_round: dict[str, dict[str, list[float]]] = {system: {} for system in systems}
        for r in range(rounds):
            for system in systems if r % 2 == 0 else systems[::-1]:
                result = _run(commands[system])
                if system in CT2_SYSTEMS:
                    version = result.pop("version")
                    if set(result.pop("tokens").values()) != {speed.NEW_TOKENS}:
                        raise RuntimeError(f"{system} did not decode {speed.NEW_TOKENS} tokens per row")
                    result = {f"translate {name}": seconds for name, seconds in result.items()}
                for name, seconds in result.items():
                    per_round[system].setdefault(name, []).append(seconds)
    times = {system: {name: statistics.median(v) for name, v in values.items()} for system, values in per_round.items()}

    def time_of(system: str, measurement: str, batch: int) -> float | None:
        return times.get(system, {}).get(f"{measurement} b{batch}")

    rows = []
    for title, ours, references, target_b1, target_bb in TARGETS:
        row = {"measurement": title}
        for batch, target in zip(batches, (target_b1, target_bb)):
            own = time_of(*ours, batch)
            reference_times = [t for t in (time_of(*ref, batch) for ref in references) if t is not None]
            ratio = min(reference_times) / own if reference_times else None
            row[f"b{batch}"] = ratio
            row[f"target_b{batch}"] = target
            row[f"met_b{batch}"] = None if ratio is None or target is None else ratio >= target
        rows.append(row)
    return {"rounds": rounds, "repeats": repeats, "threads": threads, "ctranslate2_version": version,
            "batches": list(batches), "times_s": times, "targets": rows}  # fmt: skip


def format_targets(result: dict) -> str:
    """The absolute times and the targets table, as Markdown."""
    b1, bb = (f"b{b}" for b in result["batches"])
    lines = [f"| measurement | {b1} | {bb} |", "|---|---:|---:|"]
    for title, system, measurement in TIME_ROWS:
        values = [result["times_s"].get(system, {}).get(f"{measurement} {b}") for b in (b1, bb)]
        if any(v is not None for v in values):
            cells = " | ".join("n/a" if v is None else f"{v * 1e3:.1f} ms" for v in values)
            lines.append(f"| {title} | {cells} |")
    lines += ["", f"| target (ratio = reference time / ours) | {b1} | {bb} | target |", "|---|---:|---:|---|"]
    for row in result["targets"]:
        cells = []
        for b in (b1, bb):
            ratio, met = row[b], row[f"met_{b}"]
            cells.append("n/a" if ratio is None else f"{ratio:.2f}x" + ("" if met is None else " (met)" if met else ""))
        targets = [row[f"target_{b}"] for b in (b1, bb)]
        target = "-" if targets[0] is None else f">= {targets[0]}x / >= {targets[1]}x"
        lines.append(f"| {row['measurement']} | {' | '.join(cells)} | {target} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One torch system's process of the targets table (prints JSON).")
    p.add_argument("system", choices=TORCH_SYSTEMS)
    p.add_argument("--size", choices=sorted(speed.SIZES), default="small")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(json.dumps(torch_worker(args.system, args.size, args.threads, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
