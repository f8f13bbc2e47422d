"""Cheap image-level statistics of the model's input: how dermoscopy-like the pixels themselves are.

The out-of-distribution detector (ml.ood) scores an image from its embedding, and the embedding of
a network trained on dermoscopy alone says little about a flat colour, a mask or a document: such
images land close to some real lesions. The pixels say it at once, so these statistics are
computed from the same preprocessed input array the prediction pass receives (no extra model
call) and join the embedding's signals in the detector:

- colour: mean saturation, the share of near-grey pixels, the hue spread, the share of pixels
  whose channels fall red > green > blue (tan and brown; pink skin, with blue above green, does not);
- texture: the share of strong edges, the high-frequency energy, the share of flat (locally
  constant) pixels, the number of distinct colours;
- layout: how much darker the centre is than the border (often a lesion in the middle of a
  dermatoscope's field, though a large lesion fills it), the brightness spread, the shares of
  near-white and near-black pixels.

Each statistic is a plain number; the detector's regression weighs them (ml.ood), so none of them
needs to separate on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

NAMES = (
    "saturation",
    "grey_share",
    "hue_spread",
    "rgb_order_share",
    "edge_share",
    "high_frequency",
    "flat_share",
    "distinct_colours",
    "centre_darkening",
    "brightness_spread",
    "white_share",
    "black_share",
)
GREY_CHROMA = 12.0  # max - min channel below this: a grey pixel (0-255 scale)
EDGE_GRADIENT = 60.0  # Sobel magnitude of the brightness above this: a strong edge
FLAT_RANGE = 2.0  # brightness range over a 3x3 neighbourhood below this: a flat pixel
BORDER = 0.15  # share of each side that counts as the border ring
# Images measured together: numpy's per-call cost is shared among them, and a call over a whole
# dataset (ml.ood) still holds a few MB of temporaries at a time.
CHUNK = 8
NEAR_EDGE = 1e-3  # cv2.magnitude within this of EDGE_GRADIENT: decided by np.hypot (see _strong_edges)
_KERNEL = np.ones((3, 3), np.uint8)


def statistics(images: Sequence[np.ndarray] | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, len(NAMES)) float32 statistics of N RGB images in 0-255, each first brought to `size`
    (H, W), the model's input size, by the model's own resize (`ml.data.resize_image`) when it is
    another size: the statistics of the array the network sees, whatever the upload's size.

    Raises:
        ValueError: for an image that is not HxWx3 uint8.
    """
    at_size = [_at_size(image, size) for image in images]
    out = np.zeros((len(at_size), len(NAMES)), np.float32)
    for start in range(0, len(at_size), CHUNK):
        out[start : start + CHUNK] = _measure(np.stack(at_size[start : start + CHUNK]))
    return out


