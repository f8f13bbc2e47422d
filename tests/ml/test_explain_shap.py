"""Partition SHAP with a blur masker over superpixels or blocks: shapes, additivity, class choice,
calibration, bad inputs, and the cost of the masker and the model calls."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from ml.explain import explain_shap, probability_function, shap_values
from ml.explain.shap_explainer import default_blur, resize_values

H, W = 24, 32


def bright_spot_model() -> keras.Model:
    """Three classes driven by how many bright red / green pixels there are (weights by hand)."""
    inputs = keras.Input((H, W, 3), name="image")
    conv = layers.Conv2D(2, 1, activation="relu", name="features")
    x = layers.GlobalAveragePooling2D(name="gap")(conv(inputs))
    head = layers.Dense(3, activation="softmax", name="predictions")
    outputs = head(x)
    conv.set_weights([np.array([[[[1 / 255, 0], [0, 1 / 255], [0, 0]]]], "float32"), np.array([-0.5, -0.5], "float32")])
    head.set_weights([np.array([[30.0, -30.0, 0.0], [-30.0, 30.0, 0.0]], "float32"), np.zeros(3, "float32")])
    return keras.Model(inputs, outputs, name="bright_spots")


def spot_image() -> np.ndarray:
    image = np.full((H, W, 3), 50, np.uint8)
    image[2:6, 2:6] = (255, 0, 0)
    image[3:7, 20:24] = (255, 0, 0)
    image[16:20, 10:14] = (0, 255, 0)
    return image


@pytest.fixture(scope="module")
def model_fn():
    return probability_function(bright_spot_model())


@pytest.fixture
def predictor(tiny_predictor):
    """The session's untrained EfficientNetB3+CBAM at 32x32 (tests/ml/conftest.py)."""
    return tiny_predictor


@pytest.mark.parametrize("regions", ["superpixels", "blocks"])
def test_values_are_per_class_2d_maps_that_add_up_to_the_output_change(model_fn, regions):
    image = spot_image()
    result = shap_values(model_fn, image, top_k=2, max_evals=200, batch_size=50, regions=regions)
    assert result.values.shape == (2, H, W) and result.values.dtype == np.float32
    assert list(result.class_indices) == list(np.argsort(-result.probs)[:2])
    # Owen values are efficient: they sum to f(image) - f(fully blurred image).
    expected = result.probs[result.class_indices] - result.base_values
    np.testing.assert_allclose(result.values.sum(axis=(1, 2)), expected, atol=1e-4)


@pytest.mark.parametrize("regions", ["superpixels", "blocks"])
def test_evidence_for_the_red_class_sits_on_the_red_spots(model_fn, regions):
    result = shap_values(model_fn, spot_image(), class_indices=[0], max_evals=300, batch_size=100, regions=regions)
    values = result.values[0]
    red = (spot_image() == (255, 0, 0)).all(axis=2)
    green = (spot_image() == (0, 255, 0)).all(axis=2)
    assert values[red].mean() > 0 > values[green].mean()


def test_results_repeat_with_the_same_seed(model_fn):
    first = shap_values(model_fn, spot_image(), top_k=1, max_evals=100)
    second = shap_values(model_fn, spot_image(), top_k=1, max_evals=100)
    np.testing.assert_array_equal(first.values, second.values)


def test_calibrated_probabilities_and_maps_at_the_original_size(predictor):
    images = np.random.RandomState(0).randint(0, 256, (2, *predictor.input_size, 3)).astype(np.uint8)
    image = np.random.RandomState(2).randint(0, 256, (64, 96, 3)).astype(np.uint8)
    predictor.temperature = 2.5
    try:
        calibrated = probability_function(predictor.model, 2.5)(images)
        np.testing.assert_allclose(calibrated, predictor.predict(list(images)), atol=1e-5)
        (result,) = explain_shap(predictor, [image], top_k=2, max_evals=40, batch_size=40)
        (chosen,) = explain_shap(predictor, [image], max_evals=20, class_names="df")
        expected_probs = predictor.predict([image])[0]
    finally:
        predictor.temperature = 1.0
    assert probability_function(predictor.model, 2.5) is probability_function(predictor.model, 2.5)
    np.testing.assert_allclose(result.probs, expected_probs, atol=1e-5)
    assert result.values.shape == (2, 64, 96)
    expected = result.probs[result.class_indices] - result.base_values
    np.testing.assert_allclose(result.values.sum(axis=(1, 2)), expected, atol=1e-3)
    assert list(chosen.class_indices) == [predictor.class_names.index("df")]


def test_resize_values_keeps_the_sum():
    values = np.random.RandomState(0).randn(12, 16).astype(np.float32)
    assert resize_values(values, (30, 50)).shape == (30, 50)
    assert resize_values(values, (30, 50)).sum() == pytest.approx(values.sum(), rel=0.05, abs=0.05)


def test_default_blur_scales_with_the_image():
    assert default_blur(120, 160) == "blur(40,30)"
    assert default_blur(8, 8) == "blur(3,3)"


