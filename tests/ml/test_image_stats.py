"""ml.image_stats: the pixel statistics the out-of-distribution detector reads beside the embedding."""

from __future__ import annotations

from pathlib import Path

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
