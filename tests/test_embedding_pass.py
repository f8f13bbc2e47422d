"""The prediction pass stores each image's embedding and out-of-distribution verdict itself
(worker.batching -> worker.similarity): one model call per micro-batch, and the stored vector is
the one the separate embedding path (`Predictor.embed_and_predict_raw`, used by ml.retrieval and
ml.ood to fit the artifact) gives."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from portal_helpers import SMALL_IMAGES, image_bytes, upload_all, worker_serving

from webapp.db import db
from webapp.models import Analysis

ARTIFACT = Path(__file__).resolve().parents[1] / "models" / "default"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped():
    from ml.predictor import Predictor

    return Predictor.load(ARTIFACT)


@pytest.fixture
def worker(app, monkeypatch, shipped):
    """worker.tasks serving the shipped artifact (MODEL_DIR) in `app`."""
    settings = dataclasses.replace(app.extensions["settings"], MODEL_DIR=ARTIFACT, PREDICT_BATCH_SIZE=4)
    monkeypatch.setitem(app.extensions, "settings", settings)
    return worker_serving(app, monkeypatch, shipped)


@pytest.fixture
def model_calls(monkeypatch):
    """Counts the outermost Keras model calls. Compiled passes run eagerly meanwhile, so that every
    forward pass goes through Python (a traced graph would run without calling back)."""
    import keras
    import tensorflow as tf

    calls = {"outer": 0, "depth": 0}
    original = keras.Model.__call__

    def counting(self, *args, **kwargs):
        calls["outer"] += calls["depth"] == 0
        calls["depth"] += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            calls["depth"] -= 1

    monkeypatch.setattr(keras.Model, "__call__", counting)
    tf.config.run_functions_eagerly(True)
    yield calls
    tf.config.run_functions_eagerly(False)


def test_a_micro_batch_calls_the_model_once(app, client, sent_tasks, worker, model_calls):
    job_ids = upload_all(app, client, sent_tasks)
    assert len(job_ids) == 4
    assert worker.analyse(job_ids[0]) == "succeeded"
    with app.app_context():
        analyses = db.session.scalars(db.select(Analysis)).all()
        assert len(analyses) == 4
        # Probabilities, map, embedding and verdict of all four images, from one call.
        assert all(a.status == "succeeded" and a.embedding and a.ood_score is not None for a in analyses)
    assert model_calls["outer"] == 1


def test_the_stored_embedding_is_the_embedding_paths(app, client, sent_tasks, worker, shipped):
    from ml.ood import OodDetector
    from ml.retrieval import Projection, from_bytes

    job_ids = upload_all(app, client, sent_tasks)
    assert worker.analyse(job_ids[0]) == "succeeded"
    projection = Projection.from_artifact(ARTIFACT, shipped.manifest)
    detector = OodDetector.from_artifact(ARTIFACT, shipped.manifest)
    with app.app_context():
        analyses = db.session.scalars(db.select(Analysis).order_by(Analysis.id)).all()
        stored = np.stack([from_bytes(a.embedding) for a in analyses])
        scores = np.array([a.ood_score for a in analyses])
        flagged = [a.ood_flagged for a in analyses]
    images = [np.asarray(PILImage.open(io.BytesIO(image_bytes(name))).convert("RGB")) for name in SMALL_IMAGES]
    pooled, _ = shipped.embed_and_predict_raw(np.stack([shipped.preprocess(im) for im in images]))
    expected = projection(pooled)
    assert stored.shape == expected.shape == (4, shipped.manifest["retrieval"]["dims"])
    # float16 storage: a unit vector's components are within about 5e-4 of the float32 ones.
    np.testing.assert_allclose(stored.astype(np.float32), expected.astype(np.float32), atol=2e-3)
    # The verdict reads the pixels the pass predicted too (ml.image_stats at the input size).
    np.testing.assert_allclose(scores, detector.score(pooled, images), atol=1e-3)
    assert flagged == list(detector.flagged(detector.score(pooled, images)))
