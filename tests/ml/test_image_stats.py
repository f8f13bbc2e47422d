"""ml.image_stats: the pixel statistics the out-of-distribution detector reads beside the embedding."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ml.image_stats import NAMES, statistics

DERMOSCOPY = Path(__file__).resolve().parents[1] / "fixtures" / "images" / "ISIC_0025964.jpg"
SIZE = (120, 160)  # the shipped model's input size


def stats_of(image: np.ndarray) -> dict[str, float]:
    return dict(zip(NAMES, statistics([image], SIZE)[0]))


def test_a_flat_square_and_a_dermoscopy_image_differ_the_expected_way():
    lesion = stats_of(np.asarray(Image.open(DERMOSCOPY).convert("RGB")))
    square = np.zeros((150, 200, 3), np.uint8)
    square[...] = (225, 180, 155)  # a skin tone, so that colour alone does not tell them apart
    flat = stats_of(square)
    # A flat colour has no texture and one colour; a lesion has edges, detail and many colours.
    assert flat["flat_share"] > 0.99 > lesion["flat_share"]
    assert flat["high_frequency"] < lesion["high_frequency"]
    assert flat["distinct_colours"] == 0.0 < lesion["distinct_colours"] - np.log(50)
    assert flat["brightness_spread"] == 0.0 < lesion["brightness_spread"]
    assert flat["edge_share"] == 0.0 < lesion["edge_share"]
    assert flat["hue_spread"] < 1e-6 < lesion["hue_spread"]


def test_images_of_any_size_are_measured_at_the_input_size():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    large = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)  # the same picture, twice the size
    values = statistics([small, large], SIZE)
    assert values.shape == (2, len(NAMES)) and values.dtype == np.float32
    np.testing.assert_allclose(values[0], values[1], atol=0.05)
    with pytest.raises(ValueError, match="uint8"):
        statistics([np.zeros((10, 10, 3), np.float32)], SIZE)


# --- the same values as the formulas the detector was fitted with ---------------------------------


def reference_statistics(image: np.ndarray) -> list[float]:
    """The statistics of one image at the input size, written out plainly: per image in float32,
    the hue angle from arctan2 and weighted by cos and sin, max/min and a hypot per pixel."""
    image = image.astype(np.float32)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    brightest, darkest = image.max(axis=2), image.min(axis=2)
    chroma = brightest - darkest
    brightness = 0.299 * r + 0.587 * g + 0.114 * b
    angle = np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)
    weight = max(float(chroma.sum()), 1e-6)
    resultant = np.hypot((chroma * np.cos(angle)).sum(), (chroma * np.sin(angle)).sum()) / weight
    gradient = np.hypot(cv2.Sobel(brightness, cv2.CV_32F, 1, 0), cv2.Sobel(brightness, cv2.CV_32F, 0, 1))
    detail = np.abs(brightness - cv2.GaussianBlur(brightness, (0, 0), 1.5))
    kernel = np.ones((3, 3), np.uint8)
    local_range = cv2.dilate(brightness, kernel) - cv2.erode(brightness, kernel)
    q = image.astype(np.int32) >> 4
    colours = len(np.unique((q[..., 0] << 8) | (q[..., 1] << 4) | q[..., 2]))
    h, w = brightness.shape
    dy, dx = int(h * 0.15), int(w * 0.15)
    centre = brightness[dy : h - dy, dx : w - dx]
    border_mean = (brightness.sum() - centre.sum()) / (brightness.size - centre.size)
    return [
        (chroma / (brightest + 1.0)).mean(),
        (chroma < 12).mean(),
        1.0 - resultant if weight > 1e-6 else 0.0,
        ((r > g) & (g > b) & (r - b > 20)).mean(),
        (gradient > 60).mean(),
        np.log1p(detail.mean()),
        (local_range < 2).mean(),
        np.log(colours),
        (border_mean - centre.mean()) / 255.0,
        brightness.std() / 255.0,
        ((brightness > 235) & (chroma < 20)).mean(),
        (brightness < 15).mean(),
    ]


def test_the_statistics_are_those_the_detector_was_fitted_with():
    from ml import outliers
    from ml.data import resize_image

    fixtures = sorted(DERMOSCOPY.parent.glob("*.jpg"))
    lesions = [np.asarray(Image.open(path).convert("RGB")) for path in fixtures]
    kinds = [image for kind in outliers.GENERATED for image in outliers.generate(kind, 2, 3)]
    grey = np.repeat(np.repeat(np.arange(0, 240, 15, dtype=np.uint8), 10)[None, :, None], 120, axis=0)
    grey = np.repeat(grey, 3, axis=2)  # steps of 15: Sobel gradients of exactly 60, on the threshold
    images = [*lesions, *kinds, grey]
    expected = np.array([reference_statistics(resize_image(image, SIZE)) for image in images])
    measured = statistics(images, SIZE)
    np.testing.assert_allclose(measured, expected, rtol=1e-4, atol=1e-7)
    # Measured together or one at a time: the same numbers.
    np.testing.assert_array_equal(measured[:3], statistics(images[:3], SIZE))
