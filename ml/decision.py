"""The served decision: which class the portal names as the top class of an image.

The probabilities shown are calibrated posteriors under HAM10000's class frequencies, where nevi
are 68 % of the images: their argmax rarely names a rare class. The top class is instead chosen by
logit adjustment (Menon et al., 2021): argmax over classes of log p_c - tau log prior_c, where the
prior is the class frequency of the training split. tau = 0 is the plain argmax; tau = 1 treats
every class as equally likely before the image is seen. tau is chosen on the validation split by
balanced accuracy (never on test) and travels in the artifact's manifest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ml.metrics import balanced_accuracy

TAU_GRID = tuple(round(t, 2) for t in np.arange(0.0, 1.51, 0.05))


@dataclass(frozen=True)
class Decision:
    """Logit-adjusted argmax; with `tau == 0` or no prior it is the plain argmax."""

    tau: float = 0.0
    class_prior: tuple[float, ...] | None = None

    def choose(self, probs: np.ndarray, eps: float = 1e-12) -> np.ndarray:
        """The chosen class index of each row of (N, C) probabilities."""
        probs = np.asarray(probs, dtype=np.float64)
        if not self.tau or self.class_prior is None:
            return probs.argmax(axis=-1)
        log_prior = np.log(np.clip(np.asarray(self.class_prior, dtype=np.float64), eps, 1.0))
        if log_prior.shape[-1] != probs.shape[-1]:
            raise ValueError(
                f"The decision's prior has {log_prior.shape[-1]} classes, the probabilities {probs.shape[-1]}."
            )
        return (np.log(np.clip(probs, eps, 1.0)) - self.tau * log_prior).argmax(axis=-1)

    def offsets_for_raw(self, temperature: float, num_classes: int) -> np.ndarray:
        """Per-class offsets that make argmax(log p_raw + offsets) this decision on uncalibrated output.

        Calibrated log p is log p_raw / T up to a per-row constant, so the offsets are -T tau log prior.
        """
        if not self.tau or self.class_prior is None:
            return np.zeros(num_classes, np.float32)
        log_prior = np.log(np.clip(np.asarray(self.class_prior, dtype=np.float64), 1e-12, 1.0))
        return (-float(temperature) * self.tau * log_prior).astype(np.float32)

    @property
    def description(self) -> str:
        """One plain sentence for pages, API and exports."""
        if not self.tau or self.class_prior is None:
            return "The top class is the class with the highest probability."
        return (
            "The top class is the class with the highest probability after each probability is divided by "
            f"that class's share of the training images to the power {self.tau:g} (chosen on validation), "
            "so that rare diagnoses such as melanoma are not outvoted by common ones; the probabilities "
            "shown are not changed by this."
        )

    def to_manifest(self) -> dict:
        return {
            "rule": "logit_adjusted_argmax" if self.tau else "argmax",
            "tau": float(self.tau),
            "class_prior": None if self.class_prior is None else [float(p) for p in self.class_prior],
            "description": self.description,
        }

    @classmethod
    def from_manifest(cls, manifest: dict) -> Decision:
        """The manifest's decision; artifacts without one use the plain argmax."""
        decision = manifest.get("decision") or {}
        prior = decision.get("class_prior")
        return cls(float(decision.get("tau", 0.0)), None if prior is None else tuple(float(p) for p in prior))


def class_prior(labels: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """Class frequencies of integer labels (the training split's), as a tuple that sums to 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    if counts.sum() == 0:
        raise ValueError("A class prior needs at least one label.")
    return tuple(float(c) for c in counts / counts.sum())


def fit_decision(
    y_val: ArrayLike, probs_val: ArrayLike, prior: tuple[float, ...], taus: Iterable[float] = TAU_GRID
) -> tuple[Decision, dict[float, float]]:
    """The tau with the best validation balanced accuracy (the smallest on ties), and every tau's score.

    Args:
        y_val: (N,) integer labels of the validation split.
        probs_val: (N, C) calibrated probabilities of the same images.
        prior: the training split's class frequencies.
        taus: candidate values.
    """
    scores = {float(t): balanced_accuracy(y_val, Decision(float(t), prior).choose(probs_val)) for t in taus}
    best = max(scores, key=lambda t: (scores[t], -t))
    return Decision(best, prior), scores
