"""Classification, calibration and operating-point metrics; every public function returns a dict
or a number (timm habit), computed with NumPy and scikit-learn on probability arrays.

Conventions: `y_true` holds integer class indices, `probs` is (N, C) rows summing to one, class
order is `class_names`. Metrics that are undefined (an AUC for a class without positives) are
`None` in the dicts, so that they survive JSON; macro averages skip them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn import metrics as skm

from ml.model import CLASS_NAMES, MALIGNANT_CLASSES

# A `bootstrap_ci` statistic: (labels, probabilities) -> a number, or None where it is undefined.
Statistic = Callable[[ArrayLike, ArrayLike], float | None]


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _check_inputs(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y_true):
        raise ValueError(f"Expected probabilities of shape (N, C) for {len(y_true)} labels, got {probs.shape}.")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= probs.shape[1]):
        raise ValueError(f"Labels must be class indices in [0, {probs.shape[1]}), got {y_true.min()}..{y_true.max()}.")
    return y_true, probs


def binary_auc(y_bin: ArrayLike, score: ArrayLike) -> float | None:
    """ROC AUC, or None when only one class is present."""
    y_bin = np.asarray(y_bin).astype(bool)
    if y_bin.all() or not y_bin.any():
        return None
    return float(skm.roc_auc_score(y_bin, score))


def binary_average_precision(y_bin: ArrayLike, score: ArrayLike) -> float | None:
    """Area under the precision-recall curve (average precision), None without positives."""
    y_bin = np.asarray(y_bin).astype(bool)
    if not y_bin.any():
        return None
    return float(skm.average_precision_score(y_bin, score))


def macro_auc(y_true: ArrayLike, probs: ArrayLike) -> float | None:
    """Mean one-vs-rest ROC AUC over the classes for which it is defined."""
    y_true, probs = _check_inputs(y_true, probs)
    aucs = [binary_auc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else None


def balanced_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean recall over the classes present in `y_true`."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    return float(np.mean(recalls)) if recalls else float("nan")


def argmax_decision(probs: ArrayLike) -> np.ndarray:
    return np.asarray(probs).argmax(axis=-1)


def classification_metrics(
    y_true: ArrayLike,
    probs: ArrayLike,
    class_names: Sequence[str] = CLASS_NAMES,
    decide: Callable[[np.ndarray], np.ndarray] = argmax_decision,
) -> dict:
    """Accuracy, balanced accuracy, macro F1, macro AUC, confusion matrix and per-class scores.

    Args:
        y_true: (N,) integer labels.
        probs: (N, C) probabilities (the AUCs rank them).
        class_names: names for the per-class entries.
        decide: probabilities -> predicted class indices (the served decision; default argmax),
            which every count-based figure (accuracy, recall, F1, confusion matrix) is of.

    Returns:
        dict with accuracy, balanced_accuracy, macro_f1, macro_auc, nll, confusion_matrix
        (rows true, columns predicted) and per_class {name: precision, recall, f1, support,
        roc_auc, pr_auc}.
    """
    y_true, probs = _check_inputs(y_true, probs)
    y_pred = np.asarray(decide(probs))
    labels = list(range(probs.shape[1]))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = support > 0
    per_class = {
        name: {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
            "roc_auc": binary_auc(y_true == c, probs[:, c]),
            "pr_auc": binary_average_precision(y_true == c, probs[:, c]),
        }
        for c, name in enumerate(class_names)
    }
    return {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(y_pred == y_true)) if len(y_true) else None,
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        # Macro F1 over the classes that occur, as scikit-learn's f1_score(average="macro") on them.
        "macro_f1": float(np.mean(f1[present])) if present.any() else None,
        "macro_auc": macro_auc(y_true, probs),
        "nll": negative_log_likelihood(y_true, probs),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "per_class": per_class,
    }


def negative_log_likelihood(y_true: ArrayLike, probs: ArrayLike, eps: float = 1e-12) -> float:
    """Mean -log p(true class)."""
    y_true, probs = _check_inputs(y_true, probs)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], eps, 1.0))))


def reliability_bins(y_true: ArrayLike, probs: ArrayLike, n_bins: int = 15) -> dict:
    """Top-label confidence vs accuracy in equal-width confidence bins.

    Returns:
        dict with edges (n_bins+1), confidence, accuracy (None for empty bins) and count per bin.
    """
    y_true, probs = _check_inputs(y_true, probs)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins so that a confidence of exactly 1.0 lands in the last bin.
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    conf, acc, count = [], [], []
    for b in range(n_bins):
        mask = which == b
        count.append(int(mask.sum()))
        conf.append(float(confidence[mask].mean()) if mask.any() else None)
        acc.append(float(correct[mask].mean()) if mask.any() else None)
    return {"edges": edges.tolist(), "confidence": conf, "accuracy": acc, "count": count}


def expected_calibration_error(y_true: ArrayLike, probs: ArrayLike, n_bins: int = 15) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over the reliability bins."""
    bins = reliability_bins(y_true, probs, n_bins)
    total = sum(bins["count"])
    if not total:
        return float("nan")
    return float(
        sum(n * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]) if n) / total
    )


