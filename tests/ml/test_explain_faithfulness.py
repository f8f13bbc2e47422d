"""Faithfulness: on a model whose class evidence comes from one known image region, Grad-CAM and
SHAP put most of their mass in that region, and not when the model reads another region; the
deletion curve ranks a map on that region above maps elsewhere.

The model is a tiny conv net with hand-set weights (deterministic, nothing trained):
  a 1x1 "bright red" detector relu(R/255 - 0.5) with two identical channels, 4x4 average pooling,
  a gate that keeps channel 0 only inside region A and channel 1 only inside region B, global
  average pooling and a softmax head with logits k*(g0 - g1) and k*(g1 - g0).
Class 0 is therefore evidence in region A (and counter-evidence in B); the images carry identical
bright blobs in all four quadrants, so only the model decides where the evidence is. The input is
not square and the regions are not symmetric under a transpose or a flip, so a mis-oriented map
fails too.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers, ops

from ml.explain import positive_mass_inside, predict_with_gradcam
from ml.explain.faithfulness import deletion_auc, deletion_curve
from ml.explain.metrics import attribution_order, energy_inside, top_share_inside
from ml.explain.shap_explainer import blurred, probability_function, shap_values

H, W, POOL = 32, 48, 4
QUADRANTS = {  # (row slice, column slice) in pixels
    "top_right": (slice(0, H // 2), slice(W // 2, W)),
    "bottom_left": (slice(H // 2, H), slice(0, W // 2)),
    "top_left": (slice(0, H // 2), slice(0, W // 2)),
}
THRESHOLD = 0.6  # share of the map's (positive) mass required inside a region covering 25% of the image


class RegionGate(layers.Layer):
    """Multiplies each channel by a fixed 0/1 mask over the feature grid (test-only layer)."""

    def __init__(self, mask, **kwargs):
        super().__init__(**kwargs)
        self.mask = np.asarray(mask, dtype="float32")

    def call(self, x):
        return x * ops.convert_to_tensor(self.mask)


def region_mask(name: str) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[QUADRANTS[name]] = True
    return mask


def gated_model(region_a: str, region_b: str, k: float = 60.0) -> keras.Model:
    """Class 0 reads bright blobs in region_a, class 1 in region_b (see the module docstring)."""
    inputs = keras.Input((H, W, 3), name="image")
    detector = layers.Conv2D(2, 1, activation="relu", name="detector")
    x = detector(inputs)
    x = layers.AveragePooling2D(POOL, name="pool")(x)
    grid = [region_mask(r)[::POOL, ::POOL] for r in (region_a, region_b)]
    x = RegionGate(np.stack(grid, axis=-1), name="gate")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    head = layers.Dense(2, activation="softmax", name="predictions")
    outputs = head(x)
    red_only = np.array([[[[1 / 255, 1 / 255], [0, 0], [0, 0]]]], "float32")
    detector.set_weights([red_only, np.array([-0.5, -0.5], "float32")])
    head.set_weights([np.array([[k, -k], [-k, k]], "float32"), np.zeros(2, "float32")])
    return keras.Model(inputs, outputs, name=f"reads_{region_a}")


def blob_images(n: int = 2, seed: int = 0) -> np.ndarray:
    """Dark images with three 4x4 bright-red blobs at random places in every quadrant."""
    rng = np.random.RandomState(seed)
    images = np.empty((n, H, W, 3), dtype=np.uint8)
    images[:] = (40, 60, 80)
    images += rng.randint(0, 10, images.shape).astype(np.uint8)
    for image in images:
        for top in (0, H // 2):
            for left in (0, W // 2):
                for _ in range(3):
                    r, c = top + rng.randint(0, H // 2 - 4), left + rng.randint(0, W // 2 - 4)
                    image[r : r + 4, c : c + 4] = (255, 40, 40)
    return images


@pytest.fixture(scope="module")
def images():
    return blob_images()


@pytest.mark.parametrize("plus_plus", [False, True])
def test_gradcam_mass_lies_in_the_region_the_class_reads(images, plus_plus):
    model = gated_model("top_right", "bottom_left")
    _, maps = predict_with_gradcam(model, images, "gate", class_index=0, plus_plus=plus_plus)
    for heat in maps:
        assert energy_inside(heat, region_mask("top_right")) > THRESHOLD


@pytest.mark.parametrize("plus_plus", [False, True])
def test_gradcam_of_a_model_reading_elsewhere_fails_the_same_check(images, plus_plus):
    elsewhere = gated_model("bottom_left", "top_left")
    _, maps = predict_with_gradcam(elsewhere, images, "gate", class_index=0, plus_plus=plus_plus)
    for heat in maps:
        assert energy_inside(heat, region_mask("top_right")) < THRESHOLD
        assert energy_inside(heat, region_mask("bottom_left")) > THRESHOLD


def test_gradcam_of_the_other_class_follows_its_region(images):
    model = gated_model("top_right", "bottom_left")
    _, maps = predict_with_gradcam(model, images, "gate", class_index=1)
    for heat in maps:
        assert energy_inside(heat, region_mask("top_right")) < THRESHOLD
        assert energy_inside(heat, region_mask("bottom_left")) > THRESHOLD


def _shap_class0(model, image):
    result = shap_values(probability_function(model), image, class_indices=[0], max_evals=300, batch_size=100)
    return result.values[0]


def test_shap_positive_mass_lies_in_the_region_the_class_reads(images):
    values = _shap_class0(gated_model("top_right", "bottom_left"), images[0])
    assert positive_mass_inside(values, region_mask("top_right")) > THRESHOLD
    # Blobs in region B lower class 0: the negative mass sits there.
    assert positive_mass_inside(-values, region_mask("bottom_left")) > THRESHOLD


def test_shap_of_a_model_reading_elsewhere_fails_the_same_check(images):
    values = _shap_class0(gated_model("bottom_left", "top_left"), images[0])
    assert positive_mass_inside(values, region_mask("top_right")) < THRESHOLD
    assert positive_mass_inside(values, region_mask("bottom_left")) > THRESHOLD


# --- the deletion curve and the lesion share: known answers on the same planted-signal model ----------


def _curve(model, image, values, class_index=0):
    return deletion_curve(probability_function(model), image, values, class_index, blurred(image))


def test_deletion_auc_is_lowest_for_the_map_on_the_region_the_class_reads(images):
    model = gated_model("top_right", "bottom_left")
    image = images[0].astype(np.float32)
    auc = {name: deletion_auc(_curve(model, image, region_mask(name).astype(float))) for name in QUADRANTS}
    # Hiding the read region first removes the evidence at once; hiding an unread one changes
    # nothing until the read region goes; hiding the counter-evidence first raises the probability.
    assert auc["top_right"] < auc["top_left"] < auc["bottom_left"]
    assert auc["top_left"] - auc["top_right"] > 0.2


def test_the_curve_runs_from_the_image_to_the_baseline_for_every_map(images):
    model = gated_model("top_right", "bottom_left")
    image = images[0].astype(np.float32)
    fn = probability_function(model)
    expected_ends = fn(np.stack([image, blurred(image)]))[:, 0]
    for values in (region_mask("top_right").astype(float), np.random.default_rng(0).random((H, W))):
        curve = _curve(model, image, values)
        assert curve.shape == (17,)
        np.testing.assert_allclose(curve[[0, -1]], expected_ends, atol=1e-6)


def test_superpixel_shap_beats_a_random_map_on_the_deletion_curve(images):
    model = gated_model("top_right", "bottom_left")
    image = images[0].astype(np.float32)
    result = shap_values(probability_function(model), image, class_indices=[0], max_evals=300, regions="superpixels")
    shap_auc = deletion_auc(_curve(model, image, result.values[0]))
    random_auc = deletion_auc(_curve(model, image, np.random.default_rng(1).random((H, W))))
    assert shap_auc < random_auc - 0.1


def test_top_share_inside_scores_one_on_the_region_and_its_area_for_a_blind_map():
    region = region_mask("top_right")
    assert top_share_inside(region.astype(float), region) == 1.0
    assert top_share_inside(region_mask("bottom_left").astype(float), region) == 0.0
    # a flat map ranks pixels at random: about the region's 25 % of the image
    assert top_share_inside(np.zeros((H, W)), region) == pytest.approx(0.25, abs=0.06)
    assert top_share_inside(region.astype(float), region, fraction=0.5) == 0.5


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: top_share_inside(np.ones((4, 4)), np.zeros((4, 4))), "region is empty"),
        (lambda: top_share_inside(np.ones((4, 4)), np.ones((4, 4)), 1.5), "fraction must be in"),
        (lambda: attribution_order(np.full((2, 2), np.nan)), "NaN"),
        (lambda: attribution_order(np.ones(4)), "must be 2-D"),
        (lambda: deletion_auc(np.ones(1)), "at least two points"),
    ],
)
def test_faithfulness_measures_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_deletion_curve_rejects_bad_shapes_steps_and_classes(images):
    fn = probability_function(gated_model("top_right", "bottom_left"))
    image = images[0].astype(np.float32)
    values = np.ones((H, W))
    with pytest.raises(ValueError, match="one HxWx3 shape"):
        deletion_curve(fn, image, values, 0, image[:-1])
    with pytest.raises(ValueError, match="steps must be at least 1"):
        deletion_curve(fn, image, values, 0, image, steps=0)
    with pytest.raises(ValueError, match="Class index 5 is out of range"):
        deletion_curve(fn, image, values, 5, image)
