"""ml.ood_choice: the detector's variant for a kind is chosen without that kind's images."""

from __future__ import annotations

import numpy as np
import pytest

from ml import ood_choice
from ml.image_stats import NAMES
from ml.ood import Inputs, fit_statistics
from ml.outliers import EVALUATION_KINDS, TRAINING_KINDS

DIM, CLASSES = 96, 3

pytestmark = pytest.mark.slow  # 216 small regressions


def embeddings(seed: int = 0) -> tuple[dict, np.ndarray, dict, tuple]:
    """Real images: three class clusters; each outlier kind: a cluster shifted its own way."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (CLASSES, DIM))
    labels = rng.integers(0, CLASSES, 900)
    real = centres[labels] + rng.normal(0, 1, (900, DIM))
    emb = {"train": real[:500], "val": real[500:700], "test": real[700:]}
    outliers = {}
    for k, kind in enumerate(EVALUATION_KINDS):
        direction = np.zeros(DIM)
        direction[k * 3 : k * 3 + 3] = 4.0
        if kind in TRAINING_KINDS:
            outliers[f"train/{kind}"] = direction + rng.normal(0, 1, (80, DIM))
        outliers[f"eval/{kind}"] = direction + rng.normal(0, 1, (40, DIM))
    head = (rng.normal(0, 0.1, (DIM, CLASSES)), np.zeros(CLASSES))
    return emb, labels[:500], outliers, head


def signals(emb, labels, outliers, head) -> ood_choice.Signals:
    """The sets as Inputs whose image statistics are all alike: the embeddings alone tell kinds apart."""
    inputs = lambda sets: {k: Inputs(e, np.zeros((len(e), len(NAMES)))) for k, e in sets.items()}  # noqa: E731
    base = fit_statistics(emb["train"], labels, head, CLASSES, (8, 8))
    return ood_choice.Signals(base, inputs(emb), inputs(outliers))


def test_each_kind_is_judged_by_a_variant_chosen_and_trained_without_it():
    emb, labels, outliers, head = embeddings()
    loko = ood_choice.leave_one_kind_out(signals(emb, labels, outliers, head))
    assert list(loko) == list(EVALUATION_KINDS)
    for kind, row in loko.items():
        assert kind not in row["chosen_on"] and not set(row["chosen_on"]) & set(TRAINING_KINDS) - {kind}
        assert ood_choice.Variant(**row["variant"]) in ood_choice.VARIANTS
        assert 0 <= row["flagged"] <= row["n"] == 40

    # Replacing a kind's images changes its count, never the variant chosen for it.
    for kind in ("photo", "noise"):
        changed = dict(outliers)
        changed[f"eval/{kind}"] = emb["test"][:40]  # real dermoscopy: hardly any flagged
        if f"train/{kind}" in changed:
            changed[f"train/{kind}"] = -changed[f"train/{kind}"]
        again = ood_choice.leave_one_kind_out(signals(emb, labels, changed, head))
        assert again[kind]["variant"] == loko[kind]["variant"]
        assert again[kind]["flagged"] <= 6 < loko[kind]["flagged"]
