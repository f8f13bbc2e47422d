"""This process's predictors, and the analyses they produce.

The default predictor (MODEL_DIR's artifact, or an untrained model labelled so) is loaded once per
pool process after the fork (worker.process), never at import time: forking a process with a
loaded TensorFlow runtime hangs. A job whose `model_version_id` is set (a re-run, see
webapp.model_versions.service) runs with that version's artifact, loaded once per process and kept.

An analysis is stored per (image, model version) and never overwritten: a job whose image already
has a succeeded analysis by its model version reuses it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from webapp.db import db
from webapp.model_versions.service import register_model_version
from webapp.models import Analysis, Image, Job, ModelVersion, utcnow
from webapp.states import AnalysisStatus, JobStatus
from webapp.storage import Storage, storage_from_settings

from .celery_app import current_settings

if TYPE_CHECKING:
    from ml.predictor import Predictor

log = logging.getLogger(__name__)

_state: dict[str, Any] = {"predictor": None, "predictor_error": None}  # this process's default predictor
_versioned_predictors: dict[int, Predictor] = {}  # ModelVersion.id -> predictor, for re-runs


# --- predictors ---------------------------------------------------------------------------------------


def artifact_dir() -> str | None:
    """MODEL_DIR when it holds a model artifact (a manifest), else None (the untrained model)."""
    model_dir = Path(current_settings().MODEL_DIR)
    return str(model_dir) if (model_dir / "manifest.json").is_file() else None


def load_predictor() -> Predictor:
    """The model artifact in MODEL_DIR when it has a manifest, else an untrained model (labelled so)."""
    from ml import Predictor  # TensorFlow: only ever called after the fork

    settings = current_settings()
    folder = artifact_dir()
    if folder is not None:
        return Predictor.load(folder)
    log.warning(
        "No model artifact at %s; using an UNTRAINED model of input size %s.",
        settings.MODEL_DIR,
        settings.UNTRAINED_INPUT_SIZE,
    )
    return Predictor.untrained(input_size=tuple(settings.UNTRAINED_INPUT_SIZE))


def load_default_predictor() -> None:
    """Loads this process's predictor; a failure is kept as the reason each job then fails with."""
    try:
        started = time.monotonic()
        _state["predictor"] = load_predictor()
        log.info("Predictor loaded in %.1f s (pid %d).", time.monotonic() - started, os.getpid())
    except Exception as exc:  # keep the process alive: each job then fails with this reason
        log.exception("Could not load the predictor.")
        _state["predictor_error"] = f"Model could not be loaded: {exc.__class__.__name__}: {exc}"


def loaded_predictor() -> Predictor | None:
    """This process's predictor if it is loaded (for the warm-up), without loading it."""
    return _state["predictor"]


def predictor() -> Predictor:
    """This process's predictor; loaded on first use where no worker_process_init was sent (solo pool).

    Raises:
        RuntimeError: the model could not be loaded (with the reason).
    """
    if _state["predictor"] is None and not _state["predictor_error"]:
        load_default_predictor()
    if _state["predictor"] is None:
        raise RuntimeError(_state["predictor_error"] or "Model could not be loaded.")
    return _state["predictor"]


def predictor_for_version(mv: ModelVersion) -> Predictor:
    """The predictor of a registered model version: the served one, or one loaded from its artifact.

    Raises:
        RuntimeError: a trained version whose artifact folder is not on this worker.
    """
    default = _state["predictor"]
    if default is not None and (str(default.manifest["name"]), str(default.manifest["version"])) == (
        mv.name,
        mv.version,
    ):
        return default  # the served model: never a second copy in the cache
    model = _versioned_predictors.get(mv.id)
    if model is None:
        model = _versioned_predictors[mv.id] = _load_model_version(mv)
    return model


def _load_model_version(mv: ModelVersion) -> Predictor:
    from ml import Predictor  # TensorFlow: only ever called after the fork

    if mv.artifact_path and (Path(mv.artifact_path) / "manifest.json").is_file():
        return Predictor.load(mv.artifact_path)
    if not mv.trained:
        size = (mv.manifest or {}).get("input_size") or current_settings().UNTRAINED_INPUT_SIZE
        return Predictor.untrained(input_size=tuple(size))
    raise RuntimeError(
        f"Model version {mv.name} {mv.version} has no artifact folder on this worker ({mv.artifact_path!r}); "
        "register it with `flask --app webapp models register FOLDER`."
    )


def predictor_for_job(job: Job) -> tuple[Predictor, ModelVersion]:
    """(predictor, ModelVersion row) for the job: its re-run version, else this process's model
    (registered on first sight)."""
    if job.model_version_id is None:
        model = predictor()
        return model, register_model_version(model.manifest, artifact_dir())
    return predictor_for_version(job.model_version), job.model_version


def explainable(model: Any) -> bool:
    """Explanations need the Keras model behind the predictor (test doubles may have none)."""
    return getattr(model, "model", None) is not None and hasattr(model, "preprocess")


def batch_limit() -> int:
    """The most images in one forward pass (PREDICT_BATCH_SIZE)."""
    return max(1, int(getattr(current_settings(), "PREDICT_BATCH_SIZE", 16)))


def read_image(storage_key: str, storage: Storage | None = None) -> np.ndarray:
    """A stored image as an HxWx3 uint8 RGB array.

    Args:
        storage_key: the image's key.
        storage: the storage to read from (default: the current app's); threads, which have no app
            context, are handed it.
    """
    storage = storage or storage_from_settings(current_settings())
    with storage.open(storage_key) as f:
        return np.asarray(PILImage.open(f).convert("RGB"), dtype=np.uint8)