def malignancy_score(
    probs: ArrayLike, class_names: Sequence[str] = CLASS_NAMES, malignant_classes: Sequence[str] = MALIGNANT_CLASSES
) -> np.ndarray:
    """P(malignant) = the summed probability of the malignant classes."""
    idx = [list(class_names).index(c) for c in malignant_classes]
    return np.asarray(probs)[:, idx].sum(axis=1)


def sensitivity_at_specificity(y_bin: ArrayLike, score: ArrayLike, specificity: float = 0.8) -> float | None:
    """The highest sensitivity on the ROC curve whose specificity is at least `specificity`."""
    y_bin = np.asarray(y_bin).astype(bool)
    if y_bin.all() or not y_bin.any():
        return None
    fpr, tpr, _ = skm.roc_curve(y_bin, score)
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def binary_at_threshold(y_bin: ArrayLike, score: ArrayLike, threshold: float) -> dict:
    """Sensitivity, specificity, PPV and NPV of the rule `score >= threshold`."""
    y_bin = np.asarray(y_bin).astype(bool)
    positive = np.asarray(score) >= threshold
    tp, fn = int((positive & y_bin).sum()), int((~positive & y_bin).sum())
    tn, fp = int((~positive & ~y_bin).sum()), int((positive & ~y_bin).sum())

    def ratio(a, b):
        return a / (a + b) if a + b else None

    return {
        "threshold": float(threshold),
        "sensitivity": ratio(tp, fn),
        "specificity": ratio(tn, fp),
        "ppv": ratio(tp, fp),
        "npv": ratio(tn, fn),
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
    }


def bootstrap_ci(
    statistic: Statistic,
    y_true: ArrayLike,
    probs: ArrayLike,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Percentile bootstrap interval of `statistic(y_true, probs)`, resampling groups (lesions).

    Images of one lesion are correlated, so whole lesions are drawn with replacement when
    `groups` is given; otherwise single images.

    Returns:
        dict with estimate, low, high, level, n_boot (replicates where the statistic was defined).
    """
    y_true, probs = _check_inputs(y_true, probs)
    groups = np.arange(len(y_true)) if groups is None else np.asarray(groups)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(unique), len(unique))
        idx = np.concatenate([members[g] for g in drawn])
        value = statistic(y_true[idx], probs[idx])
        if value is not None and math.isfinite(value):
            values.append(value)
    estimate = statistic(y_true, probs)
    if not values:
        return {"estimate": estimate, "low": None, "high": None, "level": level, "n_boot": 0}
    alpha = (1.0 - level) / 2.0
    return {
        "estimate": None if estimate is None else float(estimate),
        "low": float(np.quantile(values, alpha)),
        "high": float(np.quantile(values, 1.0 - alpha)),
        "level": level,
        "n_boot": len(values),
    }


def balanced_accuracy_of_probs(y_true: ArrayLike, probs: ArrayLike) -> float:
    """Balanced accuracy of the argmax prediction (a `bootstrap_ci` statistic)."""
    return balanced_accuracy(y_true, np.asarray(probs).argmax(axis=1))


def balanced_accuracy_statistic(decide: Callable[[np.ndarray], np.ndarray] = argmax_decision) -> Statistic:
    """A `bootstrap_ci` statistic: balanced accuracy of the decision `decide` (probabilities -> indices)."""

    def statistic(y_true, probs):
        return balanced_accuracy(y_true, decide(np.asarray(probs)))

    return statistic


def recall_statistic(class_index: int, decide: Callable[[np.ndarray], np.ndarray] = argmax_decision) -> Statistic:
    """A `bootstrap_ci` statistic: the recall of one class under the decision `decide`."""

    def statistic(y_true, probs):
        y_true = np.asarray(y_true)
        positives = y_true == class_index
        if not positives.any():
            return None
        return float(np.mean(decide(np.asarray(probs))[positives] == class_index))

    return statistic


def melanoma_sensitivity_statistic(specificity: float = 0.8, class_names: Sequence[str] = CLASS_NAMES) -> Statistic:
    """A `bootstrap_ci` statistic: melanoma sensitivity at a fixed specificity."""
    mel = list(class_names).index("mel")

    def statistic(y_true, probs):
        return sensitivity_at_specificity(np.asarray(y_true) == mel, np.asarray(probs)[:, mel], specificity)

    return statistic
