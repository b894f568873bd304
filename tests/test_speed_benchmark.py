"""benchmarks/speed.py runs end to end (tiny sizes) and reports every ratio and table it promises."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_speed_benchmark_reports_side_by_side_ratios(tmp_path):
    out = tmp_path / "speed.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--size", "tiny",
               "--repeats", "1", "--threads", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("train_ratio", "train_ratio_padded", "padding_free_encoder_speedup", "generate_ratio_b1",
                "label_generation_ratio_b1", "label_generation_ratio_b4"):  # fmt: skip
        assert result[key] > 0, key
    kinds = [row["kind"] for row in result["rows"]]
    assert "train step" in kinds and any(kind.startswith("train step, ") for kind in kinds)
    assert "  same shape without padding (dense encoder)" in kinds
    assert sum(kind.startswith("parallel label decoder") for kind in kinds) == 2  # batch 1 and batch 4
    assert not any("unpad_encoder" in kind for kind in kinds)
    padded = next(r for r in result["rows"] if r["kind"].startswith("train step, "))
    full = next(r for r in result["rows"] if r["kind"] == "train step")
    tokens = {
        name: row["labelformer_tokens_per_s"] * row["labelformer_s"]
        for name, row in (("padded", padded), ("full", full))
    }
    assert tokens["padded"] < tokens["full"]  # the padded row counts only its real tokens


def test_speed_benchmark_targets_and_scaling_tables(tmp_path):
    """The targets table (each runtime in its own process; CTranslate2 when installed) and the scaling table."""
    out, plot = tmp_path / "speed.json", tmp_path / "scaling.png"
    command = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--size", "tiny",
               "--repeats", "1", "--threads", "1", "--parts", "targets", "scaling", "--rounds", "1",
               "--scaling_labels", "90", "300", "--scaling_sources", "32", "--plot", str(plot),
               "--json", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    targets = result["targets"]
    ctranslate2 = importlib.util.find_spec("ctranslate2") is not None
    assert (targets["ctranslate2_version"] is not None) == ctranslate2
    times = targets["times_s"]
    for measurement in (
        "label generate()",
        "label generate() int8",
        "greedy_labels",
        "generate greedy",
        "generate beam 4",
    ):
        assert times["labelformer"][f"{measurement} b1"] > 0 and times["labelformer"][f"{measurement} b4"] > 0
    assert times["bart"]["generate beam 4 b4"] > 0
    assert [row["measurement"].split(",")[0] for row in targets["targets"]] == [
        "label decoding", "label decoding", "label decoding", "greedy generate() vs BART",
        "beam 4 generate() vs BART"]  # fmt: skip
    for row in targets["targets"]:
        if "CTranslate2" in row["measurement"] and not ctranslate2:
            assert row["b1"] is None and row["b4"] is None
        else:
            assert row["b1"] > 0 and row["b4"] > 0
    if ctranslate2:
        assert times["ctranslate2-float32"]["translate b4"] > 0 and times["ctranslate2-int8"]["translate b1"] > 0
    assert "| target (ratio = reference time / ours) |" in proc.stdout

    scaling = result["scaling"]
    assert [(c["labels"], c["source_len"]) for c in scaling["cells"]] == [(90, 32), (300, 32)]
    for c in scaling["cells"]:
        assert c["b1_s"] > 0 and c["b4_s"] > 0 and c["b1_steps"] == c["b4_steps"] == 16  # 15 labels + EOS
        assert c["b4_decode_peak_mib"] >= 0 and c["b4_process_peak_mib"] > c["parameters_mib"] > 0
    assert scaling["time_ratio_300_vs_90_labels_b4"]["32"] > 0
    assert plot.stat().st_size > 0


def test_ctranslate2_conversion_keeps_the_model(tmp_path):
    """The converted BART scores tokens as the Hugging Face model does, and converting leaves it untouched."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed
    from speed_ctranslate2 import convert_bart, source_batch, token

    torch.manual_seed(0)
    bart = speed.build_model("bart", speed.SIZES["tiny"]).eval()
    before = {name: tensor.clone() for name, tensor in bart.state_dict().items()}
    convert_bart(bart, tmp_path / "int8", "int8")  # quantizing in place would rewrite these weights
    assert all(torch.equal(before[name], tensor) for name, tensor in bart.state_dict().items())

    translator = ctranslate2.Translator(str(convert_bart(bart, tmp_path / "float32")), device="cpu", intra_threads=1)
    source = source_batch(2, 12, bart.config.vocab_size)
    target = source_batch(2, 5, bart.config.vocab_size, seed=1)
    scored = translator.score_batch(source, target)
    ids = {token(i): i for i in range(bart.config.vocab_size)}
    source_ids = torch.tensor([[ids[t] for t in row] for row in source])
    decoder_ids = torch.tensor([[bart.config.decoder_start_token_id] + [ids[t] for t in row] for row in target])
    with torch.no_grad():
        logits = bart(input_ids=source_ids, decoder_input_ids=decoder_ids[:, :-1]).logits
    expected = logits.log_softmax(-1).gather(-1, decoder_ids[:, 1:, None]).squeeze(-1)
    for row, result in zip(expected, scored):
        assert torch.allclose(torch.tensor(result.log_probs[: len(row)]), row, atol=1e-3)


def test_cpu_inference_benchmark_times_every_precision(tmp_path):
    out = tmp_path / "cpu_inference.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "cpu_inference.py"), "--size", "tiny", "--repeats", "1",
               "--threads", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["speed"]
    assert [(row["labels"], row["batch"]) for row in rows] == [(90, 1), (90, 4), (10_000, 1), (10_000, 4)]
    assert all(row[f"{name}_ms"] > 0 for row in rows for name in ("fp32", "bf16", "int8"))
    assert "| 10,000 | 4 |" in proc.stdout
