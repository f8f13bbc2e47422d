"""The embedding and out-of-distribution verdict of each predicted image (ml.retrieval, ml.ood).

The artifact's projection and detector are read once per artifact folder and kept. The pooled
embedding is an output of the prediction pass itself (`worker.batching.predict_batch`: the forward
CAM's pooled features, or the pooling layer's output beside the tape or the plain pass), so
describing an image calls no model; the detector also reads cheap statistics of the images' pixels
(`ml.image_stats`, at the model's input size). Without them (a test double, an untrained model, an artifact
without `retrieval.npz`) nothing is stored: the analysis then has no similar cases and no verdict, and its
prediction is unaffected.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded

from webapp.models import Analysis, ModelVersion

from . import predict

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


def describe(pooled: np.ndarray | None, images: Sequence[np.ndarray], model_version: ModelVersion) -> list[Described]:
    """One Described for each of the N `images` (the RGB arrays the pass predicted) from the
    prediction pass's pooled features (N, D) and the images' pixels; NOTHING for each when the pass
    gave no features or the artifact cannot use them (logged)."""
    count = len(images)
    folder = _folder(model_version)
    if folder is None or pooled is None or not count or np.shape(pooled)[-1] == 0:
        return [NOTHING] * count
    try:
        projection, detector = _artifact_parts(folder)
        if projection is None:
            return [NOTHING] * count
        from ml.retrieval import to_bytes

        stored = projection(pooled)
        scores = detector.score(pooled, images) if detector is not None else [None] * count
        return [
            Described(to_bytes(v), None if s is None else float(s), None if s is None else bool(s > detector.threshold))
            for v, s in zip(stored, scores)
        ]
    except SoftTimeLimitExceeded:
        raise
    except Exception:
        log.error("Embedding could not be stored; storing the predictions without it:\n%s", traceback.format_exc())
        return [NOTHING] * count


def store(analysis: Analysis, described: Described) -> None:
    """Sets the analysis's embedding and verdict (the caller commits)."""
    analysis.embedding, analysis.ood_score, analysis.ood_flagged = described
