"""Training also runs on Keras' JAX backend (what a GPU machine without TensorFlow has), and weights
trained there load into the TensorFlow-served artifact with the same predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from ml_helpers import TINY_SIZE

ROOT = Path(__file__).resolve().parents[2]


def test_a_run_trained_under_jax_is_served_by_tensorflow_with_the_same_predictions(synthetic_ham, tmp_path):
    run = tmp_path / "jax-run"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    train = [
        sys.executable, "-m", "ml.train", "--data", str(synthetic_ham), "--out", str(run), "--epochs", "1",
        "--img-size", *map(str, TINY_SIZE), "--batch-size", "16", "--loss", "logit_adjusted", "--balance", "none",
        "--verbose", "2",
    ]  # fmt: skip
    done = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "backend jax" in log and "finalise on a TensorFlow machine" in log
    assert not (run / "manifest.json").exists()  # finalising (calibration, test evaluation) needs TensorFlow

    # The JAX process's own predictions on fixed images, from the best weights it wrote.
    probe = (
        "import numpy as np, sys\n"
        "from ml.artifact import load_model_weights\n"
        "from ml.model import ModelConfig, build_model\n"
        f"model = build_model(ModelConfig(input_size={tuple(TINY_SIZE)}))\n"
        f"load_model_weights(model, {str(run / 'best.weights.h5')!r})\n"
        f"x = np.random.default_rng(0).uniform(0, 255, (4, {TINY_SIZE[0]}, {TINY_SIZE[1]}, 3)).astype('float32')\n"
        f"np.save({str(tmp_path / 'jax.npy')!r}, model.predict(x, verbose=0))\n"
    )
    probed = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert probed.returncode == 0, probed.stderr[-3000:]

    from ml.artifact import load_model_weights
    from ml.model import ModelConfig, build_model

    model = build_model(ModelConfig(input_size=TINY_SIZE))
    load_model_weights(model, run / "best.weights.h5")
    x = np.random.default_rng(0).uniform(0, 255, (4, *TINY_SIZE, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), np.load(tmp_path / "jax.npy"), atol=1e-5)

    # And TensorFlow turns the JAX run into a served artifact.
    snapshot = tmp_path / "artifact"
    finalise = [sys.executable, "-m", "ml.train", "--out", str(run), "--snapshot", str(snapshot), "--bootstrap", "10",
                "--model-version", "jax-1", "--data", str(synthetic_ham)]  # fmt: skip
    tf_env = {k: v for k, v in env.items() if k not in ("KERAS_BACKEND", "JAX_PLATFORMS")}
    done = subprocess.run(finalise, cwd=ROOT, env=tf_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((snapshot / "manifest.json").read_text())["version"] == "jax-1"
