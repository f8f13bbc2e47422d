"""The embedding and out-of-distribution verdict of each predicted image (ml.retrieval, ml.ood).

The artifact's projection and detector are read once per artifact folder and kept. The pooled
embedding comes from `Predictor.embed_and_predict_raw`, one forward pass per batch beside the
prediction pass (the Grad-CAM pass does not hand its pooled features out). A model without them
(an untrained model, a test double, an artifact from before) stores none: the analysis then has no
similar cases and no verdict, and its prediction is unaffected.
"""

from __future__ import annotations

import logging
import traceback
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded

from webapp.models import Analysis, ModelVersion

from . import predict

if TYPE_CHECKING:
    from ml.predictor import Predictor

log = logging.getLogger(__name__)


class Described(NamedTuple):
    embedding: bytes | None
    ood_score: float | None
    ood_flagged: bool | None


NOTHING = Described(None, None, None)


@cache
def _artifact_parts(folder: str):
    """(projection, detector) of an artifact folder, either None when it ships none."""
    from ml.artifact import read_manifest
    from ml.ood import OodDetector
    from ml.retrieval import Projection

    manifest = read_manifest(Path(folder))
    return Projection.from_artifact(folder, manifest), OodDetector.from_artifact(folder, manifest)


def _folder(model_version: ModelVersion) -> str | None:
    folder = model_version.artifact_path or predict.artifact_dir()
    return str(folder) if folder and (Path(folder) / "manifest.json").is_file() else None


def describe(model: Predictor, images: list[np.ndarray], model_version: ModelVersion) -> list[Described]:
    """One Described per image; NOTHING for each when the model or artifact cannot give them (logged)."""
    folder = _folder(model_version)
    if folder is None or not hasattr(model, "embed_and_predict_raw") or not images:
        return [NOTHING] * len(images)
    try:
        projection, detector = _artifact_parts(folder)
        if projection is None:
            return [NOTHING] * len(images)
        from ml.retrieval import to_bytes

        pooled, _ = model.embed_and_predict_raw(np.stack([model.preprocess(im) for im in images]))
        stored = projection(pooled)
        scores = detector.score(pooled) if detector is not None else [None] * len(images)
        return [
            Described(to_bytes(v), None if s is None else float(s), None if s is None else bool(s > detector.threshold))
            for v, s in zip(stored, scores)
        ]
    except SoftTimeLimitExceeded:
        raise
    except Exception:
        log.error("Embedding pass failed; storing the predictions without it:\n%s", traceback.format_exc())
        return [NOTHING] * len(images)


def store(analysis: Analysis, described: Described) -> None:
    """Sets the analysis's embedding and verdict (the caller commits)."""
    analysis.embedding, analysis.ood_score, analysis.ood_flagged = described
