"""Predictor: untrained construction, inference, the artifact round trip and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from ml_helpers import TINY_SIZE

from ml import Predictor
from ml.artifact import REQUIRED_KEYS, WEIGHTS, export_artifact, read_manifest, weights_dtype, write_manifest
from ml.model import CLASS_NAMES


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(150, 200), (40, 30), (450, 600)]
    return [rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8) for i in range(n)]


def test_untrained_predictor_describes_itself(tiny_predictor):
    m = tiny_predictor.manifest
    assert set(REQUIRED_KEYS) <= set(m)
    assert m["trained"] is False and m["version"] == "untrained"
    assert m["input_size"] == list(TINY_SIZE) and m["class_names"] == list(CLASS_NAMES)
    assert tiny_predictor.model.get_layer(tiny_predictor.gradcam_layer) is not None


def test_predict_gives_probabilities_for_images_of_any_size(tiny_predictor):
    probs = tiny_predictor.predict(_images(5))
    assert probs.shape == (5, 7) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert tiny_predictor.predict([]).shape == (0, 7)


def test_inference_graph_is_traced_once(tiny_predictor):
    tiny_predictor.predict(_images(1))
    tiny_predictor.predict(_images(3))
    tiny_predictor.predict(_images(2), tta=True)
    assert tiny_predictor._forward.experimental_get_tracing_count() == 1


def test_preprocess_matches_training_resize(tiny_predictor):
    from ml.data import resize_image

    image = _images(1)[0]
    x = tiny_predictor.preprocess(image)
    assert x.shape == (*TINY_SIZE, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x, resize_image(image, TINY_SIZE).astype(np.float32))


def test_predict_accepts_rgba_by_dropping_alpha(tiny_predictor):
    rgb = _images(1)[0]
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    np.testing.assert_allclose(tiny_predictor.predict([rgba]), tiny_predictor.predict([rgb]), atol=1e-6)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((10, 10), np.uint8), "got a grayscale array"),
        (np.zeros((10, 10, 3), np.float32), "Expected a uint8 image"),
        (np.zeros((10, 10, 2), np.uint8), "Expected an HxWx3 RGB image"),
        (np.zeros((0, 10, 3), np.uint8), "Image has no pixels"),
    ],
)
def test_predict_rejects_bad_images(tiny_predictor, image, match):
    with pytest.raises(ValueError, match=match):
        tiny_predictor.predict([image])


def _save_artifact(predictor, folder, temperature=1.7):
    folder.mkdir(parents=True, exist_ok=True)
    predictor.model.save_weights(folder / WEIGHTS)
    write_manifest(folder, {**predictor.manifest, "temperature": temperature})
    return folder


@pytest.fixture(scope="module")
def artifact(tiny_predictor, tmp_path_factory):
    return _save_artifact(tiny_predictor, tmp_path_factory.mktemp("artifact") / "model")


def test_artifact_round_trip_gives_identical_outputs(tiny_predictor, artifact):
    from ml.calibration import apply_temperature

    loaded = Predictor.load(artifact)
    images = _images(4)
    raw = tiny_predictor.predict_raw(np.stack([tiny_predictor.preprocess(i) for i in images]))
    np.testing.assert_array_equal(loaded.predict(images), apply_temperature(raw, 1.7))
    assert loaded.temperature == 1.7 and loaded.gradcam_layer == tiny_predictor.gradcam_layer
    assert loaded.manifest == read_manifest(artifact)


def test_float16_export_loads_into_a_float32_model(tiny_predictor, artifact, tmp_path):
    out = export_artifact(artifact, tmp_path / "shipped", float16=True)
    assert weights_dtype(out / WEIGHTS) == "float16"
    assert (out / WEIGHTS).stat().st_size < 0.6 * (artifact / WEIGHTS).stat().st_size
    assert read_manifest(out)["weights_dtype"] == "float16"
    loaded = Predictor.load(out)
    # Comparing the weights (not predictions) spares tracing a second inference graph.
    for ours, theirs in zip(loaded.model.weights, tiny_predictor.model.weights):
        assert ours.dtype == theirs.dtype and "float16" not in ours.dtype
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-3, atol=1e-4)


def test_load_default_falls_back_to_untrained_with_the_env_size(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Predictor, "untrained", classmethod(lambda cls, input_size: calls.append(input_size)))
    monkeypatch.setenv("UNTRAINED_INPUT_SIZE", "32,48")
    Predictor.load_default(str(tmp_path))
    monkeypatch.delenv("UNTRAINED_INPUT_SIZE")
    Predictor.load_default(None)
    assert calls == [(32, 48), (120, 160)]
    monkeypatch.setenv("UNTRAINED_INPUT_SIZE", "big")
    with pytest.raises(ValueError, match="UNTRAINED_INPUT_SIZE must look like 'H,W'"):
        Predictor.load_default(None)


def test_load_default_loads_an_artifact(artifact, monkeypatch):
    monkeypatch.setattr(Predictor, "load", classmethod(lambda cls, folder: ("loaded", folder)))
    assert Predictor.load_default(str(artifact)) == ("loaded", str(artifact))


@pytest.mark.parametrize(
    "breakage, error, match",
    [
        ("no_folder", FileNotFoundError, "Model folder .* does not exist"),
        ("no_manifest", FileNotFoundError, "has no manifest.json"),
        ("no_weights", FileNotFoundError, "has no model.weights.h5"),
        ("bad_json", ValueError, "is not valid JSON"),
        ("missing_key", ValueError, r"lacks the required key\(s\) \['temperature'\]"),
        ("bad_size", ValueError, "invalid input_size"),
        ("wrong_architecture", ValueError, "do not match the architecture"),
    ],
)
def test_load_errors(artifact, tmp_path, breakage, error, match):
    folder = Path(shutil.copytree(artifact, tmp_path / "model"))
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if breakage == "no_folder":
        shutil.rmtree(folder)
    elif breakage == "no_manifest":
        manifest_path.unlink()
    elif breakage == "no_weights":
        (folder / WEIGHTS).unlink()
    elif breakage == "bad_json":
        manifest_path.write_text("{not json")
    elif breakage == "missing_key":
        manifest.pop("temperature")
        manifest_path.write_text(json.dumps(manifest))
    elif breakage == "bad_size":
        manifest["input_size"] = [8, 8]
        manifest_path.write_text(json.dumps(manifest))
    elif breakage == "wrong_architecture":
        manifest["architecture"]["cbam"] = False
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(error, match=match):
        Predictor.load(folder)
