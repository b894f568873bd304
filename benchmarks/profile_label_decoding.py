#!/usr/bin/env python
"""Where label decoding's time goes at batch 1 on the CPU (the `speed.py` label head, 16 steps).

Prints the split of one ``greedy_labels`` call into the encoder pass, setting up the decoding cache
(cross-attention keys/values) and the 16 decoder steps, then the torch operators of the whole call
by self CPU time (``torch.profiler``), and the per-call cost of the step's parts measured alone.

    python benchmarks/profile_label_decoding.py --size small --threads 2
    py-spy record -f raw -o stacks.txt -- python benchmarks/profile_label_decoding.py --loop 30

``--loop SECONDS`` only calls ``greedy_labels`` in a loop (a target for a sampling profiler).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed  # noqa: E402

from modeling.decoding_labelformer import GreedyLabelDecoder, label_rules  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(speed.SIZES), default="small")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--labels", type=int, default=speed.NUM_LABELS)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--loop", type=float, help="only run greedy_labels for this many seconds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = speed.SIZES[args.size]
    model = speed.build_model("labelformer-multilabel", size, num_labels=args.labels).eval()
    ids = torch.randint(4, size["vocab"], (args.batch, size["shapes"][0][1]))
    mask = torch.ones_like(ids)
    torch.inference_mode().__enter__()
    if args.loop:
        end = time.perf_counter() + args.loop
        while time.perf_counter() < end:
            model.greedy_labels(ids, mask)
        return 0

    config = model.config
    steps = config.effective_max_labels + 1
    states = model.encode(ids, mask).last_hidden_state
    decoder = GreedyLabelDecoder(model, args.batch, ids.shape[1], steps, states.device, states.dtype, False)
    cache = decoder.members[0][2]
    cache.set_encoder_states(states, mask)
    layers = model.model.decoder
    current = torch.full((args.batch, 1), 5, dtype=torch.long)
    hidden = layers.decode_step(current, cache, 3)
    used = torch.zeros(args.batch, config.decoder_vocab_size, dtype=torch.bool)
    count = torch.zeros(args.batch, dtype=torch.long)
    logits = model.lm_head(hidden).float()

    def rules_and_choice():
        allowed = label_rules(used, count, config.min_labels, config.effective_max_labels)
        probs = (logits + decoder.member_bias[0]).masked_fill(~allowed, float("-inf")).softmax(-1)
        best = probs.argmax(-1)
        probs.gather(-1, best[:, None])
        used.clone().scatter_(1, best[:, None], True)

    parts = {
        "greedy_labels (whole call)": lambda: model.greedy_labels(ids, mask),
        "  encode (encoder + label logits)": lambda: model.encode(ids, mask),
        "  cache set-up (cross keys/values)": lambda: cache.set_encoder_states(states, mask),
        f"  decoder loop, {steps} steps (eager)": lambda: decoder._decode(early_exit=True),
        "    one step: decode_step (all layers)": lambda: layers.decode_step(current, cache, 3),
        "      of which one decoder layer": lambda: layers.layers[0](
            layers.embeddings(current, offset=3), cache.encoder_states, None, cache.cross_mask,
            cache,
        ),
        "    one step: lm_head": lambda: model.lm_head(hidden),
        "    one step: label rules, softmax, choice": rules_and_choice,
    }  # fmt: skip
    print(f"size {args.size}, batch {args.batch}, {args.labels} labels, {args.threads} threads, "
          f"source {ids.shape[1]}, torch {torch.__version__}")  # fmt: skip
    for name, fn in parts.items():
        print(f"{name:45s} {median_ms(fn, args.repeats):8.3f} ms")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            model.greedy_labels(ids, mask)
    print("\ntorch operators over 10 greedy_labels calls, by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
