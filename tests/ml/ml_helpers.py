"""Helpers shared by the ml tests (importable as a plain module; conftest.py is not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_SIZE = (32, 32)
REAL_DATA = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ham10000-200x150"
)  # ../shared beside the repo


def run_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `python -m module args` from the repo root; fails the test with its output on error."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(
            f"python -m {module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc
