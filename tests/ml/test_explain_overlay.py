"""Drawing: overlay sizes and dtypes, the symmetric red/blue scale, colour bars, PNG bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ml.explain.overlay import (
    GRADCAM_CMAP,
    SHAP_CMAP,
    colorize,
    encode_png,
    heatmap_with_colorbar,
    overlay_heatmap,
    overlay_signed,
    ramp_alpha,
    signed_with_colorbar,
    symmetric_limit,
)

IMAGE = np.random.RandomState(0).randint(0, 256, (30, 50, 3)).astype(np.uint8)
HEAT = np.linspace(0, 1, 30 * 50, dtype=np.float32).reshape(30, 50)


@pytest.mark.parametrize("cmap", [GRADCAM_CMAP, "turbo"])
def test_heatmap_overlay_is_uint8_rgb_at_the_image_size(cmap):
    picture = overlay_heatmap(IMAGE, HEAT, alpha=0.5, cmap=cmap)
    assert picture.shape == IMAGE.shape and picture.dtype == np.uint8


def test_a_smaller_map_is_resized_to_the_image():
    assert overlay_heatmap(IMAGE, HEAT[::3, ::5]).shape == IMAGE.shape
    assert overlay_signed(IMAGE, HEAT[::3, ::5] - 0.5).shape == IMAGE.shape


def test_opacity_zero_returns_the_image_and_one_the_colours_where_the_map_is_full():
    np.testing.assert_array_equal(overlay_heatmap(IMAGE, HEAT, alpha=0.0), IMAGE)
    full = overlay_heatmap(IMAGE, np.ones_like(HEAT), alpha=1.0)
    np.testing.assert_array_equal(full, colorize(np.ones_like(HEAT)))


def test_the_colour_fades_with_the_map_so_the_lesion_shows_where_it_is_weak():
    picture = overlay_heatmap(IMAGE, HEAT, alpha=1.0).astype(int)
    np.testing.assert_array_equal(picture[0, 0], IMAGE[0, 0])  # map 0: the image itself
    np.testing.assert_array_equal(picture[-1, -1], colorize(np.array([[1.0]]))[0, 0])  # map 1: the colour
    # halfway: half image, half colour
    middle = np.zeros_like(HEAT) + 0.5
    half = overlay_heatmap(IMAGE, middle, alpha=1.0).astype(int)
    expected = 0.5 * IMAGE.astype(int) + 0.5 * colorize(middle).astype(int)
    assert np.abs(half - expected).max() <= 1


def test_the_layer_opacity_table_is_proportional_to_the_value():
    table = ramp_alpha(256)
    assert table.dtype == np.uint8 and table[0] == 0 and table[-1] == 255 and table[128] in (128, 129)
    assert np.all(np.diff(table.astype(int)) >= 0)
    with pytest.raises(ValueError, match="at least 2 entries"):
        ramp_alpha(1)


def _lightness(rgb: np.ndarray) -> np.ndarray:
    """CIE L* of sRGB colours (uint8, ..., 3)."""
    import cv2

    return cv2.cvtColor(rgb.reshape(1, -1, 3).astype(np.uint8), cv2.COLOR_RGB2LAB)[0, :, 0].astype(float)


def test_gradcam_colours_grow_steadily_brighter_unlike_jet():
    """Perceptually uniform: lightness rises monotonically with the value (jet's rises and falls)."""
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None]
    steps = np.diff(_lightness(colorize(ramp, GRADCAM_CMAP)))
    assert np.all(steps >= -1) and steps.sum() > 150  # L* from near black to near white
    jet_steps = np.diff(_lightness(colorize(ramp, "jet")))
    assert (jet_steps < -1).any()


def test_shap_colours_diverge_symmetrically_in_lightness():
    values = np.linspace(-1, 1, 65, dtype=np.float32)[None]
    lightness = _lightness(colorize(values, SHAP_CMAP, -1.0, 1.0))
    assert np.argmax(lightness) in (31, 32, 33)  # lightest at 0
    assert np.abs(lightness - lightness[::-1]).max() <= 3  # -v and +v equally strong
    colours = colorize(np.array([[-1.0, 1.0]]), SHAP_CMAP, -1.0, 1.0).astype(int)[0]
    assert colours[0, 2] > colours[0, 0] and colours[1, 0] > colours[1, 2]  # blue against, red for


