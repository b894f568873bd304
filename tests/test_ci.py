"""CI prints the versions it tests, and the README names the ones CI ran."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import accelerate
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent


def test_ci_prints_the_versions_it_tests():
    script = (ROOT / ".ci" / "run").read_text()
    [line] = [line for line in script.splitlines() if line.startswith("python -c") and "versions" in line]
    code = line.split("'")[1]
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name, module in (("torch", torch), ("transformers", transformers), ("accelerate", accelerate)):
        assert f"{name} {module.__version__}" in printed


def test_readme_names_the_transformers_version_this_environment_runs():
    """When pip resolves a new transformers, CI runs on it: say so in the README (and rerun the suite)."""
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"the suite ran on transformers (\d+\.\d+\.\d+)", readme)
    assert stated, "the README does not say which transformers version the suite ran on"
    assert stated.group(1) == transformers.__version__
