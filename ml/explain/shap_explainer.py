"""SHAP attributions with shap's Partition explainer over regions of the image, hidden by blurring.

The Partition explainer estimates Owen values over a hierarchy of image regions: hidden regions
are replaced by a blurred copy of the image (a box blur through OpenCV), and the model is evaluated
on batches of such masked images. Two kinds of regions (`regions`):

- "superpixels" (the default): SLIC superpixels of the image, joined into a hierarchy by colour
  and adjacency (`ml.explain.superpixels`); each region's value is spread evenly over its pixels,
  so the map follows the lesion's edges. Chosen over "blocks" by the deletion curve
  (`scripts/explain_faithfulness.py`, docs/explanations.md).
- "blocks": shap's own `shap.maskers.Image("blur(kx,ky)")` partition of the pixel grid into
  axis-aligned halves; with 500 evaluations its maps show a few rectangles.

 The cost is
`max_evals` model evaluations per image, so the model function is a compiled `tf.function` with a
fixed input signature, fed batches of `batch_size` images at the model's input size, each padded
to a power of two (`bucket_sizes`): the CPU kernels are built per batch shape (0.3-1.5 s each the
first time), and shap's last batch of an image has any size.

What shap would redo for every image is done once: the masker's partition tree depends on the image
shape only and is built once per shape (2-3 s for 120x160x3), and the blurred copy of the image is
computed once per image instead of once per masked evaluation (blocks); a superpixel masker is
built per image (segmentation and tree about 0.1 s) and masks by a lookup of its region labels. The unmasked image's probabilities
can be handed in from the prediction pass (`probs`), saving that forward pass.

Typical use::

    f = probability_function(model, temperature=1.3)
    result = shap_values(f, image_at_input_size, top_k=3, max_evals=500)    # superpixel regions
    result = shap_values(f, image_at_input_size, regions="blocks")
    results = explain_shap(predictor, [uint8_rgb_image])      # maps at the original size
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import cv2
import keras
import numpy as np
import tensorflow as tf

from ml.explain.gradcam import (
    _head_logits,
    _softmax_head,
    class_indices_from_names,
    predictor_temperature,
    resize_map,
)
from ml.explain.superpixels import region_tree, superpixels

if TYPE_CHECKING:
    from ml.predictor import Predictor

# model -> {temperature: compiled function}, so a long-lived worker traces each model once.
_FUNCTION_CACHE: weakref.WeakKeyDictionary[keras.Model, dict] = weakref.WeakKeyDictionary()
# image shape -> shap's partition tree of that shape (it depends on nothing else)
_PARTITION_TREES: dict[tuple[int, ...], np.ndarray] = {}
MAX_MODEL_BATCH = 64  # the largest batch one model call gets; bigger ones are split
REGIONS = ("superpixels", "blocks")
DEFAULT_REGIONS = "superpixels"  # the more faithful by the deletion curve (docs/explanations.md)
N_SEGMENTS = 64  # superpixels per image at the model's input size


def bucket_sizes(limit: int = MAX_MODEL_BATCH) -> list[int]:
    """The batch shapes the SHAP model function runs: powers of two up to `limit` (1, 2, 4, ... 64)."""
    sizes, size = [], 1
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


def _padded(batch: np.ndarray, limit: int) -> list[tuple[np.ndarray, int]]:
    """(chunk padded to a bucket size by repeating its last image, real rows) pieces of `batch`."""
    pieces = []
    for start in range(0, len(batch), limit):
        chunk = batch[start : start + limit]
        size = next(s for s in bucket_sizes(limit) if s >= len(chunk))
        if size > len(chunk):
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
        pieces.append((chunk, min(limit, len(batch) - start)))
    return pieces


class ShapExplanation(NamedTuple):
    """SHAP values of one image for a few classes.

    Attributes:
        class_indices: (k,) int, the explained classes, most probable first (or as requested).
        values: (k, H, W) float32, per-pixel SHAP values (summed over the colour channels).
        base_values: (k,) float32, the model's output on the fully blurred image.
        probs: (C,) float32, the (calibrated) probabilities on the unmasked image.
    """

    class_indices: np.ndarray
    values: np.ndarray
    base_values: np.ndarray
    probs: np.ndarray


def probability_function(model: keras.Model, temperature: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """A compiled `images -> calibrated probabilities` function for shap.

    Args:
        model: Keras classifier taking (N, H, W, 3) float images (0-255 for our models).
        temperature: calibration temperature; probabilities are softmax(logits / temperature).

    Returns:
        A function taking (N, H, W, 3) uint8 or float images at the model's input size and returning
        an (N, C) float32 NumPy array.

    Raises:
        ValueError: if the temperature is not positive.
    """
    if not temperature > 0:
        raise ValueError(f"Temperature must be positive, got {temperature}.")
    per_model = _FUNCTION_CACHE.setdefault(model, {})
    if float(temperature) not in per_model:
        per_model[float(temperature)] = _build_probability_function(model, float(temperature))
    return per_model[float(temperature)]


def _build_probability_function(model: keras.Model, temperature: float):
    height, width = (int(d) for d in model.input_shape[1:3])
    head = _softmax_head(model)
    calibrated = float(temperature) != 1.0
    logit_model = keras.Model(model.inputs, head.input) if (calibrated and head is not None) else None

    @tf.function(input_signature=[tf.TensorSpec((None, height, width, 3), tf.float32, name="images")])
    def probabilities(images):
        if not calibrated:
            return tf.cast(model(images, training=False), tf.float32)
        if logit_model is not None:
            logits = _head_logits(head, logit_model(images, training=False))
        else:
            logits = tf.math.log(tf.cast(model(images, training=False), tf.float32) + 1e-12)
        return tf.nn.softmax(logits / temperature, axis=-1)

    def call(images: np.ndarray) -> np.ndarray:
        batch = np.asarray(images, dtype=np.float32)
        if batch.ndim == 2 and batch.shape[1] == height * width * 3:  # flattened rows
            batch = batch.reshape(-1, height, width, 3)
        if batch.ndim != 4 or batch.shape[1:] != (height, width, 3):
            raise ValueError(
                f"Images must be shaped (N, {height}, {width}, 3) for this model, got {batch.shape}; "
                "resize them to the model's input size first."
            )
        if not len(batch):
            return np.zeros((0, int(model.output.shape[-1])), np.float32)
        return np.concatenate([probabilities(tf.constant(c)).numpy()[:n] for c, n in _padded(batch, MAX_MODEL_BATCH)])

    return call


def default_blur(height: int, width: int) -> str:
    """The masker's blur kernel: a box of about a quarter of each side (shap's examples use 32 px
    on 224 px images), so a hidden region loses its fine structure but keeps its colour."""
    return f"blur({max(width // 4, 3)},{max(height // 4, 3)})"


def blur_masker(blur: str, shape: tuple[int, ...]):
    """shap's blurring Image masker for images of `shape`, its partition tree built once per shape
    and the blur computed once per image (shap 0.51 recomputes it for every masked evaluation)."""
    import shap  # slow to import (numba); only the explain path needs it

    class CachedBlurMasker(shap.maskers.Image):
        def build_partition_tree(self) -> None:
            key = tuple(int(d) for d in self.input_shape)
            if key not in _PARTITION_TREES:
                super().build_partition_tree()
                _PARTITION_TREES[key] = self.clustering
            self.clustering = _PARTITION_TREES[key]

        def __call__(self, mask, x):
            if self.blur_kernel is None:  # inpainting or a fixed value: shap's own path
                return super().__call__(mask, x)
            flat = np.asarray(x).reshape(-1)
            if getattr(self, "_blurred_of", None) is not x:  # shap passes the explained row itself each time
                self._blur_value_cache = cv2.blur(flat.reshape(self.input_shape), self.blur_kernel).reshape(-1)
                self._blurred_of = x
            if mask is None:
                mask = np.zeros(flat.size, dtype=bool)
            out = flat.copy()
            out[~mask] = self._blur_value_cache[~mask]
            return (out.reshape(1, *np.shape(x)),)

    return CachedBlurMasker(blur, shape)


def blur_kernel(blur: str) -> tuple[int, int]:
    """(kx, ky) of a masker spec "blur(kx,ky)".

    Raises:
        ValueError: for any other spec.
    """
    import re

    match = re.fullmatch(r"\s*blur\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*", blur)
    if not match:
        raise ValueError(f"The blur must read 'blur(kx,ky)' with kernel sizes in pixels, got {blur!r}.")
    return int(match[1]), int(match[2])


def blurred(image: np.ndarray, blur: str | None = None) -> np.ndarray:
    """The float32 image every hidden region shows: a box blur (`default_blur` unless given)."""
    image = np.asarray(image, dtype=np.float32)
    return cv2.blur(image, blur_kernel(blur or default_blur(*image.shape[:2])))


def region_masker(image: np.ndarray, blur: str, n_segments: int = N_SEGMENTS):
    """A shap masker whose features are the image's superpixels (`ml.explain.superpixels`):
    a mask keeps the regions it marks and shows the blurred image elsewhere.

    shap explains a row of zeros, one per region (`masker.row`); the masker holds the image.
    `masker.to_pixels` spreads each region's value evenly over its pixels (sums unchanged).
    """
    import shap  # slow to import (numba); only the explain path needs it

    image = np.asarray(image, dtype=np.float32)
    labels = superpixels(image, n_segments)
    sizes = np.bincount(labels.ravel()).astype(np.float32)

    class RegionMasker(shap.maskers.Masker):
        immutable_outputs = True  # each call returns a new array: shap need not copy it

        def __init__(self):
            self.shape = (1, len(sizes))
            self.clustering = region_tree(image, labels)
            self.row = np.zeros((1, len(sizes)), np.float32)
            self._baseline = blurred(image, blur)

        def __call__(self, mask, x):
            keep = np.asarray(mask, dtype=bool)[labels][..., np.newaxis]
            return (np.where(keep, image, self._baseline)[np.newaxis],)

        def to_pixels(self, values: np.ndarray) -> np.ndarray:
            """(K, k) region values -> (k, H, W) per-pixel values."""
            return np.moveaxis((values / sizes[:, np.newaxis])[labels], -1, 0)

    return RegionMasker()


def _top_classes(probs: np.ndarray, top_k: int, class_indices) -> np.ndarray:
    if class_indices is not None:
        chosen = np.atleast_1d(np.asarray(class_indices, dtype=np.int64))
        bad = chosen[(chosen < 0) | (chosen >= probs.size)]
        if bad.size:
            raise ValueError(f"Class index {int(bad[0])} is out of range for a model with {probs.size} classes.")
        return chosen
    if not 1 <= top_k <= probs.size:
        raise ValueError(f"top_k must be between 1 and the number of classes ({probs.size}), got {top_k}.")
    return np.argsort(-probs, kind="stable")[:top_k]


def _check_shap_args(image: np.ndarray, max_evals: int, batch_size: int) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"The image must be an HxWx3 RGB array at the model's input size, got {image.shape}.")
    if max_evals < 10:
        raise ValueError(f"max_evals must be at least 10 for a meaningful partition, got {max_evals}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")


def shap_values(
    model_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    top_k: int = 3,
    max_evals: int = 500,
    batch_size: int = 64,
    class_indices: Sequence[int] | None = None,
    blur: str | None = None,
    seed: int | None = 0,
    probs: np.ndarray | None = None,
    regions: str = DEFAULT_REGIONS,
    n_segments: int = N_SEGMENTS,
) -> ShapExplanation:
    """Partition-SHAP values of one image for its top-k classes.

    Args:
        model_fn: `images (N, H, W, 3) -> probabilities (N, C)`, e.g. `probability_function(model)`.
        image: (H, W, 3) uint8 or float image at the model's input size.
        top_k: how many of the most probable classes to explain (ignored if class_indices given).
        max_evals: model evaluations spent on the explanation (time grows linearly with it).
        batch_size: masked images per model call.
        class_indices: explicit classes to explain instead of the top k.
        blur: shap masker spec such as "blur(32,32)"; None picks `default_blur`.
        seed: seeds NumPy's global generator for shap's tie-breaking (restored afterwards), so
            results repeat; None leaves it alone.
        probs: the (C,) probabilities `model_fn` gives the unmasked image, when the caller has them
            (the prediction pass): saves one forward pass.
        regions: "superpixels" or "blocks" (see the module docstring).
        n_segments: about how many superpixels (regions="superpixels").

    Returns:
        A `ShapExplanation` with (k, H, W) values summed over the colour channels.

    Raises:
        ValueError: for a non-RGB image, too few evaluations, out-of-range classes or unknown regions.
    """
    import shap  # slow to import (numba); only the explain path needs it

    image = np.asarray(image, dtype=np.float32)
    _check_shap_args(image, max_evals, batch_size)
    if regions not in REGIONS:
        raise ValueError(f"regions must be one of {', '.join(REGIONS)}, got {regions!r}.")
    probs = np.asarray(model_fn(image[np.newaxis]))[0] if probs is None else np.asarray(probs, np.float32)
    chosen = _top_classes(probs, top_k, class_indices)
    blur = blur or default_blur(*image.shape[:2])
    if regions == "blocks":
        masker, row = blur_masker(blur, image.shape), image[np.newaxis]
        to_pixels = lambda v: np.moveaxis(v.sum(axis=2), -1, 0)  # noqa: E731  (H, W, 3, k) -> (k, H, W)
    else:
        masker = region_masker(image, blur, n_segments)
        row, to_pixels = masker.row, masker.to_pixels
    explainer = shap.PartitionExplainer(model_fn, masker)
    state = np.random.get_state()
    if seed is not None:
        np.random.seed(seed)
    try:
        explanation = explainer(row, max_evals=max_evals, batch_size=batch_size, outputs=chosen, silent=True)
    finally:
        np.random.set_state(state)
    values = to_pixels(np.asarray(explanation.values[0])).astype(np.float32)
    base = np.atleast_1d(np.asarray(explanation.base_values[0], dtype=np.float32))
    return ShapExplanation(chosen, values, base, probs.astype(np.float32))


def resize_values(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize per-pixel SHAP values to `size` = (H, W), scaled so that their sum is unchanged
    (each pixel's share of the additive attribution is spread over the pixels it becomes)."""
    h0, w0 = values.shape
    h, w = size
    return resize_map(values, size) * np.float32((h0 * w0) / (h * w))