@pytest.mark.parametrize(
    "image, kwargs, match",
    [
        (np.zeros((H, W)), {}, "HxWx3 RGB array"),
        (spot_image(), {"max_evals": 5}, "max_evals must be at least 10"),
        (spot_image(), {"batch_size": 0}, "batch_size must be a positive integer"),
        (spot_image(), {"top_k": 0}, r"top_k must be between 1 and the number of classes \(3\)"),
        (spot_image(), {"class_indices": [7]}, "Class index 7 is out of range for a model with 3 classes"),
        (spot_image(), {"regions": "grid"}, "regions must be one of superpixels, blocks"),
        (spot_image(), {"blur": "gauss(3)"}, r"must read 'blur\(kx,ky\)'"),
    ],
)
def test_bad_inputs_raise_clear_errors(model_fn, image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        shap_values(model_fn, image, **kwargs)


def test_probability_function_rejects_images_at_another_size(model_fn):
    with pytest.raises(ValueError, match=r"Images must be shaped \(N, 24, 32, 3\)"):
        model_fn(np.zeros((1, 32, 24, 3)))
    with pytest.raises(ValueError, match="resize them to the model's input size"):
        shap_values(model_fn, np.zeros((30, 40, 3)))


def test_probability_function_rejects_a_non_positive_temperature():
    with pytest.raises(ValueError, match="Temperature must be positive"):
        probability_function(bright_spot_model(), -1.0)


def test_explain_shap_rejects_an_empty_list(predictor):
    with pytest.raises(ValueError, match="needs at least one image"):
        explain_shap(predictor, [])


# --- cost: what shap would redo per image is done once, and the model sees a few batch shapes ----------


def test_the_cached_masker_gives_shap_s_own_values(model_fn, monkeypatch):
    import shap

    import ml.explain.shap_explainer as shap_explainer

    image = spot_image()
    ours = shap_values(model_fn, image, top_k=2, max_evals=200, batch_size=32, regions="blocks")
    monkeypatch.setattr(shap_explainer, "blur_masker", lambda blur, shape: shap.maskers.Image(blur, shape))
    theirs = shap_values(model_fn, image, top_k=2, max_evals=200, batch_size=32, regions="blocks")
    np.testing.assert_array_equal(ours.class_indices, theirs.class_indices)
    np.testing.assert_allclose(ours.values, theirs.values, atol=1e-7)
    np.testing.assert_allclose(ours.base_values, theirs.base_values, atol=1e-7)


def test_the_partition_tree_is_built_once_per_shape_and_the_blur_once_per_image(monkeypatch):
    import ml.explain.shap_explainer as shap_explainer

    blurs = []
    real_blur = shap_explainer.cv2.blur
    monkeypatch.setattr(shap_explainer.cv2, "blur", lambda *a: blurs.append(1) or real_blur(*a))
    first = shap_explainer.blur_masker("blur(5,5)", (H, W, 3))
    second = shap_explainer.blur_masker("blur(5,5)", (H, W, 3))
    assert first.clustering is second.clustering  # one tree per shape
    x = spot_image().astype(np.float32)
    masks = np.random.default_rng(0).random((20, H * W * 3)) > 0.5
    for mask in masks:
        first(mask, x)
    assert len(blurs) == 1
    (out,) = first(masks[0], x)
    blurred = real_blur(x, (5, 5))
    np.testing.assert_array_equal(out.reshape(-1), np.where(masks[0], x.reshape(-1), blurred.reshape(-1)))


def test_model_calls_are_padded_to_a_few_shapes_and_answer_exactly(monkeypatch):
    import ml.explain.shap_explainer as shap_explainer

    model = bright_spot_model()
    fn = probability_function(model, temperature=1.0)
    images = np.random.default_rng(1).integers(0, 256, (70, H, W, 3)).astype(np.float32)
    expected = model(images, training=False).numpy()
    np.testing.assert_allclose(fn(images), expected, atol=1e-6)  # 64 + 6 padded to 8
    np.testing.assert_allclose(fn(images[:3]), expected[:3], atol=1e-6)  # padded to 4
    assert fn(images[:0]).shape == (0, 3)
    pieces = shap_explainer._padded(images, 64)
    assert [(len(chunk), n) for chunk, n in pieces] == [(64, 64), (8, 6)]
    assert shap_explainer.bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


def test_probabilities_from_the_prediction_pass_save_a_forward_pass(model_fn):
    calls = []

    def counting(images):
        calls.append(len(images))
        return model_fn(images)

    image = spot_image()
    probs = model_fn(image[np.newaxis].astype(np.float32))[0]
    given = shap_values(counting, image, top_k=1, max_evals=100, batch_size=32, probs=probs)
    n_given = len(calls)
    calls.clear()
    computed = shap_values(counting, image, top_k=1, max_evals=100, batch_size=32)
    assert len(calls) == n_given + 1
    np.testing.assert_allclose(given.values, computed.values, atol=1e-7)
