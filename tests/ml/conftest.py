"""Fixtures of the ml tests: a tiny synthetic HAM10000-layout dataset, a tiny predictor, and one
short training run (CLI, subprocess) that the train/evaluate/export/resume tests share.

Sizes are the smallest the model takes (32x32) so that the whole ml suite runs in minutes on two
CPU cores; what is tested is the plumbing, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ml_helpers import TINY_SIZE, run_module


@pytest.fixture(scope="session")
def synthetic_ham(tmp_path_factory) -> Path:
    """A HAM10000-layout folder: 4 lesions per class, 1-2 images each, 60x80 JPEGs."""
    from ml.synthetic import make_ham10000_like

    return make_ham10000_like(
        tmp_path_factory.mktemp("ham") / "data", lesions_per_class=4, size=(60, 80), max_images_per_lesion=2
    )


@pytest.fixture(scope="session")
def tiny_predictor():
    """An untrained Predictor at 32x32 (shared: building EfficientNetB3 takes seconds)."""
    from ml.predictor import Predictor

    return Predictor.untrained(input_size=TINY_SIZE)


@pytest.fixture(scope="session")
def trained_run(synthetic_ham, tmp_path_factory) -> Path:
    """A finished one-epoch run folder made by the training CLI (also a model artifact)."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run_module(
        "ml.train",
        "--data",
        str(synthetic_ham),
        "--out",
        str(run),
        "--epochs",
        "1",
        "--img-size",
        *map(str, TINY_SIZE),
        "--batch-size",
        "16",
        "--bootstrap",
        "20",
        "--verbose",
        "2",
        "--run-eagerly",
    )
    return run