def explain_shap(
    predictor: Predictor,
    images: Sequence[np.ndarray],
    top_k: int = 3,
    max_evals: int = 500,
    batch_size: int = 64,
    class_names: str | Sequence[str | None] | None = None,
    blur: str | None = None,
    regions: str = DEFAULT_REGIONS,
) -> list[ShapExplanation]:
    """Calibrated SHAP explanations of uint8 images, with maps at each image's original size.

    Args:
        predictor: an `ml.Predictor` (uses `.model`, `.preprocess`, `.class_names` and its
            temperature, `.temperature` or `.manifest['temperature']`).
        images: list of HxWx3 uint8 RGB arrays of any size.
        top_k: how many of the most probable classes to explain.
        max_evals: model evaluations per image.
        batch_size: masked images per model call.
        class_names: None for the top k, one class name for all images, or one name per image.
        blur: shap masker spec; None picks `default_blur` for the model's input size.
        regions: "superpixels" or "blocks" (see the module docstring).

    Returns:
        One `ShapExplanation` per image; values are (k, H0, W0) at the image's own size, their sum
        kept equal to the sum at the model's input size.

    Raises:
        ValueError: for an empty list, unknown class names or bad evaluation settings.
    """
    if len(images) == 0:
        raise ValueError("explain_shap needs at least one image.")
    requested = class_indices_from_names(predictor.class_names, class_names, len(images))
    model_fn = probability_function(predictor.model, predictor_temperature(predictor))
    results = []
    for i, image in enumerate(images):
        chosen = None if requested is None or requested[i] < 0 else [requested[i]]
        result = shap_values(
            model_fn,
            predictor.preprocess(image),
            top_k,
            max_evals,
            batch_size,
            class_indices=chosen,
            blur=blur,
            regions=regions,
        )
        resized = np.stack([resize_values(v, np.shape(image)[:2]) for v in result.values])
        results.append(result._replace(values=resized))
    return results
