"""Case metadata (age, sex, anatomical site) as model features, and the head that combines them with
the network's output (fitted by `ml.fusion`, applied by `ml.Predictor`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ml.calibration import calibrated_softmax
from ml.decision import Decision

SEXES = ("male", "female")
# HAM10000's `localization` vocabulary without "unknown" (a missing site is its own feature); the web
# validates against its own copy (webapp.models.SITES), kept equal by tests/test_boundaries.py.
SITES = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "upper extremity",
)
METADATA_FEATURES = (
    ("age_over_100", "age_missing")
    + tuple(f"sex_{s}" for s in SEXES)
    + ("sex_missing",)
    + tuple(f"site_{s}" for s in SITES)
    + ("site_missing",)
)
FUSION_FILE = "fusion.npz"


def metadata_vector(age: float | None = None, sex: str | None = None, site: str | None = None) -> np.ndarray:
    """The metadata features of one case; None, NaN, "unknown" or an unknown value count as missing."""
    v = np.zeros(len(METADATA_FEATURES), dtype=np.float32)
    age_known = age is not None and not (isinstance(age, float) and math.isnan(age)) and 0 <= float(age) <= 120
    v[0], v[1] = (float(age) / 100.0, 0.0) if age_known else (0.0, 1.0)
    sex = str(sex).strip().lower() if sex is not None else ""
    if sex in SEXES:
        v[2 + SEXES.index(sex)] = 1.0
    else:
        v[2 + len(SEXES)] = 1.0
    site = " ".join(str(site).lower().replace("_", " ").split()) if site is not None else ""
    offset = 3 + len(SEXES)
    if site in SITES:
        v[offset + SITES.index(site)] = 1.0
    else:
        v[offset + len(SITES)] = 1.0
    return v


MISSING_METADATA = metadata_vector()


def metadata_matrix(table: pd.DataFrame) -> np.ndarray:
    """Metadata features of every row of a table with (some of) the columns age, sex, localization."""
    get = lambda row, key: row.get(key) if key in row else None  # noqa: E731
    return (
        np.stack(
            [metadata_vector(get(r, "age"), get(r, "sex"), get(r, "localization")) for r in table.to_dict("records")]
        )
        if len(table)
        else np.zeros((0, len(METADATA_FEATURES)), dtype=np.float32)
    )


@dataclass
class FusionHead:
    """logits = [standardised embedding, metadata] @ weights + bias."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: np.ndarray

    @classmethod
    def neutral(cls, num_classes: int) -> FusionHead:
        """A head on `num_classes` log-probabilities whose weights are all zero: uniform probabilities
        until weights are set (a starting point for hand-made heads)."""
        inputs = num_classes + len(METADATA_FEATURES)
        return cls(
            np.zeros(num_classes, np.float32),
            np.ones(num_classes, np.float32),
            np.zeros((inputs, num_classes), np.float32),
            np.zeros(num_classes, np.float32),
        )

    def logits(self, embeddings: np.ndarray, metadata: np.ndarray) -> np.ndarray:
        features = np.hstack([(np.asarray(embeddings, np.float32) - self.mean) / self.scale, metadata])
        return features @ self.weights + self.bias

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, scale=self.scale, weights=self.weights, bias=self.bias)

    @classmethod
    def load(cls, path: Path) -> FusionHead:
        with np.load(path) as f:
            return cls(f["mean"], f["scale"], f["weights"], f["bias"])


@dataclass(frozen=True)
class MetadataHead:
    """A fitted head as an artifact ships it: the head, its calibration and its own decision."""

    head: FusionHead
    temperature: float
    decision: Decision

    @classmethod
    def from_artifact(cls, folder: Path, manifest: dict) -> MetadataHead | None:
        """The artifact's head (`manifest["fusion"]` and its file), or None when it has none.

        Raises:
            ValueError: for a head on other image features than the network's log-probabilities.
        """
        fusion = manifest.get("fusion")
        if not fusion or not (Path(folder) / fusion.get("file", FUSION_FILE)).is_file():
            return None
        if fusion.get("image_features") != "log_probs":
            raise ValueError(
                f"Only heads on the network's log-probabilities are served, not {fusion.get('image_features')!r}."
            )
        head = FusionHead.load(Path(folder) / fusion.get("file", FUSION_FILE))
        decision = Decision.from_manifest({"decision": fusion.get("decision")})
        return cls(head, float(fusion["temperature"]), decision)

    def probabilities(self, calibrated: np.ndarray, metadata: np.ndarray) -> np.ndarray:
        """Calibrated probabilities given the network's calibrated probabilities and metadata features."""
        logits = self.head.logits(np.log(np.clip(calibrated, 1e-7, 1.0)), metadata)
        return calibrated_softmax(logits, self.temperature)