def _at_size(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = np.asarray(image)
    if image.shape != (*size, 3) or image.dtype != np.uint8:
        from ml.data import resize_image  # ml.data loads the model code: only when needed

        image = resize_image(image, size)  # raises for anything but HxWx3 uint8
    return image


def _measure(pixels: np.ndarray) -> np.ndarray:
    """The NAMES of N uint8 (H, W, 3) images, as an (N, len(NAMES)) array.

    Channel planes of one image per row (N, H * W): the colour statistics are exact in uint8, and
    the float32 brightness and ratios are computed and averaged as per-image float32 code would."""
    n, h, w, _ = pixels.shape
    planes = np.ascontiguousarray(np.moveaxis(pixels, -1, 0)).reshape(3, n, h * w)
    r8, g8, b8 = planes
    brightest8 = np.maximum(np.maximum(r8, g8), b8)
    chroma8 = brightest8 - np.minimum(np.minimum(r8, g8), b8)
    r, g, b = planes.astype(np.float32)
    chroma = chroma8.astype(np.float32)
    brightness = 0.299 * r + 0.587 * g + 0.114 * b

    def share(mask: np.ndarray) -> np.ndarray:
        return np.count_nonzero(mask, axis=1) / mask.shape[1]

    # r - b in uint8 wraps where b > r, which r > g > b already excludes.
    rgb_order = (r8 > g8) & (g8 > b8) & (r8 - b8 > 20)
    return np.column_stack(
        [
            (chroma / (brightest8.astype(np.float32) + 1.0)).mean(axis=1),
            share(chroma < GREY_CHROMA),
            _hue_spread(r, g, b, chroma),
            share(rgb_order),
            [_texture(image_brightness.reshape(h, w)) for image_brightness in brightness],
            [np.log(_distinct(image)) for image in pixels],
            _centre_darkening(brightness.reshape(n, h, w)),
            brightness.std(axis=1) / 255.0,
            share((brightness > 235) & (chroma < 20)),
            share(brightness < 15),
        ]
    )


def _hue_spread(r: np.ndarray, g: np.ndarray, b: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """Circular variance of the hue, each pixel weighted by its chroma (0: one hue, 1: all hues), per row.

    The hue angle is that of the opponent axes (x, y) = (2r - g - b, sqrt(3) (g - b)), the angle
    HSV's hue approximates; chroma * (cos, sin) of it is chroma * (x, y) / hypot(x, y), with no
    trigonometry. x, g - b and x^2 + 3 (g - b)^2 are small integers, exact in float32; hypot is 0
    only where r = g = b, where the chroma, and so the weight, is 0 too."""
    x = (r + r) - (g + b)
    g_minus_b = g - b
    weight = chroma / np.sqrt(np.maximum(x * x + 3.0 * (g_minus_b * g_minus_b), 1.0))
    cos_sum = np.add.reduce(weight * x, axis=1, dtype=np.float64)
    sin_sum = np.add.reduce(weight * g_minus_b, axis=1, dtype=np.float64) * np.sqrt(3.0)
    total = chroma.sum(axis=1, dtype=np.float64)
    resultant = np.hypot(cos_sum, sin_sum) / np.maximum(total, 1e-6)
    return np.where(total < 1e-6, 0.0, np.clip(1.0 - resultant, 0.0, 1.0))


def _texture(brightness: np.ndarray) -> list[float]:
    """(strong-edge share, log high-frequency energy, flat share) of the brightness."""
    gx = cv2.Sobel(brightness, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(brightness, cv2.CV_32F, 0, 1, ksize=3)
    detail = cv2.absdiff(brightness, cv2.GaussianBlur(brightness, (0, 0), 1.5))
    local_range = cv2.morphologyEx(brightness, cv2.MORPH_GRADIENT, _KERNEL)  # dilate - erode
    return [
        _strong_edges(gx, gy) / brightness.size,
        float(np.log1p(detail.mean())),
        np.count_nonzero(local_range < FLAT_RANGE) / brightness.size,
    ]


def _strong_edges(gx: np.ndarray, gy: np.ndarray) -> int:
    """How many pixels have a gradient magnitude above EDGE_GRADIENT, as np.hypot rounds it.

    cv2.magnitude is 20 times faster but can be off in the last bit (it makes 60.000004 of a
    gradient of exactly (48, 36)), and such round gradients are common on grey pixels: those
    within NEAR_EDGE of the threshold are decided by np.hypot."""
    magnitude = cv2.magnitude(gx, gy)
    near = np.abs(magnitude - EDGE_GRADIENT) <= NEAR_EDGE
    clear = np.count_nonzero(magnitude > EDGE_GRADIENT + NEAR_EDGE)
    return clear + int(np.count_nonzero(np.hypot(gx[near], gy[near]) > EDGE_GRADIENT))


def _distinct(image: np.ndarray) -> int:
    """How many distinct colours an (H, W, 3) uint8 image has at 4 bits per channel (a 16x16x16
    histogram: no sort, unlike np.unique)."""
    histogram = cv2.calcHist([image], [0, 1, 2], None, [16, 16, 16], [0, 256, 0, 256, 0, 256])
    return int(np.count_nonzero(histogram))


def _centre_darkening(brightness: np.ndarray) -> np.ndarray:
    """Mean brightness of the border ring minus that of the centre, over 255, of (N, H, W) images."""
    _, h, w = brightness.shape
    dy, dx = max(1, int(h * BORDER)), max(1, int(w * BORDER))
    centre = brightness[:, dy : h - dy, dx : w - dx]
    border_sum = brightness.sum(axis=(1, 2)) - centre.sum(axis=(1, 2))
    border_mean = border_sum / max(1, h * w - centre[0].size)
    return (border_mean - centre.mean(axis=(1, 2))) / 255.0
