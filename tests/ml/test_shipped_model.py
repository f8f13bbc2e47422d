"""The default model in models/default: trained on HAM10000, compact, documented, and what the worker
loads when MODEL_DIR is not set (issue 4)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "models" / "default"
FIXTURES = ROOT / "tests" / "fixtures" / "images"
# Five test-split images of the shipped evaluation (eval_test/predictions.csv), as evaluated (200x150).
CARD_IMAGES = ROOT / "tests" / "fixtures" / "card"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((DEFAULT / "manifest.json").read_text())


def test_the_manifest_says_trained_on_ham10000_with_a_lesion_grouped_split(manifest):
    assert manifest["trained"] is True
    assert "ham10000" in manifest["trained_on"].lower()
    assert manifest["class_names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert manifest["split"]["grouped_by"] == "lesion_id"
    assert manifest["weights_dtype"] == "float16"
    assert manifest["temperature"] > 0


def test_the_artifact_is_at_most_25_mb_and_carries_card_licence_and_split():
    size = sum(p.stat().st_size for p in DEFAULT.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024
    for name in ("MODEL_CARD.md", "LICENSE-DATA.md", "split.csv", "eval_test/metrics.json", "eval_test/report.md"):
        assert (DEFAULT / name).is_file(), name
    assert "CC BY-NC 4.0" in (DEFAULT / "LICENSE-DATA.md").read_text()


def test_the_card_reports_the_test_evaluation_shipped_beside_it(manifest):
    metrics = json.loads((DEFAULT / "eval_test" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["images_seen_in_training"] == 0
    assert metrics["model"]["version"] == manifest["version"]
    card = (DEFAULT / "MODEL_CARD.md").read_text()
    assert f"balanced accuracy: {metrics['balanced_accuracy_ci']['estimate']:.3f}" in card
    assert f"{metrics['macro_auc_ci']['estimate']:.3f}" in card
    assert "python -m ml.evaluate" in card and "Research use only" in card
    if manifest["metrics"]["validation"]["balanced_accuracy"] > metrics["balanced_accuracy"]:
        assert "Expect the test figure on new lesions." in card  # the figures a user reads say what to expect


def test_the_worker_loads_it_by_default_and_it_predicts_on_the_cpu(monkeypatch):
    import worker.celery_app as celery_app
    import worker.predict as predict
    from webapp.config import Settings

    monkeypatch.delenv("MODEL_DIR", raising=False)
    monkeypatch.setattr(celery_app, "settings", Settings.load(environ={}))  # the worker's own, outside a task
    predictor = predict.load_predictor()
    assert predictor.manifest["trained"] is True
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(FIXTURES.glob("*.jpg"))]
    probs = predictor.predict(images)
    assert probs.shape == (len(images), 7)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5) and np.all(probs >= 0)


@pytest.fixture(scope="module")
def card_predictions() -> dict[str, dict]:
    with open(DEFAULT / "eval_test" / "predictions.csv", newline="") as f:
        return {row["image_id"]: row for row in csv.DictReader(f)}


def test_the_weights_give_the_predictions_the_card_was_computed_from(card_predictions):
    """Ties models/default/model.weights.h5 to the card's figures: five of the test-set predictions
    behind MODEL_CARD.md (the evaluation's own path: load_images, raw softmax, the manifest's
    temperature and decision) are recomputed from the shipped weights."""
    from ml import data as D
    from ml.calibration import apply_temperature
    from ml.predictor import Predictor

    paths = sorted(CARD_IMAGES.glob("*.jpg"))
    assert len(paths) == 5 and all(p.stem in card_predictions for p in paths)
    predictor = Predictor.load(DEFAULT)
    images = D.load_images([str(p) for p in paths], predictor.input_size).astype(np.float32)
    probs = apply_temperature(predictor.predict_raw(images), predictor.temperature)
    rows = [card_predictions[p.stem] for p in paths]
    expected = np.array([[float(row[f"p_{c}"]) for c in predictor.class_names] for row in rows])
    np.testing.assert_allclose(probs, expected, atol=1e-4)  # the CSV keeps 6 decimals
    chosen = [predictor.class_names[i] for i in predictor.decision.choose(probs)]
    assert chosen == [row["predicted"] for row in rows]
    assert {row["predicted"] for row in rows} == {"akiec", "bcc", "mel", "nv", "vasc"}
