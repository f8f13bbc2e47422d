"""Grad-CAM(++) in one pass: shapes, ranges, class selection, bad inputs, the real model, and the
forward CAM that equals Grad-CAM on the shipped model (and is not used where it would not)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers
from PIL import Image

from ml.explain import (
    calibrate,
    cam_function,
    explain_gradcam,
    gradcam_function,
    last_feature_layer,
    map_method,
    predict_with_gradcam,
)

H, W = 24, 40
ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "default"
FIXTURE_IMAGES = ROOT / "tests" / "fixtures" / "images"


def red_detector_model() -> keras.Model:
    """relu(R/255 - 0.5) -> 2x2 pooling -> GAP -> softmax over 3 classes, weights set by hand."""
    inputs = keras.Input((H, W, 3), name="image")
    conv = layers.Conv2D(2, 1, activation="relu", name="features")
    x = layers.MaxPooling2D(2, name="pool")(conv(inputs))
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    head = layers.Dense(3, activation="softmax", name="predictions")
    outputs = head(x)
    kernel = np.array([[[[1 / 255, -1 / 255], [0, 1 / 255], [0, 0]]]], "float32")
    conv.set_weights([kernel, np.array([-0.5, -0.2], "float32")])
    head.set_weights([np.array([[8.0, -8.0, 0.0], [-4.0, 6.0, 1.0]], "float32"), np.array([0.1, 0.0, -0.1], "float32")])
    return keras.Model(inputs, outputs, name="red_detector")


def random_images(n=3, seed=0, size=(H, W)) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (n, *size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    return red_detector_model()


@pytest.fixture
def predictor(tiny_predictor):
    """The session's untrained EfficientNetB3+CBAM at 32x32 (tests/ml/conftest.py)."""
    return tiny_predictor


@pytest.mark.parametrize("plus_plus", [False, True])
def test_maps_have_the_input_size_and_lie_in_unit_range(tiny, plus_plus):
    probs, maps = predict_with_gradcam(tiny, random_images(), "pool", plus_plus=plus_plus)
    assert probs.shape == (3, 3) and maps.shape == (3, H, W)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0
    assert np.allclose(maps.max(axis=(1, 2)), 1.0)


def test_probabilities_come_from_the_same_pass_and_equal_the_model(tiny):
    images = random_images()
    probs, _ = predict_with_gradcam(tiny, images, "pool")
    np.testing.assert_allclose(probs, tiny(images, training=False).numpy(), atol=1e-5)


def test_a_map_with_no_support_stays_zero_not_nan(tiny):
    black = np.zeros((2, H, W, 3), np.float32)  # the detector never fires
    _, maps = predict_with_gradcam(tiny, black, "pool", plus_plus=False)
    _, maps_pp = predict_with_gradcam(tiny, black, "pool", plus_plus=True)
    assert not np.isnan(maps).any() and not maps.any()
    assert not np.isnan(maps_pp).any() and not maps_pp.any()


def test_class_selection_changes_the_map(tiny):
    images = random_images(1)
    _, for_0 = predict_with_gradcam(tiny, images, "pool", class_index=0)
    _, for_1 = predict_with_gradcam(tiny, images, "pool", class_index=1)
    assert np.abs(for_0 - for_1).mean() > 0.05


def test_default_class_is_the_predicted_one_and_the_batch_form_takes_one_class_per_image(tiny):
    images = random_images(3)
    probs, default = predict_with_gradcam(tiny, images, "pool")
    _, explicit = predict_with_gradcam(tiny, images, "pool", class_index=probs.argmax(axis=1))
    np.testing.assert_allclose(default, explicit, atol=1e-6)
    _, mixed = predict_with_gradcam(tiny, images, "pool", class_index=[0, 1, 2])
    for i, c in enumerate([0, 1, 2]):
        _, single = predict_with_gradcam(tiny, images[i], "pool", class_index=c)
        np.testing.assert_allclose(mixed[i], single[0], atol=1e-6)


def test_plus_plus_gives_a_different_valid_map(tiny):
    images = random_images(2, seed=3)
    _, plain = predict_with_gradcam(tiny, images, "pool", class_index=1)
    _, plus = predict_with_gradcam(tiny, images, "pool", class_index=1, plus_plus=True)
    assert plus.shape == plain.shape and plus.min() >= 0 and plus.max() <= 1
    assert not np.allclose(plain, plus, atol=1e-3)


def test_the_compiled_passes_are_traced_once_and_cached(tiny):
    fn = gradcam_function(tiny, "pool")
    assert gradcam_function(tiny, "pool") is fn
    predict_with_gradcam(tiny, random_images(2), "pool", method="tape")
    predict_with_gradcam(tiny, random_images(5), "pool", method="tape")
    assert fn.experimental_get_tracing_count() == 1
    forward = cam_function(tiny, tiny.get_layer("pool"))
    assert cam_function(tiny, tiny.get_layer("pool")) is forward
    predict_with_gradcam(tiny, random_images(2), "pool")
    predict_with_gradcam(tiny, random_images(5), "pool")
    assert forward.experimental_get_tracing_count() == 1


