"""Metrics against scikit-learn, the focal loss against a hand computation, calibration."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn import metrics as skm

from ml import calibration as C
from ml import metrics as M


@pytest.fixture(scope="module")
def predictions():
    """2000 images, 7 classes, calibrated by construction: each label is drawn from its probabilities."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2000, 7))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(7, p=p) for p in probs])
    return y, probs


def test_classification_metrics_match_scikit_learn(predictions):
    y, probs = predictions
    m = M.classification_metrics(y, probs)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["nll"] == pytest.approx(skm.log_loss(y, probs))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    mel = m["per_class"]["mel"]
    assert mel["precision"] == pytest.approx(skm.precision_score(y == 4, pred == 4))
    assert mel["recall"] == pytest.approx(skm.recall_score(y == 4, pred == 4))
    assert mel["roc_auc"] == pytest.approx(skm.roc_auc_score(y == 4, probs[:, 4]))
    assert mel["pr_auc"] == pytest.approx(skm.average_precision_score(y == 4, probs[:, 4]))
    assert mel["support"] == int((y == 4).sum())


def test_metrics_of_an_absent_class_are_none_not_nan():
    y = np.array([0, 1, 0, 1])
    probs = np.tile([0.6, 0.3, 0.1, 0, 0, 0, 0], (4, 1))
    m = M.classification_metrics(y, probs)
    assert m["per_class"]["vasc"]["roc_auc"] is None
    assert m["macro_auc"] == pytest.approx(np.mean([0.5, 0.5]))


def test_ece_by_hand():
    # Two bins used: confidence 0.9 (2 images, 1 right) and 0.6 (2 images, 2 right).
    y = np.array([0, 1, 0, 0])
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert M.expected_calibration_error(y, probs, n_bins=10) == pytest.approx(expected)


def test_sensitivity_at_specificity_and_threshold_rules():
    y = np.array([0] * 10 + [1] * 10).astype(bool)
    score = np.concatenate([np.linspace(0, 0.5, 10), np.linspace(0.3, 1.0, 10)])
    sens = M.sensitivity_at_specificity(y, score, 0.8)
    threshold = C.threshold_for_specificity(y, score, 0.8)
    point = M.binary_at_threshold(y, score, threshold)
    assert point["specificity"] >= 0.8
    assert point["sensitivity"] == pytest.approx(sens)
    youden = M.binary_at_threshold(y, score, C.youden_threshold(y, score))
    fpr, tpr, _ = skm.roc_curve(y, score)
    assert youden["sensitivity"] + youden["specificity"] - 1 == pytest.approx((tpr - fpr).max())
    target = M.binary_at_threshold(y, score, C.threshold_for_sensitivity(y, score, 0.9))
    assert target["sensitivity"] >= 0.9


def test_bootstrap_by_lesion_brackets_the_estimate(predictions):
    y, probs = predictions
    lesions = np.arange(len(y)) // 2
    ci = M.bootstrap_ci(M.balanced_accuracy_of_probs, y, probs, lesions, n_boot=200, seed=1)
    assert ci["low"] < ci["estimate"] < ci["high"]
    assert ci["n_boot"] == 200 and ci["high"] - ci["low"] < 0.1


def test_malignancy_score_sums_malignant_classes():
    probs = np.array([[0.1, 0.2, 0.05, 0.05, 0.3, 0.2, 0.1]])
    assert M.malignancy_score(probs)[0] == pytest.approx(0.1 + 0.2 + 0.3)


def test_focal_loss_matches_hand_computation():
    alpha = [0.5, 1.0, 2.0]
    gamma = 2.0
    y = np.array([[0, 1, 0], [0, 0, 1]], np.float32)
    p = np.array([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]], np.float32)
    loss = keras.losses.CategoricalFocalCrossentropy(alpha=alpha, gamma=gamma, reduction=None)
    expected = [
        -1.0 * (1 - 0.7) ** gamma * np.log(0.7),
        -2.0 * (1 - 0.4) ** gamma * np.log(0.4),
    ]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loss(y, p)), expected, rtol=1e-5)


def test_cross_entropy_is_focal_loss_with_gamma_zero():
    from types import SimpleNamespace

    from ml.train import make_loss

    args = SimpleNamespace(balance="class_weight", loss="ce", gamma=2.0, label_smoothing=0.0)
    loss = make_loss(args, np.array([1.0, 3.0, 1.0]))
    y = np.array([[0, 1, 0]], np.float32)
    p = np.array([[0.2, 0.5, 0.3]], np.float32)
    assert float(keras.ops.convert_to_numpy(loss(y, p))) == pytest.approx(-3.0 * np.log(0.5), rel=1e-5)


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_set(predictions):
    y, probs = predictions
    overconfident = C.apply_temperature(probs, 1 / 3)  # sharpen: logits x3
    fit = C.fit_temperature(y, overconfident)
    assert fit["temperature"] == pytest.approx(3.0, rel=0.05)
    assert fit["nll_after"] < fit["nll_before"]
    calibrated = C.apply_temperature(overconfident, fit["temperature"])
    assert M.negative_log_likelihood(y, calibrated) == pytest.approx(fit["nll_after"], rel=1e-4)
    assert M.expected_calibration_error(y, calibrated) < M.expected_calibration_error(y, overconfident)
    np.testing.assert_array_equal(calibrated.argmax(1), overconfident.argmax(1))


def test_temperature_scaling_rejects_bad_input():
    with pytest.raises(ValueError, match="Temperature must be positive"):
        C.apply_temperature(np.ones((1, 3)) / 3, 0.0)
    with pytest.raises(ValueError, match="needs \\(N, C\\) probabilities for N > 0 labels"):
        C.fit_temperature([], np.zeros((0, 3)))


def test_thresholds_are_fitted_on_validation(predictions):
    y, probs = predictions
    t = C.fit_thresholds(y, probs)
    assert 0 < t["malignant"] < 1 and 0 < t["melanoma"] < 1
    mel_point = M.binary_at_threshold(y == 4, probs[:, 4], t["melanoma"])
    assert mel_point["specificity"] >= 0.8
    with pytest.raises(ValueError, match="needs both positive and negative"):
        C.fit_thresholds(np.zeros(5, int), probs[:5])
