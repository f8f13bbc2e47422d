"""ml/ stays pure: importing all of it pulls in neither Flask, SQLAlchemy nor Celery."""

from __future__ import annotations

import json
import subprocess
import sys

from ml_helpers import REPO

MODULES = (
    "ml",
    "ml.model",
    "ml.data",
    "ml.metrics",
    "ml.calibration",
    "ml.artifact",
    "ml.predictor",
    "ml.train",
    "ml.evaluate",
    "ml.export",
    "ml.report",
    "ml.synthetic",
)
FORBIDDEN = ("flask", "sqlalchemy", "celery", "flask_sqlalchemy", "webapp", "worker")


def test_ml_imports_no_web_or_queue_framework():
    code = (
        "import importlib, json, sys\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "from ml import Predictor\n"
        f"print(json.dumps(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_import_ml_alone_does_not_load_tensorflow():
    code = "import sys, ml; print('tensorflow' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]
