#!/usr/bin/env python
"""CTranslate2, the reference runtime of `speed.py`: convert a Hugging Face BART, then time it alone.

`convert_bart` (torch and transformers) writes a random-weight `BartForConditionalGeneration` in the
CTranslate2 format. Run as a script, this file times that model's greedy decoding and imports
nothing but CTranslate2, so no other thread pool shares the process with CTranslate2's
(mixing runtimes in one process distorts both, by up to 2x on 2 cores):

    python benchmarks/speed_ctranslate2.py MODEL_DIR --vocab 8000 --source 128 --batches 1 16 --threads 2

prints one JSON line, ``{"b1": seconds, "b16": seconds, "tokens": {...}}``: the median of ``--repeats``
calls of ``translate_batch`` after two warm-up calls. Needs ``pip install -e ".[benchmark]"``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

#: `BartConfig` fields that transformers 5 dropped and CTranslate2 4.8's BART converter still reads,
#: with the values the old `BartConfig` gave them (post-norm layers, an embedding layer norm, learned
#: positions offset by 2): the architecture transformers 5 builds.
LEGACY_BART_FIELDS = {
    "normalize_before": False,
    "add_final_layer_norm": False,
    "static_position_embeddings": False,
    "normalize_embedding": True,
    "extra_pos_embeddings": 2,
}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0-3, as `speed.build_model` configures BART


def token(i: int) -> str:
    """The vocabulary entry of id ``i``: the converted model reads tokens, not ids."""
    return SPECIAL_TOKENS[i] if i < len(SPECIAL_TOKENS) else f"w{i}"


class _Vocabulary:
    """The tokenizer surface CTranslate2's BART converter reads, for a model trained on no text."""

    bos_token, eos_token, unk_token = SPECIAL_TOKENS[1], SPECIAL_TOKENS[2], SPECIAL_TOKENS[3]

    def __init__(self, size: int) -> None:
        self.size = size

    def get_vocab(self) -> dict[str, int]:
        return {token(i): i for i in range(self.size)}

    def convert_ids_to_tokens(self, i: int) -> str:
        return token(i)


def convert_bart(model, output_dir: str | Path, quantization: str = "float32") -> Path:
    """Write ``model`` (a `BartForConditionalGeneration`, special ids as in `speed.build_model`) to
    ``output_dir`` in the CTranslate2 format, weights in ``quantization`` (``float32``, ``int8``, ...)."""
    from ctranslate2.converters.converter import Converter
    from ctranslate2.converters.transformers import BartLoader

    model = copy.deepcopy(model)  # the converter's quantization rewrites the weights it reads in place
    config = model.config
    for field, value in LEGACY_BART_FIELDS.items():
        if not hasattr(config, field):
            setattr(config, field, value)

    class _InMemory(Converter):
        def _load(self):
            return BartLoader()(model, _Vocabulary(config.vocab_size))

    return Path(_InMemory().convert(str(output_dir), quantization=quantization, force=True))


def source_batch(batch: int, source_len: int, vocab: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[token(rng.randrange(len(SPECIAL_TOKENS), vocab)) for _ in range(source_len)] for _ in range(batch)]


def main(argv: list[str] | None = None) -> int:
    import ctranslate2

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="a directory written by `convert_bart`")
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--source", type=int, default=128, help="source tokens per row")
    p.add_argument("--steps", type=int, default=16, help="decoding steps (min and max decoding length)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="intra_threads (inter_threads is 1)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    translator = ctranslate2.Translator(args.model, device="cpu", inter_threads=1, intra_threads=args.threads)
    options = dict(beam_size=args.beam, max_decoding_length=args.steps, min_decoding_length=args.steps)
    sources = {f"b{batch}": source_batch(batch, args.source, args.vocab) for batch in args.batches}
    calls = {name: lambda src=src: translator.translate_batch(src, **options) for name, src in sources.items()}
    tokens = {name: len(call()[0].hypotheses[0]) for name, call in calls.items()}  # and a warm-up call
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():  # in turn, as `speed.timed_side_by_side`
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    result = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({**result, "tokens": tokens, "version": ctranslate2.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
