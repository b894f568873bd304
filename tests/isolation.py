"""Run Python code in a fresh process in which our own packages cannot be imported.

That is what a user of a saved or pushed folder has: `transformers` and the files in the folder,
nothing else. A meta-path finder refuses `configuration` and `modeling`, and the working
directory is a temporary folder, so neither the repo nor the editable install can leak in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

PRELUDE = """
import importlib.abc, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("configuration", "modeling"):
            raise ImportError(f"{name} is not importable in this isolated process")
        return None
sys.meta_path.insert(0, _Refuse())
for _p in list(sys.path):
    if _p in ("", "."):
        sys.path.remove(_p)
try:
    import modeling  # noqa: F401
    raise SystemExit("isolation failed: our package is importable")
except ImportError:
    pass
"""


def run_isolated(code: str, cwd: Path, timeout: int = 300) -> dict:
    """Run ``code`` isolated; the last line it prints that starts with ``{`` is parsed as JSON and returned."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(cwd / "hf_modules"),
    }
    env.pop("PYTHONPATH", None)
    script = PRELUDE + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise AssertionError(f"isolated process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise AssertionError(f"isolated process printed no JSON line:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def run_in_own_session(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` with stdin closed in its own session, so a timeout kills the workers a launcher
    started too, not only the launcher; returns the completed process (stdout and stderr as text)."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          text=True, env=env, start_new_session=True) as popen:  # fmt: skip
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.communicate()
            raise
    return subprocess.CompletedProcess(command, popen.returncode, stdout, stderr)
