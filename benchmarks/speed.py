#!/usr/bin/env python
"""Labelformer vs Hugging Face BART at identical sizes, measured side by side in one run.

Rows: training step (forward + backward + AdamW step) time, tokens/s and peak memory, on full rows
and on rows of document-like lengths (about 25% padding, which Labelformer's padding-free encoder
skips; the same shape without padding shows what that saves);
`generate()` of 16 new tokens at batch 1 and batch B (greedy and beam 4); and the multi-label
`predict_labels` path (label generation over a 90-label vocabulary) next to BART's generate.
Ratios are BART time / Labelformer time: above 1 means Labelformer is faster.

    python benchmarks/speed.py --device cpu --size small
    python benchmarks/speed.py --device cuda --size base --json speed.json

Absolute times on shared machines are noisy; compare ratios from the same run only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import BartConfig, BartForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from modeling import (  # noqa: E402
    LabelformerConfig,
    LabelformerForConditionalGeneration,
    LabelformerForMultiLabelGeneration,
    LabelformerForParallelLabelGeneration,
)

SIZES = {
    # Seconds; for checking that the script runs (tests), not for measuring.
    "tiny": dict(d_model=32, layers=1, heads=2, ffn=64, vocab=500, shapes=[(4, 32, 8)], gen_batch=4),
    # CPU-friendly: runs in about a minute on 2 cores.
    "small": dict(d_model=256, layers=3, heads=4, ffn=1024, vocab=8000, shapes=[(16, 128, 16)], gen_batch=16),
    # Transformer-base (Vaswani et al.), the shapes of the speed targets.
    "base": dict(d_model=512, layers=6, heads=8, ffn=2048, vocab=32000, shapes=[(64, 256, 32), (32, 128, 128)],
                 gen_batch=64),
}  # fmt: skip
NEW_TOKENS = 16
NUM_LABELS = 90
MODEL_NAMES = ("labelformer", "bart", "labelformer-multilabel", "parallel")


def build_model(name: str, size: dict, num_labels: int = NUM_LABELS):
    """One of the benchmark's models, random weights, dropout off: ``labelformer`` (the seq2seq model),
    ``bart`` (`BartForConditionalGeneration` of the same size), ``labelformer-multilabel`` (the label
    head over ``num_labels`` labels, forced to write 15 labels + EOS: 16 decoder steps, BART's 16 new
    tokens) or ``parallel`` (the parallel label decoder)."""
    common = dict(d_model=size["d_model"], encoder_layers=size["layers"], decoder_layers=size["layers"],
                  encoder_attention_heads=size["heads"], decoder_attention_heads=size["heads"],
                  encoder_ffn_dim=size["ffn"], decoder_ffn_dim=size["ffn"], dropout=0.0)  # fmt: skip
    if name == "labelformer":
        config = LabelformerConfig(
            vocab_size=size["vocab"], max_position_embeddings=1024, attention_dropout=0.0, **common
        )
        return LabelformerForConditionalGeneration(config)
    if name == "bart":
        config = BartConfig(vocab_size=size["vocab"], max_position_embeddings=1024, attention_dropout=0.0,
                            activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            decoder_start_token_id=1, forced_eos_token_id=None, **common)  # fmt: skip
        return BartForConditionalGeneration(config)
    labels = [f"label_{i}" for i in range(num_labels)]
    config = LabelformerConfig.from_labels(
        labels, vocab_size=size["vocab"], max_position_embeddings=1024, max_labels=15, min_labels=15, **common
    )  # fmt: skip
    if name == "labelformer-multilabel":
        return LabelformerForMultiLabelGeneration(config)
    if name == "parallel":
        return LabelformerForParallelLabelGeneration(config)
    raise ValueError(f"unknown model {name!r}")


def build_models(size: dict, device: torch.device, dtype: torch.dtype, attn: str, names=MODEL_NAMES) -> dict:
    """``{name: model}`` for ``names`` (see `build_model`), on ``device`` in ``dtype``, with ``attn`` attention."""
    models = {}
    for name in names:
        model = build_model(name, size)
        model.config._attn_implementation = attn
        models[name] = model.to(device=device, dtype=dtype)
    return models


def _wall(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed_side_by_side(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                       warmup: int = 2) -> dict[str, float]:  # fmt: skip
    """Median wall time of each of ``fns``, called in turn each repeat so that a machine that speeds
    up or slows down during the run (shared CPUs) shifts all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_wall(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds (after ``warmup`` calls)."""
    return timed_side_by_side({"fn": fn}, device, repeats, warmup)["fn"]


def peak_memory(device: torch.device, fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory of one call, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**20


def train_step_fn(model, batch: dict, dtype: torch.dtype, optimizer: torch.optim.Optimizer | None = None):
    """One training step on ``batch``; pass ``optimizer`` to share one (and its memory) between steps."""
    if optimizer is None:
        fused = next(model.parameters()).device.type == "cuda"
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    model.train()

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.optimizer = optimizer
    return step


PARTS = ("side_by_side", "targets", "scaling")


def cpu_name() -> str:
    """The CPU model (Linux ``/proc/cpuinfo``), with the vector extensions that matter for inference."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extensions = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    return f"{name or platform.machine()} ({', '.join(extensions) or 'no AVX2'})"


def side_by_side(args: argparse.Namespace) -> dict:
    """Labelformer and BART in this process, timed in turn: the training and generation rows."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = SIZES[args.size]
    torch.manual_seed(0)
    models = build_models(size, device, dtype, args.attn)
    rows = []

    def add(kind: str, shape: str, ours: float, bart: float, extra: dict | None = None) -> None:
        rows.append({"kind": kind, "shape": shape, "labelformer_s": ours, "bart_s": bart, "ratio": bart / ours,
                     **(extra or {})})  # fmt: skip
        print(f"{kind:48s} {shape:16s} {ours * 1e3:10.1f}ms {bart * 1e3:10.1f}ms {bart / ours:6.2f}x", flush=True)

    print(f"device {device}, size {args.size}, {dtype}, attention {args.attn}, {torch.get_num_threads()} threads")
    print(f"{'measurement':48s} {'shape':16s} {'labelformer':>12s} {'bart':>12s} {'ratio':>7s}", flush=True)

    # ---- training: full rows, then rows of real document lengths (1/2 to all of s, ~25% padding,
    # as Reuters at 128 tokens), where Labelformer's encoder skips the padding (`TokenPacking`)
    train_ratios, padded_ratios, padding_free_gains = [], [], []
    for (batch_size, src, tgt), padded in [(shape, padded) for padded in (False, True) for shape in size["shapes"]]:
        ids = torch.randint(4, size["vocab"], (batch_size, src), device=device)
        labels = torch.randint(4, size["vocab"], (batch_size, tgt), device=device)
        mask = torch.ones_like(ids)
        if padded:
            lengths = torch.linspace(src // 2, src, batch_size, device=device).long()
            mask = (torch.arange(src, device=device) < lengths[:, None]).long()
            ids = ids.masked_fill(mask == 0, 0)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        steps = {name: train_step_fn(models[name], batch, dtype) for name in ("labelformer", "bart")}
        if padded:  # the same shape without padding: the encoder works on every position, as without packing
            full = {**batch, "attention_mask": torch.ones_like(mask)}
            steps["dense encoder"] = train_step_fn(models["labelformer"], full, dtype, steps["labelformer"].optimizer)
        times = timed_side_by_side(steps, device, args.repeats)
        memory = {name: peak_memory(device, step) for name, step in steps.items()}
        tokens = int(mask.sum()) + batch_size * tgt
        padding = f", {1 - mask.float().mean().item():.0%} padding" if padded else ""
        add(f"train step{padding}", f"b{batch_size} s{src} t{tgt}", times["labelformer"], times["bart"], {
            "labelformer_tokens_per_s": tokens / times["labelformer"], "bart_tokens_per_s": tokens / times["bart"],
            "labelformer_peak_mib": memory["labelformer"], "bart_peak_mib": memory["bart"]})  # fmt: skip
        if padded:
            add("  same shape without padding (dense encoder)", f"b{batch_size} s{src} t{tgt}",
                times["dense encoder"], times["bart"])  # fmt: skip
            padding_free_gains.append(times["dense encoder"] / times["labelformer"])
        (padded_ratios if padded else train_ratios).append(times["bart"] / times["labelformer"])

    # ---- generation
    src = size["shapes"][0][1]
    generate_ratio, label_ratio, static_ratio = {}, {}, {}
    for batch_size in (1, size["gen_batch"]):
        ids = torch.randint(4, size["vocab"], (batch_size, src), device=device)
        for beams in (1, 4):
            kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, num_beams=beams, do_sample=False)  # fmt: skip
            times = {}
            for name in ("labelformer", "bart"):
                model = models[name].eval()
                with torch.inference_mode():
                    times[name] = timed(lambda m=model, kw=kwargs: m.generate(**kw), device, args.repeats)
            add(
                f"generate {NEW_TOKENS} tokens, beam {beams}",
                f"b{batch_size} s{src}",
                times["labelformer"],
                times["bart"],
            )
            if beams == 1:
                generate_ratio[batch_size] = times["bart"] / times["labelformer"]
        # the multi-label path: constrained label generation until EOS, next to BART's 16 tokens
        multilabel = models["labelformer-multilabel"].eval()
        with torch.inference_mode():
            mask = torch.ones_like(ids)
            label_time = timed(lambda m=multilabel, i=ids, a=mask: m.predict_batch(i, a, 1), device, args.repeats)
        bart_time = next(r["bart_s"] for r in rows if r["shape"] == f"b{batch_size} s{src}" and "beam 1" in r["kind"])
        add(f"label generation, greedy ({NUM_LABELS} labels) vs BART", f"b{batch_size} s{src}", label_time, bart_time)
        label_ratio[batch_size] = bart_time / label_time
        if device.type == "cuda" and args.bart_static:
            # BART's fastest stock path: a static cache, which generate() compiles automatically
            bart = models["bart"].eval()
            kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, cache_implementation="static")  # fmt: skip
            with torch.inference_mode():
                static_time = timed(lambda m=bart, kw=kwargs: m.generate(**kw), device, args.repeats, warmup=3)
            add("label generation vs BART static cache (compiled)", f"b{batch_size} s{src}", label_time, static_time)
            static_ratio[batch_size] = static_time / label_time
        parallel = models["parallel"].eval()
        with torch.inference_mode():
            parallel_time = timed(lambda m=parallel, i=ids, a=mask: m.predict_batch(i, a), device, args.repeats)
        add("parallel label decoder (1 pass) vs BART generate", f"b{batch_size} s{src}", parallel_time, bart_time)

    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "size": args.size,
        "dtype": str(dtype),
        "attn_implementation": args.attn,
        "threads": torch.get_num_threads(),
        "train_ratio": statistics.mean(train_ratios),
        "train_ratio_padded": statistics.mean(padded_ratios),
        "padding_free_encoder_speedup": statistics.mean(padding_free_gains),
        "generate_ratio_b1": generate_ratio[1],
        f"generate_ratio_b{size['gen_batch']}": generate_ratio[size["gen_batch"]],
        "label_generation_ratio_b1": label_ratio[1],
        f"label_generation_ratio_b{size['gen_batch']}": label_ratio[size["gen_batch"]],
        **{f"label_generation_vs_bart_static_b{b}": r for b, r in static_ratio.items()},
        "rows": rows,
    }
    if size["gen_batch"] != 64:
        result["generate_ratio_b64"] = None  # the base size measures batch 64
    print(f"train ratio {result['train_ratio']:.2f}x ({result['train_ratio_padded']:.2f}x with padding, where "
          f"skipping it makes Labelformer {result['padding_free_encoder_speedup']:.2f}x faster), "
          f"greedy generate ratio b1 {result['generate_ratio_b1']:.2f}x, "
          f"label generation ratio b1 {label_ratio[1]:.2f}x / b{size['gen_batch']} "
          f"{label_ratio[size['gen_batch']]:.2f}x")  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--attn", default="sdpa", help="attention implementation for both models")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--threads", type=int, help="torch CPU threads (and CTranslate2's intra_threads)")
    p.add_argument("--no_bart_static", dest="bart_static", action="store_false",
                   help="Skip BART's compiled static-cache generate (CUDA only; compiling is slow).")  # fmt: skip
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="side_by_side: Labelformer and BART in this process (training, generation); targets: "
                        "the speed issue's table, each runtime (ours, BART, CTranslate2) in its own processes; "
                        "scaling: label decoding at several label counts and source lengths, a process per "
                        "cell. targets and scaling run on the CPU.")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="targets: rounds of the processes in turn (median)")
    p.add_argument(
        "--no_ctranslate2",
        dest="ctranslate2",
        action="store_false",
        help="targets without CTranslate2 (skipped anyway when it is not installed)",
    )
    p.add_argument("--scaling_labels", type=int, nargs="+", default=None, help="default: 90 1000 10000")
    p.add_argument("--scaling_sources", type=int, nargs="+", default=None, help="default: 128 512 1024")
    p.add_argument("--plot", help="scaling: write the plot (PNG) here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    result = {"size": args.size, "threads": threads, "torch": torch.__version__,
              "transformers": transformers.__version__, "cpu": cpu_name(),
              "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    if "side_by_side" in args.parts:
        result.update(side_by_side(args))
    if "targets" in args.parts:
        import speed_targets

        print(f"\ntargets: each system in its own process, {args.rounds} rounds, median of rounds", flush=True)
        result["targets"] = speed_targets.run_targets(args.size, threads, args.rounds, args.repeats, args.ctranslate2)
        if result["targets"]["ctranslate2_version"] is None:
            print('(CTranslate2 not measured: pip install -e ".[benchmark]")')
        print(speed_targets.format_targets(result["targets"]), flush=True)
    if "scaling" in args.parts:
        import speed_scaling

        print("\nscaling: the label head's generate(), a fresh process per cell", flush=True)
        options = {k: v for k, v in (("labels", args.scaling_labels), ("sources", args.scaling_sources)) if v}
        result["scaling"] = speed_scaling.run_scaling(args.size, threads, args.repeats, **options)
        print(speed_scaling.format_scaling(result["scaling"]))
        growth = next(v for k, v in result["scaling"].items() if k.startswith("time_ratio_"))
        ratios = ", ".join(f"source {s}: {r:.2f}x" for s, r in growth.items())
        print(f"time with the most labels / the fewest, b{result['scaling']['batch']}: {ratios}")
        if args.plot:
            title = f"--size {args.size}, {threads} threads, {result['date']}, torch {torch.__version__}"
            speed_scaling.plot_scaling(result["scaling"], args.plot, title)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
