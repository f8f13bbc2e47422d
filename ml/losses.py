"""Training losses written with `keras.ops`, so that they run on every Keras backend."""

from __future__ import annotations

import keras
import numpy as np

from ml.model import Tensor


class LogitAdjustedCrossentropy(keras.losses.Loss):
    """Cross-entropy of softmax(log p + tau log prior) against label-smoothed targets.

    Logit adjustment (Menon et al., 2021) makes the network's own softmax the class-balanced
    posterior: rare classes are not drowned by the frequent ones, and no class weights are needed.
    The model outputs probabilities; log p differs from its logits only by a per-row constant,
    which the softmax removes, so adjusting log p is adjusting the logits.
    """

    def __init__(self, class_prior, tau: float = 1.0, label_smoothing: float = 0.0, name: str = "logit_adjusted_loss"):
        super().__init__(name=name)
        prior = np.asarray(class_prior, dtype=np.float64)
        if prior.ndim != 1 or (prior < 0).any() or prior.sum() <= 0:
            raise ValueError(f"The class prior must be non-negative counts or frequencies, got {prior}.")
        self.log_prior = np.log(np.clip(prior / prior.sum(), 1e-8, 1.0)).astype(np.float32)
        self.tau, self.label_smoothing = float(tau), float(label_smoothing)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        ops = keras.ops
        logits = ops.log(ops.clip(ops.cast(y_pred, "float32"), 1e-7, 1.0)) + self.tau * self.log_prior
        k = float(self.log_prior.shape[0])
        target = ops.cast(y_true, "float32") * (1.0 - self.label_smoothing) + self.label_smoothing / k
        return -ops.sum(target * ops.log_softmax(logits, axis=-1), axis=-1)