def _reachable_ops(concrete) -> list[str]:
    graph_def = concrete.graph.as_graph_def()
    outputs = [t.op.name for t in concrete.outputs]
    return [node.op for node in tf.compat.v1.graph_util.extract_sub_graph(graph_def, outputs).node]


def test_one_forward_pass_gives_probabilities_and_map(predictor):
    """The computed graph runs each convolution of the model exactly once and never differentiates
    through the backbone: one forward pass, plus a backward pass over the head only."""
    model = predictor.model
    ops = _reachable_ops(gradcam_function(model, predictor.gradcam_layer).get_concrete_function())
    conv_kernels = [w for w in model.weights if len(w.shape) == 4]  # Conv2D and DepthwiseConv2D
    assert ops.count("Conv2D") + ops.count("DepthwiseConv2dNative") == len(conv_kernels) > 100
    assert not [op for op in ops if "Backprop" in op]


def test_explain_gradcam_returns_calibrated_probs_and_maps_at_the_original_size(predictor):
    rng = np.random.RandomState(1)
    images = [rng.randint(0, 256, (60, 90, 3)).astype(np.uint8), rng.randint(0, 256, (45, 40, 3)).astype(np.uint8)]
    predictor.temperature = 1.7
    try:
        result = explain_gradcam(predictor, images)
        np.testing.assert_allclose(result.probs, predictor.predict(images), atol=1e-5)
    finally:
        predictor.temperature = 1.0
    assert [m.shape for m in result.maps] == [(60, 90), (45, 40)]
    assert all(m.min() >= 0 and m.max() <= 1 for m in result.maps)
    np.testing.assert_array_equal(result.class_indices, result.probs.argmax(axis=1))
    chosen = explain_gradcam(predictor, images, class_names="mel")
    assert list(chosen.class_indices) == [predictor.class_names.index("mel")] * 2


def test_calibrate_matches_softmax_of_scaled_logits():
    logits = np.array([[2.0, 0.5, -1.0]])
    expected = np.exp(logits / 2) / np.exp(logits / 2).sum()
    np.testing.assert_allclose(calibrate(logits, 2.0), expected, rtol=1e-6)
    assert calibrate(logits, 1.0).argmax() == calibrate(logits, 5.0).argmax()


def test_last_feature_layer_is_the_last_4d_output(tiny, predictor):
    assert last_feature_layer(tiny) == "pool"
    assert last_feature_layer(predictor.model) == predictor.gradcam_layer == "cbam_top_spatial"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"images": np.zeros((2, H + 1, W, 3))}, r"Images must be shaped \(N, 24, 40, 3\)"),
        ({"images": np.zeros((H, W))}, "Images must be shaped"),
        ({"layer_name": "nope"}, "has no layer named 'nope'"),
        ({"layer_name": "gap"}, "does not output a single 4-D"),
        ({"class_index": 3}, "Class index 3 is out of range for a model with 3 classes"),
        ({"class_index": [0, 1]}, "Got 2 class indices for 3 images"),
        ({"class_index": 1.5}, "Class indices must be integers"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny, kwargs, match):
    args = {"images": random_images(3), "layer_name": "pool", **kwargs}
    with pytest.raises(ValueError, match=match):
        predict_with_gradcam(tiny, **args)


@pytest.mark.parametrize(
    "images, class_names, match",
    [
        ([], None, "needs at least one image"),
        ([np.zeros((10, 10), np.uint8)], None, "HxWx3 RGB"),
        ([np.zeros((10, 10, 3), np.uint8)], "melanoma", "Unknown class 'melanoma'"),
        ([np.zeros((10, 10, 3), np.uint8)], ["mel", "nv"], "Got 2 class names for 1 images"),
    ],
)
def test_explain_gradcam_rejects_bad_inputs(predictor, images, class_names, match):
    with pytest.raises(ValueError, match=match):
        explain_gradcam(predictor, images, class_names)


def test_calibrate_rejects_a_non_positive_temperature():
    with pytest.raises(ValueError, match="Temperature must be positive"):
        calibrate(np.zeros((1, 3)), 0.0)


# --- the forward CAM: Grad-CAM without a tape where the head allows it --------------------------------


