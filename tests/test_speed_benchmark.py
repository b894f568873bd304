"""benchmarks/speed.py runs end to end (tiny sizes) and reports every ratio it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