def test_signed_scale_is_symmetric_red_for_positive_blue_for_negative():
    values = np.array([[-2.0, -1.0, 0.0, 1.0, 2.0]])
    assert symmetric_limit(values) == 2.0
    colours = colorize(values, "bwr", -2.0, 2.0).astype(int)
    for k in (0, 1):  # -v and +v: red and blue swap, green equal
        neg, pos = colours[0, k], colours[0, 4 - k]
        assert abs(neg[0] - pos[2]) <= 1 and abs(neg[2] - pos[0]) <= 1 and abs(neg[1] - pos[1]) <= 1
    assert colours[0, 4, 0] > colours[0, 4, 2] and colours[0, 0, 2] > colours[0, 0, 0]
    assert (colours[0, 2] >= 250).all()  # zero is white


def test_signed_overlay_tints_by_sign_and_leaves_zero_grey():
    image = np.full((4, 6, 3), 128, np.uint8)
    values = np.zeros((4, 6), np.float32)
    values[:, :2], values[:, 4:] = 1.0, -1.0
    picture = overlay_signed(image, values).astype(int)
    left, middle, right = picture[0, 0], picture[0, 3], picture[0, 5]
    assert left[0] > left[2] and right[2] > right[0]
    assert middle[0] == middle[1] == middle[2]
    full = overlay_signed(image, values, alpha=1.0)  # +v and -v both reach their full colour
    np.testing.assert_array_equal(full[0, 0], colorize(np.array([[1.0]]), SHAP_CMAP, -1.0, 1.0)[0, 0])
    np.testing.assert_array_equal(full[0, 5], colorize(np.array([[-1.0]]), SHAP_CMAP, -1.0, 1.0)[0, 0])


def test_an_all_zero_signed_map_draws_without_error():
    assert symmetric_limit(np.zeros((3, 3))) == 1.0
    assert overlay_signed(IMAGE, np.zeros((30, 50))).dtype == np.uint8


def test_colorbar_versions_are_wider_rgb_pictures():
    for picture in (heatmap_with_colorbar(IMAGE, HEAT), signed_with_colorbar(IMAGE, HEAT - 0.5)):
        assert picture.ndim == 3 and picture.shape[2] == 3 and picture.dtype == np.uint8
        assert picture.shape[1] > picture.shape[0] * IMAGE.shape[1] / IMAGE.shape[0]


def test_png_bytes_decode_back_to_the_picture():
    data = encode_png(IMAGE)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), IMAGE)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: overlay_heatmap(IMAGE[..., 0], HEAT), "HxWx3 RGB array"),
        (lambda: overlay_heatmap(IMAGE.astype(np.float32), HEAT), "must be uint8"),
        (lambda: overlay_heatmap(IMAGE, HEAT[None]), "must be a 2-D array"),
        (lambda: overlay_heatmap(IMAGE, np.full((30, 50), np.nan)), "NaN or infinite"),
        (lambda: overlay_heatmap(IMAGE, HEAT, alpha=1.5), "Opacity alpha must be between 0 and 1"),
        (lambda: overlay_heatmap(IMAGE, HEAT, cmap="rainbowish"), "Unknown colour map 'rainbowish'"),
        (lambda: overlay_signed(IMAGE, HEAT, vmax=0), "vmax must be positive"),
        (lambda: colorize(HEAT, vmin=1.0, vmax=1.0), "needs vmax > vmin"),
        (lambda: encode_png(np.zeros((4, 4), np.uint8)), "HxWx3 RGB array"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("name, cmap", [("colorbar-gradcam.svg", GRADCAM_CMAP), ("colorbar-shap.svg", SHAP_CMAP)])
def test_the_case_pages_colour_bars_show_the_colour_maps_the_worker_draws(name, cmap):
    """static/colorbar-*.svg are drawn by the browser next to the maps; their stops must be the
    worker's colours, or the scale would lie about the map."""
    import re
    from pathlib import Path

    svg = (Path(__file__).resolve().parents[2] / "static" / name).read_text()
    stops = re.findall(r'<stop offset="([0-9.]+)" stop-color="#([0-9a-f]{6})"/>', svg)
    assert len(stops) >= 9
    offsets = np.array([[float(o) for o, _ in stops]], dtype=np.float32)
    drawn = np.array([[int(c[i : i + 2], 16) for i in (0, 2, 4)] for _, c in stops])
    np.testing.assert_allclose(drawn, colorize(offsets, cmap)[0], atol=2)
