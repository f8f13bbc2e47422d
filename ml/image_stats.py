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


def statistics(images: Sequence[np.ndarray] | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, len(NAMES)) float32 statistics of N RGB images in 0-255, each first brought to `size`
    (H, W), the model's input size, by the model's own resize (`ml.data.resize_image`) when it is
    another size: the statistics of the array the network sees, whatever the upload's size.

    Raises:
        ValueError: for an image that is not HxWx3 uint8 and not already at `size`.
    """
    return np.array([_one(_at_size(image, size)) for image in images], np.float32).reshape(-1, len(NAMES))


def _at_size(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = np.asarray(image)
    if image.shape != (*size, 3):
        from ml.data import resize_image  # ml.data loads the model code: only when needed

        image = resize_image(image, size)
    return image.astype(np.float32)


def _one(image: np.ndarray) -> list[float]:
    """The NAMES of one float32 (H, W, 3) image."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    # Elementwise over the three planes: the same values as max/min over axis 2, which numpy
    # reduces pixel by pixel (about 20 times slower on a (H, W, 3) array).
    brightest, darkest = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    chroma = brightest - darkest
    brightness = 0.299 * r + 0.587 * g + 0.114 * b
    return [
        float((chroma / (brightest + 1.0)).mean()),
        float((chroma < GREY_CHROMA).mean()),
        _hue_spread(image, chroma),
        float(((r > g) & (g > b) & (r - b > 20)).mean()),
        *_texture(brightness),
        float(np.log(_distinct(_quantised(image)))),
        _centre_darkening(brightness),
        float(brightness.std() / 255.0),
        float(((brightness > 235) & (chroma < 20)).mean()),
        float((brightness < 15).mean()),
    ]


def _hue_spread(image: np.ndarray, chroma: np.ndarray) -> float:
    """Circular variance of the hue, each pixel weighted by its chroma (0: one hue, 1: all hues)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    # The hue angle from the opponent axes (the same angle HSV's hue approximates).
    angle = np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)
    weight = chroma.sum()
    if weight < 1e-6:
        return 0.0
    resultant = np.hypot((chroma * np.cos(angle)).sum(), (chroma * np.sin(angle)).sum()) / weight
    return float(1.0 - resultant)


def _texture(brightness: np.ndarray) -> list[float]:
    """(strong-edge share, log high-frequency energy, flat share) of the brightness."""
    gx = cv2.Sobel(brightness, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(brightness, cv2.CV_32F, 0, 1, ksize=3)
    detail = np.abs(brightness - cv2.GaussianBlur(brightness, (0, 0), 1.5))
    kernel = np.ones((3, 3), np.uint8)
    local_range = cv2.dilate(brightness, kernel) - cv2.erode(brightness, kernel)
    return [
        float((np.hypot(gx, gy) > EDGE_GRADIENT).mean()),
        float(np.log1p(detail.mean())),
        float((local_range < FLAT_RANGE).mean()),
    ]


def _quantised(image: np.ndarray) -> np.ndarray:
    """Each pixel's colour at 4 bits per channel, as one integer."""
    q = np.clip(image, 0, 255).astype(np.int32) >> 4
    return (q[..., 0] << 8) | (q[..., 1] << 4) | q[..., 2]


def _distinct(codes: np.ndarray) -> int:
    """How many distinct 12-bit colour codes there are (a histogram: no sort, unlike np.unique)."""
    return int(np.count_nonzero(np.bincount(codes.ravel(), minlength=4096)))


def _centre_darkening(brightness: np.ndarray) -> float:
    """Mean brightness of the border ring minus that of the centre, over 255."""
    h, w = brightness.shape
    dy, dx = max(1, int(h * BORDER)), max(1, int(w * BORDER))
    centre = brightness[dy : h - dy, dx : w - dx]
    border_sum = brightness.sum() - centre.sum()
    border_mean = border_sum / max(1, brightness.size - centre.size)
    return float((border_mean - centre.mean()) / 255.0)