# --- analyses -----------------------------------------------------------------------------------------


def images_to_predict(jobs: Sequence[Job], model_version: ModelVersion) -> list[Image]:
    """The images of the claimed jobs that have no succeeded analysis by `model_version` yet, each
    once (two jobs may name one image), with their cases, in two queries.

    Nothing is written here: the analyses are stored with the results, in the micro-batch's one
    transaction (`analyses_of`, `analysis_for`, `finish_jobs`). A job whose case was deleted since
    its claim is gone with it and left out.
    """
    # The claimed jobs and the rows read for them are this delivery's alone: keep them loaded after
    # the commit instead of reloading every attribute with one query each (~40% of a batch's time).
    db.session().expire_on_commit = False
    image_ids = list(dict.fromkeys(job.image_id for job in jobs))
    images = {
        image.id: image
        for image in db.session.scalars(
            select(Image).where(Image.id.in_(image_ids)).options(joinedload(Image.case))
        ).unique()
    }
    done = set(
        db.session.scalars(
            select(Analysis.image_id).where(
                Analysis.image_id.in_(image_ids),
                Analysis.model_version_id == model_version.id,
                Analysis.status == AnalysisStatus.SUCCEEDED,
            )
        )
    )
    return [images[i] for i in image_ids if i in images and i not in done]


def analyses_of(image_ids: Iterable[int], model_version: ModelVersion) -> dict[int, Analysis]:
    """The stored analyses of the images by `model_version`, by image id (one query). Read after the
    images were locked: an analysis another worker stored meanwhile is seen and kept."""
    ids = sorted(set(image_ids))
    query = select(Analysis).where(Analysis.image_id.in_(ids), Analysis.model_version_id == model_version.id)
    return {a.image_id: a for a in db.session.scalars(query)} if ids else {}


def analysis_for(analyses: dict[int, Analysis], image: Image, model_version: ModelVersion) -> Analysis:
    """The image's analysis by the version to store results in: the stored one (restarted after a
    failure), or a new one added to `analyses` (the caller commits; new rows go in as one INSERT)."""
    analysis = analyses.get(image.id)
    if analysis is None:
        # Both the relations and their ids: the explanation rows read the ids before any flush.
        analysis = Analysis(image=image, image_id=image.id, model_version=model_version)
        analysis.model_version_id = model_version.id
        db.session.add(analysis)
        analyses[image.id] = analysis
    analysis.error = None
    return analysis


def top_class_indices(model: Any, probs: np.ndarray) -> np.ndarray:
    """The class each row of probabilities is shown as: the model's decision (`ml.decision`), or the
    argmax for a model without one (test doubles)."""
    decision = getattr(model, "decision", None)
    return decision.choose(probs) if decision is not None else np.asarray(probs).argmax(axis=-1)


def answer_with_metadata(
    model: Any, probs: np.ndarray, images: Sequence[Image]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The version's answer for each image: (probabilities, top class indices, metadata used).

    A version with a metadata head (`ml.metadata`) combines the network's calibrated probabilities
    with the age, sex and site of the image's case, where the case has any of them; otherwise the
    network's answer and decision stand.
    """
    if getattr(model, "metadata_head", None) is None:
        return np.asarray(probs), top_class_indices(model, probs), np.zeros(len(probs), dtype=bool)
    from ml.metadata import metadata_vector  # ml loads TensorFlow: never before the fork

    metadata = np.stack([metadata_vector(i.case.age, i.case.sex, i.case.site) for i in images])
    return model.with_metadata(probs, metadata)


def store_prediction(
    analysis: Analysis,
    probs: Sequence[float],
    top_index: int,
    class_names: Sequence[str],
    timings: dict[str, float],
    metadata_used: bool = False,
) -> None:
    """The analysis's probabilities per class, top class and timings; `succeeded` (the caller commits).

    Raises:
        ValueError: the model returned a probability per class of another class list.
    """
    if len(probs) != len(class_names):
        raise ValueError(f"The model returned {len(probs)} probabilities for {len(class_names)} classes.")
    analysis.probabilities = {c: float(p) for c, p in zip(class_names, probs)}
    analysis.top_class = class_names[int(top_index)]
    analysis.metadata_used = bool(metadata_used)
    analysis.timings = timings
    analysis.status, analysis.finished_at = AnalysisStatus.SUCCEEDED, utcnow()


def fail_analysis(analysis: Analysis, message: str) -> None:
    """The analysis ends `failed` with `message` (the caller commits)."""
    analysis.status, analysis.error, analysis.finished_at = AnalysisStatus.FAILED, message[:4000], utcnow()


def finish_jobs(jobs: Sequence[Job], analyses: dict[int, Analysis], model_version: ModelVersion) -> None:
    """Each job ends as the analysis of its image did: `succeeded`, or `failed` with the analysis's
    error (the caller commits)."""
    for job in jobs:
        analysis = analyses.get(job.image_id)
        job.model_version, job.analysis, job.finished_at = model_version, analysis, utcnow()
        if analysis is not None and analysis.status == AnalysisStatus.SUCCEEDED:
            job.status = JobStatus.SUCCEEDED
        else:
            error = analysis.error if analysis is not None else "The image's analysis was not stored."
            job.status, job.error = JobStatus.FAILED, error
