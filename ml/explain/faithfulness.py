"""Faithfulness of a map to the model: the deletion curve (Petsiuk et al., 2018, "RISE").

Pixels are hidden in the order of the map's attribution for a class, most attributed first, by
showing the blurred image there (the baseline SHAP's masker uses too), in `steps` equal steps from
nothing to everything; the curve is the model's probability of the class at each step. A map that
points at what the model uses makes the probability fall at once: the lower the area under the
curve, the more faithful the map. Both ends of the curve are the same for every map of one image
(the image, the baseline), so only the order matters.

Typical use::

    fn = probability_function(model)
    curve = deletion_curve(fn, image, values, class_index, blurred(image))
    auc = deletion_auc(curve)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ml.explain.gradcam import resize_map
from ml.explain.metrics import attribution_order

DELETION_STEPS = 16


def deletion_curve(
    model_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    values: np.ndarray,
    class_index: int,
    baseline: np.ndarray,
    steps: int = DELETION_STEPS,
    seed: int = 0,
) -> np.ndarray:
    """The class probability as the most attributed pixels are hidden, in `steps` steps.

    Args:
        model_fn: `images (N, H, W, 3) -> probabilities (N, C)`, e.g. `probability_function(model)`.
        image: (H, W, 3) image at the model's input size.
        values: 2-D map; resized to the image when its size differs.
        class_index: the class whose probability is followed.
        baseline: (H, W, 3) what a hidden pixel shows (e.g. `shap_explainer.blurred(image)`).
        steps: how many equal steps from no pixel hidden to all hidden.
        seed: tie-break seed for equal values (`metrics.attribution_order`).

    Returns:
        (steps + 1,) float64 probabilities, at 0, 1/steps, ..., 1 of the pixels hidden. All the
        images are evaluated in one model call.

    Raises:
        ValueError: for mismatched shapes, steps < 1 or a class the model does not have.
    """
    image = np.asarray(image, dtype=np.float32)
    baseline = np.asarray(baseline, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or baseline.shape != image.shape:
        raise ValueError(f"The image and baseline must be one HxWx3 shape, got {image.shape} and {baseline.shape}.")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    h, w = image.shape[:2]
    order = attribution_order(resize_map(np.asarray(values, dtype=np.float32), (h, w)), seed)
    # rank[p] = position of pixel p in the order; at step i the first round(i/steps * N) are hidden
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size)
    counts = np.round(np.linspace(0.0, 1.0, steps + 1) * order.size).astype(np.int64)
    hidden = (rank.reshape(h, w)[np.newaxis] < counts[:, np.newaxis, np.newaxis])[..., np.newaxis]
    probs = np.asarray(model_fn(np.where(hidden, baseline, image)))
    if not 0 <= class_index < probs.shape[1]:
        raise ValueError(f"Class index {class_index} is out of range for a model with {probs.shape[1]} classes.")
    return probs[:, class_index].astype(np.float64)


def deletion_auc(curve: np.ndarray) -> float:
    """Area under a deletion curve over [0, 1] of the pixels hidden (trapezoids): lower is better."""
    curve = np.asarray(curve, dtype=np.float64)
    if curve.ndim != 1 or curve.size < 2:
        raise ValueError(f"A deletion curve needs at least two points, got shape {curve.shape}.")
    return float(np.trapezoid(curve, dx=1.0 / (curve.size - 1)))
