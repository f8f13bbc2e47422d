"""Temperature scaling and decision thresholds, both fitted on the validation split only.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T > 0 chosen to minimise
the validation negative log-likelihood; it changes confidences, never the argmax. The model
outputs softmax probabilities, and log p differs from the logits only by a per-row constant,
so softmax(log p / T) is exactly softmax(logits / T).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from sklearn.metrics import roc_curve

from ml.metrics import malignancy_score
from ml.model import CLASS_NAMES, MALIGNANT_CLASSES

# T outside [e^-3, e^3] ~ [0.05, 20] means a broken model or a tiny validation set, not calibration.
LOG_T_BOUNDS = (-3.0, 3.0)
MELANOMA_SPECIFICITY = 0.80


def calibrated_softmax(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) over the last axis, as float32: the one calibrated softmax of the project.

    Raises:
        ValueError: if the temperature is not positive.
    """
    if not temperature > 0:
        raise ValueError(f"Temperature must be positive, got {temperature}.")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    exp = np.exp(z)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def apply_temperature(probs: ArrayLike, temperature: float, eps: float = 1e-12) -> np.ndarray:
    """softmax(log p / T), row by row, as float32 (log p are the logits up to a per-row constant).

    Raises:
        ValueError: if the temperature is not positive.
    """
    return calibrated_softmax(np.log(np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0)), temperature)


def _nll(log_probs: np.ndarray, y_true: np.ndarray, temperature: float) -> float:
    z = log_probs / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_softmax[np.arange(len(y_true)), y_true].mean())


def fit_temperature(y_true: ArrayLike, probs: ArrayLike, eps: float = 1e-12) -> dict:
    """Finds the temperature minimising the NLL of `probs` (bounded search over log T).

    Args:
        y_true: (N,) integer labels of the validation images.
        probs: (N, C) uncalibrated probabilities of the same images.

    Returns:
        dict with temperature, nll_before and nll_after.

    Raises:
        ValueError: for an empty set or mismatched shapes.
    """
    y_true = np.asarray(y_true).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(y_true) == 0 or probs.shape != (len(y_true), probs.shape[-1]):
        raise ValueError(f"Temperature scaling needs (N, C) probabilities for N > 0 labels, got {probs.shape}.")
    log_probs = np.log(np.clip(probs, eps, 1.0))
    result = minimize_scalar(
        lambda log_t: _nll(log_probs, y_true, np.exp(log_t)), bounds=LOG_T_BOUNDS, method="bounded"
    )
    temperature = float(np.exp(result.x))
    before, after = _nll(log_probs, y_true, 1.0), _nll(log_probs, y_true, temperature)
    if after > before:  # the bounded search can only miss by numerical noise; never make it worse
        temperature, after = 1.0, before
    return {"temperature": temperature, "nll_before": before, "nll_after": after}


def youden_threshold(y_bin: ArrayLike, score: ArrayLike) -> float:
    """The threshold maximising sensitivity + specificity - 1 on the ROC curve."""
    fpr, tpr, thresholds = _roc(y_bin, score)
    best = int(np.argmax(tpr - fpr))
    return _finite_threshold(thresholds[best], score)


def threshold_for_sensitivity(y_bin: ArrayLike, score: ArrayLike, sensitivity: float) -> float:
    """The highest threshold whose sensitivity reaches `sensitivity` (so the best specificity)."""
    fpr, tpr, thresholds = _roc(y_bin, score)
    best = int(np.argmax(tpr >= sensitivity - 1e-12))
    return _finite_threshold(thresholds[best], score)


def threshold_for_specificity(y_bin: ArrayLike, score: ArrayLike, specificity: float) -> float:
    """The lowest threshold whose specificity is at least `specificity` (so the best sensitivity)."""
    fpr, tpr, thresholds = _roc(y_bin, score)
    ok = np.flatnonzero(fpr <= 1.0 - specificity + 1e-12)
    return _finite_threshold(thresholds[ok[-1]], score)


def _roc(y_bin, score):
    y_bin = np.asarray(y_bin).astype(bool)
    if y_bin.all() or not y_bin.any():
        raise ValueError("A decision threshold needs both positive and negative validation images.")
    return roc_curve(y_bin, score)


def _finite_threshold(threshold: float, score) -> float:
    # roc_curve's first threshold is +inf ("nobody positive"); store something JSON can hold.
    return float(threshold) if np.isfinite(threshold) else float(np.max(score)) + 1e-6


def fit_thresholds(
    y_true: ArrayLike,
    probs: ArrayLike,
    class_names: Sequence[str] = CLASS_NAMES,
    malignant_classes: Sequence[str] = MALIGNANT_CLASSES,
    malignant_sensitivity: float | None = None,
    melanoma_specificity: float = MELANOMA_SPECIFICITY,
) -> dict:
    """Chooses the benign/malignant and the melanoma thresholds on (calibrated) validation output.

    Args:
        y_true: (N,) integer labels.
        probs: (N, C) calibrated probabilities.
        class_names, malignant_classes: class order and which classes count as malignant.
        malignant_sensitivity: if given, the malignant threshold reaches this sensitivity;
            otherwise it maximises Youden's J.
        melanoma_specificity: the melanoma operating point's specificity on validation.

    Returns:
        dict with malignant, melanoma (thresholds on P(akiec)+P(bcc)+P(mel) and on P(mel)) and
        the rules that produced them.

    Raises:
        ValueError: if validation lacks malignant/benign or melanoma/other images.
    """
    y_true = np.asarray(y_true)
    malignant_idx = [list(class_names).index(c) for c in malignant_classes]
    mel = list(class_names).index("mel")
    p_malignant = malignancy_score(probs, class_names, malignant_classes)
    is_malignant = np.isin(y_true, malignant_idx)
    if malignant_sensitivity is None:
        malignant = youden_threshold(is_malignant, p_malignant)
        rule = "youden"
    else:
        malignant = threshold_for_sensitivity(is_malignant, p_malignant, malignant_sensitivity)
        rule = f"sensitivity>={malignant_sensitivity}"
    melanoma = threshold_for_specificity(y_true == mel, np.asarray(probs)[:, mel], melanoma_specificity)
    return {
        "malignant": malignant,
        "melanoma": melanoma,
        "rules": {"malignant": rule, "melanoma": f"specificity>={melanoma_specificity}"},
    }
