#!/usr/bin/env python
"""Reproduce the Reuters-21578 ApteMod comparison: label generation vs threshold head vs tf-idf + SVM.

########################################################################
# One command trains and evaluates, on the same split of the embedded data set:
#   - seq2seq:    the label-sequence generation head, trained with --seq2seq_seeds seeds (default 3)
#                 that decode together as a LabelformerEnsemble (test with greedy and beam search);
#   - threshold:  the sigmoid threshold head on the same backbone and recipe (one seed; with
#                 --threshold_seeds N, N seeds voting together: the fair match for the ensemble,
#                 and seq2seq member k starts from threshold member k);
#   - svm:        tf-idf + LinearSVC, one-vs-rest (needs scikit-learn: pip install ".[svm]");
#   - parallel:   the parallel (one-pass) label decoder, with --systems ... parallel.
# The validation split is carved from the 7,770 training documents with a fixed seed; every
# choice (epochs, SVM C, the threshold) is made on it, and the test set is read once per system.
#
#     python examples/reproduce_reuters.py --output_dir runs/reuters
#
# Writes DIR/results.json ({"seq2seq_greedy": {...}, "seq2seq_beam": {...}, "threshold": {...},
# "svm": {...}}, each with micro_f1, macro_f1, example_f1, subset_accuracy, hamming_loss),
# DIR/run_info.json (times, machine, settings, each seq2seq member's own test scores) and the
# models in DIR/seq2seq (seed 42; more members in DIR/seq2seq_seed43, ...) and DIR/threshold.
# Variants: --set seq2seq.decoder_layers=2 (one head) or --set learning_rate=5e-4 (every head)
# changes the recipe; --threshold_from OLD_DIR reuses an earlier run's threshold head and
# tokenizer, so a generator variant costs only the generator's training.
# On 2 CPU cores it finishes within an hour; on one GPU in a few minutes.
########################################################################
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from transformers import AutoTokenizer  # noqa: E402

from modeling import (  # noqa: E402
    LabelformerEnsemble,
    build_label_vocabulary,
    load_multilabel_dataset,
    train_tokenizer,
)
from modeling.evaluation_labelformer import (  # noqa: E402
    METRIC_KEYS,
    evaluate_predictions,
    predict_texts,
    threshold_validation_inputs,
    tune_decoding_bias,
    write_json,
)
from modeling.tokenization_labelformer import save_tokenizer  # noqa: E402

logger = logging.getLogger("reproduce_reuters")
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train_multilabel.py"
SYSTEMS = ("seq2seq", "threshold", "svm", "parallel")
HEAD_OF = {"seq2seq": "generation", "threshold": "threshold", "parallel": "parallel"}

# The recipe, chosen on the validation split (benchmarks/reuters_ablations.py; README "Results").
# Both neural heads share the backbone, tokenizer, data and optimisation; dropout is set per head
# to what its validation score preferred.
RECIPE: dict[str, Any] = dict(
    vocab_size=16000, max_length=128, d_model=256, encoder_layers=2, decoder_layers=1, attention_heads=4,
    ffn_dim=1024, dropout=0.1, norm_position="pre", batch_size=32, learning_rate=1e-3, warmup_ratio=0.05,
    epochs=10, early_stopping_patience=4, ema_decay=0.999, label_order="frequency", num_beams=3,
    group_by_length=False, lexical_scorer=True,
)  # fmt: skip
PER_SYSTEM: dict[str, dict[str, Any]] = {
    "seq2seq": {"dropout": 0.0},
    "parallel": {"dropout": 0.0, "lexical_scorer": False},  # the parallel head has no lexical scorer
}
# Two-stage: the seq2seq head starts from the threshold head's encoder and needs fewer epochs.
FROM_THRESHOLD: dict[str, Any] = {"epochs": 4, "early_stopping_patience": 3}
SEED = 42
# The seq2seq head is trained with this many seeds (SEED, SEED + 1, ...) on one split and decodes as
# an ensemble; each member's own scores are reported too.
SEQ2SEQ_SEEDS = 3
# Members of an ensemble skip their own decoding-bias fit and beam test (the ensemble does both).
ENSEMBLE_MEMBER: dict[str, Any] = {"tune_decoding_bias": False, "num_beams": 1}
VALIDATION_FRACTION = 0.1


def svm_baseline(data, labels: list[str], seed: int) -> tuple[dict[str, float], dict[str, Any]]:
    """tf-idf (unigrams, sublinear tf) + one-vs-rest LinearSVC; C picked on validation micro-F1.

    The data set's reference (0.869 micro-F1) is this setup with C=16, fit on all 7,770 documents;
    here it is fit on the training split without the validation documents, like the neural heads.
    """
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.preprocessing import MultiLabelBinarizer
        from sklearn.svm import LinearSVC
    except ImportError as error:
        raise SystemExit(
            "The SVM baseline needs scikit-learn: pip install -e '.[svm]' (or leave 'svm' out of --systems)."
        ) from error
    binarizer = MultiLabelBinarizer(classes=labels)
    known = set(labels)
    y_train = binarizer.fit_transform([[x for x in row if x in known] for row in data["train"]["labels"]])
    vectorizer = TfidfVectorizer(sublinear_tf=True)
    x_train = vectorizer.fit_transform(list(data["train"]["text"]))
    x_val = vectorizer.transform(list(data["validation"]["text"]))
    x_test = vectorizer.transform(list(data["test"]["text"]))

    def fit_predict(c: float, x) -> list[list[str]]:
        model = OneVsRestClassifier(LinearSVC(C=c, max_iter=20_000, random_state=seed), n_jobs=1)
        model.fit(x_train, y_train)
        return [list(row) for row in binarizer.inverse_transform(model.predict(x))]

    scores = {}
    for c in (1.0, 4.0, 16.0, 64.0):
        scores[c] = evaluate_predictions(fit_predict(c, x_val), data["validation"]["labels"], labels)["micro_f1"]
    best_c = max(scores, key=scores.get)
    metrics = evaluate_predictions(fit_predict(best_c, x_test), data["test"]["labels"], labels)
    return metrics, {"C": best_c, "validation_micro_f1_by_C": scores}


def train_arguments(head: str, out: Path, tokenizer_dir: Path, settings: dict[str, Any], seed: int = SEED) -> list[str]:
    """train_multilabel.py flags for one run on the shared split and tokenizer.

    ``settings`` become ``--key=value``; booleans become ``--key`` / ``--no-key``.
    """
    return [
        str(TRAIN_SCRIPT), "--head", head, "--output_dir", str(out), "--overwrite_output_dir",
        "--tokenizer_name_or_path", str(tokenizer_dir), "--seed", str(seed), "--split_seed", str(SEED),
        "--validation_fraction", str(VALIDATION_FRACTION), "--show_examples", "0", "--report_to", "none",
        *[(f"--{key}" if value else f"--no-{key}") if isinstance(value, bool) else f"--{key}={value}"
          for key, value in settings.items()],
    ]  # fmt: skip


def system_settings(system: str, encoder_from: Path | None = None) -> dict[str, Any]:
    """The recipe for one system; with ``encoder_from`` (a threshold-head folder), its two-stage form."""
    settings = {**RECIPE, **PER_SYSTEM.get(system, {})}
    if encoder_from is not None:
        settings.update(FROM_THRESHOLD, init_encoder_from=encoder_from)
    return settings


def train_head(system: str, args: argparse.Namespace, tokenizer_dir: Path, seed: int = SEED,
               out: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Run examples/train_multilabel.py for one head and seed (in its own process) and read its test metrics."""
    two_stage = system == "seq2seq" and args.seq2seq_init == "threshold"
    member = system == "seq2seq" and args.seq2seq_seeds > 1
    # with several threshold seeds, generator member k starts from threshold member k (mod their count)
    encoder_from = threshold_dir(args, (seed - SEED) % args.threshold_seeds) if two_stage else None
    settings = {**system_settings(system, encoder_from),
                **(ENSEMBLE_MEMBER if member else {}), **({"epochs": args.epochs} if args.epochs else {}),
                **args.overrides.get(system, {})}  # fmt: skip
    out = out or Path(args.output_dir) / system
    command = [
        *shlex.split(args.launcher), *train_arguments(HEAD_OF[system], out, tokenizer_dir, settings, seed),
        *(["--cpu"] if args.cpu else []), *(["--no_progress"] if args.no_progress else []),
        *shlex.split(args.train_args),
    ]  # fmt: skip
    logger.info("training %s (seed %d): %s", system, seed, shlex.join(command))
    subprocess.run(command, check=True)
    return json.loads((out / "test_metrics.json").read_text())