def with_hidden_dense_head() -> keras.Model:
    """The red detector with a ReLU dense layer between pooling and softmax: CAM is not Grad-CAM."""
    inputs = keras.Input((H, W, 3), name="image")
    x = layers.Conv2D(4, 1, activation="relu", name="features", kernel_initializer="he_uniform")(inputs)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(5, activation="relu", name="hidden", kernel_initializer=keras.initializers.RandomNormal(seed=1))(x)
    outputs = layers.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="hidden_head")


@pytest.fixture(scope="module")
def shipped():
    """The shipped artifact (models/default), loaded read-only."""
    from ml.predictor import Predictor

    return Predictor.load(SHIPPED)


def fixture_images() -> list[np.ndarray]:
    paths = sorted(p for p in FIXTURE_IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:6]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    rng = np.random.RandomState(7)
    return images + [rng.randint(0, 256, (150, 200, 3)).astype(np.uint8) for _ in range(2)]


def test_forward_cam_equals_the_tape_grad_cam_on_the_shipped_model(shipped):
    assert shipped.gradcam_method == "forward"
    images = fixture_images()
    forward = explain_gradcam(shipped, images, method="forward")
    tape = explain_gradcam(shipped, images, method="tape")
    np.testing.assert_array_equal(forward.class_indices, tape.class_indices)
    np.testing.assert_allclose(forward.probs, tape.probs, atol=1e-6)
    # The pooled embedding: the forward CAM's mean of the feature map is the tape pass's avg_pool output.
    assert forward.embeddings.shape == (len(images), 1536)
    np.testing.assert_allclose(forward.embeddings, tape.embeddings, rtol=1e-4, atol=1e-5)
    for by_forward, by_tape in zip(forward.maps, tape.maps):
        assert by_forward.max() > 0.9 and np.abs(by_forward - by_tape).max() <= 1e-5  # resized: peak near 1
    for class_name in ("mel", "vasc"):  # classes other than the decided one, too
        a = explain_gradcam(shipped, images[:3], class_name, method="forward").maps
        b = explain_gradcam(shipped, images[:3], class_name, method="tape").maps
        assert max(np.abs(x - y).max() for x, y in zip(a, b)) <= 1e-5


def test_the_prediction_pass_map_explains_the_decided_class_not_the_plain_argmax(shipped):
    """The shipped decision adjusts logits by the class prior; the map must follow that decision."""
    assert shipped.decision.tau > 0
    images = fixture_images()
    result = explain_gradcam(shipped, images)
    decided = shipped.decision.choose(shipped.predict(images))
    np.testing.assert_array_equal(result.class_indices, decided)


def test_the_forward_pass_runs_no_gradient_and_each_convolution_once(shipped):
    model = shipped.model
    fn = cam_function(model, model.get_layer(shipped.gradcam_layer))
    ops = _reachable_ops(fn.get_concrete_function())
    conv_kernels = [w for w in model.weights if len(w.shape) == 4]
    assert ops.count("Conv2D") + ops.count("DepthwiseConv2dNative") == len(conv_kernels)
    assert not [op for op in ops if "Grad" in op or "Backprop" in op]


def test_the_default_method_follows_the_head(tiny):
    assert map_method(tiny, "pool") == "forward"  # pool -> GAP -> dense softmax
    assert map_method(tiny, "features") == "tape"  # a max pooling lies between: not CAM
    assert map_method(tiny, "pool", plus_plus=True) == "tape"
    assert map_method(with_hidden_dense_head(), "features") == "tape"


@pytest.mark.parametrize("model_fn, layer", [(red_detector_model, "pool")])
def test_forward_and_tape_agree_on_a_small_model_for_every_class(model_fn, layer):
    model = model_fn()
    images = random_images(4, seed=5)
    for target in (None, 0, 1, 2):
        probs_f, maps_f = predict_with_gradcam(model, images, layer, class_index=target, method="forward")
        probs_t, maps_t = predict_with_gradcam(model, images, layer, class_index=target, method="tape")
        np.testing.assert_allclose(probs_f, probs_t, atol=1e-6)
        np.testing.assert_allclose(maps_f, maps_t, atol=1e-5)


def test_where_the_identity_fails_auto_keeps_the_tape_and_forward_is_refused():
    model = with_hidden_dense_head()
    images = random_images(3, seed=2)
    _, auto = predict_with_gradcam(model, images, "features")
    _, tape = predict_with_gradcam(model, images, "features", method="tape")
    np.testing.assert_array_equal(auto, tape)
    with pytest.raises(ValueError, match="CAM equals Grad-CAM only when layer 'features'"):
        predict_with_gradcam(model, images, "features", method="forward")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "cam"}, r"method must be one of \('auto', 'forward', 'tape'\)"),
        ({"method": "forward", "plus_plus": True}, "Grad-CAM\\+\\+ needs the gradient tape"),
    ],
)
def test_bad_methods_raise_clear_errors(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict_with_gradcam(tiny, random_images(2), "pool", **kwargs)