def threshold_dir(args: argparse.Namespace, member: int = 0) -> Path:
    """A threshold head the seq2seq head starts from: this run's (``member`` k > 0: DIR/threshold_seed<42+k>),
    or a reused one (``--threshold_from``)."""
    name = "threshold" if member == 0 else f"threshold_seed{SEED + member}"
    return Path(args.threshold_from or args.output_dir) / name


# train_multilabel.py flags this script sets itself; --set may not change them.
FIXED_FLAGS = {"head", "output_dir", "overwrite_output_dir", "tokenizer_name_or_path", "seed", "split_seed",
               "validation_fraction", "show_examples", "report_to", "init_encoder_from", "preset", "train_file",
               "validation_file", "test_file", "dataset_name", "skip_test"}  # fmt: skip


def settable_flags() -> set[str]:
    """The settings of train_multilabel.py's command line (``--key``), less those this script fixes."""
    spec = importlib.util.spec_from_file_location("train_multilabel", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    actions = module.build_parser()._actions
    return {a.dest for a in actions if a.option_strings and a.dest != "help"} - FIXED_FLAGS


def parse_overrides(items: list[str], systems: tuple[str, ...] = SYSTEMS) -> dict[str, dict[str, Any]]:
    """``--set`` items (``key=value`` for every neural head, ``system.key=value`` for one) by system.

    A key is any train_multilabel.py setting (the recipe's and others, e.g. ``encoder_lr_scale``) but
    the ones this script fixes. Values are read as JSON where they parse (``2``, ``0.5``, ``true``),
    else kept as strings. Raises ``ValueError`` naming the item when it has no ``=``, an unknown
    system, or an unknown or fixed key.
    """
    overrides: dict[str, dict[str, Any]] = {s: {} for s in systems if s in HEAD_OF}
    known = settable_flags()
    for item in items:
        target, sep, raw = item.partition("=")
        if not sep or not target:
            raise ValueError(f"--set {item!r}: expected key=value or system.key=value, e.g. seq2seq.decoder_layers=2.")
        system, dot, key = target.rpartition(".")
        if dot and system not in overrides:
            raise ValueError(f"--set {item!r}: unknown system {system!r}; choose from {sorted(overrides)}.")
        if key in FIXED_FLAGS:
            raise ValueError(f"--set {item!r}: this script sets --{key} itself (split, seeds, folders, tokenizer).")
        if key not in known:
            close = get_close_matches(key, known, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else "see examples/train_multilabel.py --help."
            raise ValueError(f"--set {item!r}: {key!r} is not a train_multilabel.py setting; {hint}")
        if dot and key == "vocab_size":
            raise ValueError(f"--set {item!r}: the heads share one tokenizer; set vocab_size=N for all of them.")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        for name in [system] if dot else overrides:
            overrides[name][key] = value
    return overrides


def evaluate_ensemble(folders: list[Path], data, labels: list[str], num_beams: int, cpu: bool) -> dict[str, Any]:
    """Test (and validation) metrics of the seq2seq members decoding together (`LabelformerEnsemble`).

    The ensemble's decoding bias (EOS bias, rare-label logit adjustment, label-name bias, lexical weight and
    set search) is fit on validation first, as each member's was on its own.
    """
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    ensemble = LabelformerEnsemble.from_pretrained(folders).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    max_length = trained_max_length(folders[0])

    def predict(split: str, beams: int = 1) -> list[list[str]]:
        return predict_texts(ensemble, tokenizer, list(data[split]["text"]), num_beams=beams, max_length=max_length)

    def scores(split: str, beams: int) -> dict[str, float]:
        return evaluate_predictions(predict(split, beams), data[split]["labels"], labels)

    counts = Counter(label for row in data["train"]["labels"] for label in row)
    tuned = tune_decoding_bias(ensemble, lambda _: predict("validation"), data["validation"]["labels"], counts)
    return {
        "decoding_bias": {k: v for k, v in tuned.items() if k != "grid"},
        "validation": scores("validation", 1),
        "greedy": scores("test", 1),
        "beam": {"num_beams": num_beams, **scores("test", num_beams)},
    }


def trained_max_length(folder: Path) -> int | None:
    """The ``--max_length`` a train_multilabel.py run truncated its documents to (None if not recorded)."""
    path = Path(folder) / "training_args.json"
    return json.loads(path.read_text()).get("max_length") if path.is_file() else None


@torch.no_grad()
def evaluate_threshold_ensemble(folders: list[Path], data, labels: list[str], cpu: bool,
                                batch_size: int = 64) -> dict[str, Any]:  # fmt: skip
    """Test (and validation) metrics of threshold heads voting together (mean probabilities).

    The ensemble's threshold is fit on the validation split (as each member's was, batches built by
    the training collator), then the test set is read once.
    """
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    ensemble = LabelformerEnsemble.from_pretrained(folders).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    max_length = trained_max_length(folders[0]) or RECIPE["max_length"]
    probs, targets, named, lexical = threshold_validation_inputs(ensemble, tokenizer, list(data["validation"]),
                                                                 max_length, batch_size)  # fmt: skip
    # With label names or a lexical scorer, their weights are fit with the threshold.
    threshold = ensemble.tune_decision_rule(probs, targets, named, lexical)["threshold"]
    probs = ensemble.decision_probabilities(probs, named, lexical)
    id2label = ensemble.config.id2label
    validation = [[id2label[j] for j in row.nonzero().flatten().tolist()] for row in ensemble.decide(probs)]
    test = predict_texts(ensemble, tokenizer, list(data["test"]["text"]), max_length=max_length)
    return {
        "threshold": threshold,
        "label_name_bias": ensemble.config.label_name_bias,
        "lexical_logit_weight": ensemble.config.lexical_logit_weight,
        "validation": evaluate_predictions(validation, data["validation"]["labels"], labels),
        "test": evaluate_predictions(test, data["test"]["labels"], labels),
    }


def train_members(system: str, args: argparse.Namespace, tokenizer_dir: Path, count: int) -> tuple[list[Path], list]:
    """Train ``count`` seeds (42, 43, ...) of one head on the same split: DIR/<system>, DIR/<system>_seed43, ...

    Returns the folders and each member's test metrics.
    """
    folders = [Path(args.output_dir) / (system if i == 0 else f"{system}_seed{SEED + i}") for i in range(count)]
    return folders, [train_head(system, args, tokenizer_dir, SEED + i, folder) for i, folder in enumerate(folders)]


def train_threshold(args: argparse.Namespace, tokenizer_dir: Path, data, labels: list[str], info: dict) -> dict:
    """Train the threshold head (DIR/threshold, seed 42; with ``--threshold_seeds N`` also DIR/threshold_seed43, ...).

    Returns the test metrics of the one model, or of the members voting together; each member's own
    test metrics go to ``info["threshold_members"]``. Seq2seq member k starts from threshold member k.
    """
    folders, members = train_members("threshold", args, tokenizer_dir, args.threshold_seeds)
    if len(members) == 1:
        return {k: members[0][k] for k in METRIC_KEYS}
    info["threshold_members"] = [{"seed": SEED + i, "folder": folder.name, **{k: m[k] for k in METRIC_KEYS}}
                                 for i, (folder, m) in enumerate(zip(folders, members))]  # fmt: skip
    ensemble = evaluate_threshold_ensemble(folders, data, labels, args.cpu)
    info["threshold_ensemble_validation"] = ensemble["validation"]
    info["threshold_ensemble_threshold"] = ensemble["threshold"]
    info["threshold_ensemble_label_name_bias"] = ensemble["label_name_bias"]
    info["threshold_ensemble_lexical_logit_weight"] = ensemble["lexical_logit_weight"]
    return ensemble["test"]


def train_seq2seq(args: argparse.Namespace, tokenizer_dir: Path, data, labels: list[str], info: dict) -> dict:
    """Train the seq2seq members (DIR/seq2seq, DIR/seq2seq_seed<N>, ...) and score them alone and together.

    Returns ``seq2seq_greedy`` / ``seq2seq_beam`` test metrics: of the ensemble when there are several
    members, else of the one model. Each member's own test metrics go to ``info["seq2seq_members"]``.
    """
    folders, members = train_members("seq2seq", args, tokenizer_dir, args.seq2seq_seeds)
    info["seq2seq_members"] = [{"seed": SEED + i, "folder": folder.name, **metrics}
                               for i, (folder, metrics) in enumerate(zip(folders, members))]  # fmt: skip
    if len(members) == 1:
        scores = {"seq2seq_greedy": {k: members[0][k] for k in METRIC_KEYS}}
        if "beam" in members[0]:
            scores["seq2seq_beam"] = members[0]["beam"]
        return scores
    num_beams = members[0].get("beam", {}).get("num_beams", RECIPE["num_beams"])
    ensemble = evaluate_ensemble(folders, data, labels, num_beams, args.cpu)
    info["seq2seq_ensemble_validation"] = ensemble["validation"]
    info["seq2seq_ensemble_decoding_bias"] = ensemble["decoding_bias"]
    return {"seq2seq_greedy": ensemble["greedy"], "seq2seq_beam": ensemble["beam"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=["seq2seq", "threshold", "svm"])
    p.add_argument("--epochs", type=int, help=f"Override the recipe's {RECIPE['epochs']} epochs (smoke tests).")
    p.add_argument("--max_train_samples", type=int, help="Train on fewer documents (smoke tests only).")
    p.add_argument(
        "--seq2seq_init", choices=["scratch", "threshold"], default="threshold",
        help="'threshold' (default): train the threshold head first and start the seq2seq head from its encoder "
        "(two-stage); 'scratch': train the seq2seq head from random weights.",
    )  # fmt: skip
    p.add_argument(
        "--seq2seq_seeds", type=int, default=SEQ2SEQ_SEEDS,
        help="Train the seq2seq head with this many seeds and report them as an ensemble (1 = a single model).",
    )  # fmt: skip
    p.add_argument(
        "--threshold_seeds", type=int, default=1,
        help="Train the threshold head with this many seeds and report them voting together (mean probabilities, "
        "threshold fit on validation): the fair match for a seq2seq ensemble. Seq2seq member k then starts from "
        "threshold member k (mod N), which makes the generator ensemble more diverse.",
    )  # fmt: skip
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="[SYSTEM.]KEY=VALUE",
        help="Change a train_multilabel.py setting of the recipe (repeatable), for every neural head or one "
        "system: --set seq2seq.decoder_layers=2 --set learning_rate=5e-4. Recorded in run_info.json.",
    )  # fmt: skip
    p.add_argument(
        "--threshold_from", metavar="DIR",
        help="Reuse the threshold head and tokenizer of an earlier run's output dir (DIR/threshold, DIR/tokenizer) "
        "instead of training them: the seq2seq head starts from it and its test scores are read from there.",
    )  # fmt: skip
    p.add_argument(
        "--train_args", default="", help="Extra flags for train_multilabel.py, quoted; they come last and win."
    )
    p.add_argument(
        "--launcher", default=shlex.join([sys.executable]),
        help="How to start train_multilabel.py, e.g. 'accelerate launch --multi_gpu --num_processes 4'.",
    )  # fmt: skip
    p.add_argument("--cpu", action="store_true", help="Train on the CPU even if a GPU is present.")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    for flag in ("seq2seq_seeds", "threshold_seeds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    set_items = args.overrides
    try:
        args.overrides = parse_overrides(set_items)
    except ValueError as error:
        p.error(str(error))
    if args.threshold_from:
        reused = Path(args.threshold_from)
        missing = [str(reused / f) for f in ("threshold/model.safetensors", "threshold/test_metrics.json", "tokenizer")]
        missing = [f for f in missing if not Path(f).exists()]
        if missing:
            p.error(f"--threshold_from {reused}: not a finished reproduce_reuters.py output dir (missing {missing}).")
        if any(item.startswith("threshold.") or item.startswith("vocab_size=") for item in set_items):
            p.error("--threshold_from reuses a finished threshold head and its tokenizer: drop threshold.* and "
                    "vocab_size --set items.")  # fmt: skip
        if args.seq2seq_init != "threshold":
            p.error("--threshold_from only makes sense with --seq2seq_init threshold (the default).")
        if args.threshold_seeds > 1:
            p.error("--threshold_from reuses a finished threshold head and its scores: drop --threshold_seeds.")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.max_train_samples:
        args.train_args += f" --max_train_samples {args.max_train_samples}"
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    info: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() and not args.cpu else ""),
        "recipe": RECIPE,
        **({"set": set_items} if set_items else {}),
        **({"threshold_from": str(args.threshold_from)} if args.threshold_from else {}),
        "seed": SEED,
        "seq2seq_seeds": args.seq2seq_seeds,
        "threshold_seeds": args.threshold_seeds,
        "seconds": {},
    }

    # The same split as train_multilabel.py (same loader, fraction and seed).
    data = load_multilabel_dataset(
        validation_fraction=VALIDATION_FRACTION, seed=SEED, max_train_samples=args.max_train_samples
    )
    labels = build_label_vocabulary(data["train"]["labels"])
    logger.info(
        "Reuters ApteMod: %d train / %d validation / %d test documents, %d labels",
        len(data["train"]), len(data["validation"]), len(data["test"]), len(labels),
    )  # fmt: skip

    if args.threshold_from and "threshold" not in args.systems:
        args.systems.append("threshold")
    if args.seq2seq_init == "threshold" and "seq2seq" in args.systems:
        if "threshold" not in args.systems:
            raise SystemExit("--seq2seq_init threshold needs 'threshold' in --systems too (or --seq2seq_init scratch).")
        args.systems.sort(key=lambda s: s != "threshold")  # the threshold head first
    results: dict[str, dict[str, float]] = {}
    neural = [s for s in args.systems if s in HEAD_OF]
    if neural:  # one tokenizer for all heads, trained on the training split only
        tick = time.time()
        if args.threshold_from:  # the reused threshold head's tokenizer
            tokenizer_dir = Path(args.threshold_from) / "tokenizer"
        else:
            tokenizer_dir = out / "tokenizer"
            vocab_size = args.overrides["seq2seq"].get("vocab_size", RECIPE["vocab_size"])  # global --set only
            tokenizer = train_tokenizer(list(data["train"]["text"]), vocab_size=vocab_size,
                                        model_max_length=RECIPE["max_length"])  # fmt: skip
            save_tokenizer(tokenizer, tokenizer_dir)
        info["seconds"]["tokenizer"] = round(time.time() - tick, 1)
    for system in args.systems:
        tick = time.time()
        if system == "svm":
            results["svm"], info["svm"] = svm_baseline(data, labels, SEED)
        else:
            if system == "seq2seq":
                results.update(train_seq2seq(args, tokenizer_dir, data, labels, info))
            elif system == "threshold" and args.threshold_from:  # measured by the earlier run
                metrics = json.loads((threshold_dir(args) / "test_metrics.json").read_text())
                results[system] = {k: metrics[k] for k in METRIC_KEYS}
            elif system == "threshold":
                results[system] = train_threshold(args, tokenizer_dir, data, labels, info)
            else:
                metrics = train_head(system, args, tokenizer_dir)
                results[system] = {k: metrics[k] for k in METRIC_KEYS}
        info["seconds"][system] = round(time.time() - tick, 1)
        write_json(results, out / "results.json")  # after each system, so a crash keeps what is done
    info["seconds"]["total"] = round(time.time() - start, 1)
    write_json(info, out / "run_info.json")

    print(f"\nReuters-21578 ApteMod test ({len(data['test'])} documents), {info['machine']}")
    print(f"{'system':18s} {'micro-F1':>9s} {'macro-F1':>9s} {'example-F1':>10s} {'subset acc':>10s} {'Hamming':>8s}")
    rows = dict(results)
    for system in ("seq2seq", "threshold"):  # an ensemble's members on their own
        if len(info.get(f"{system}_members", [])) > 1:
            rows.update({f"{system} seed {m['seed']}": m for m in info[f"{system}_members"]})
    for name, m in rows.items():
        print(f"{name:18s} {m['micro_f1']:9.4f} {m['macro_f1']:9.4f} {m['example_f1']:10.4f} "
              f"{m['subset_accuracy']:10.4f} {m['hamming_loss']:8.4f}")  # fmt: skip
    print(f"\nTimes (s): {info['seconds']}\nWrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
