"""Tasks. Each takes ids, loads rows itself, and ends its job in `succeeded` or `failed`.

The predictor is loaded once per pool process in `worker_process_init` (after the fork: forking a
process with a loaded TensorFlow runtime hangs), never at import time.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import task_failure, worker_init, worker_process_init
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from . import reliability
from .celery_app import app, settings

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)  # create_app() loads Flask-Migrate; its INFO lines are noise here
MAX_ATTEMPTS = settings.TASK_MAX_ATTEMPTS
TRANSIENT_RETRIES = 5  # retries with backoff (2, 4, 8, 16, 32 s) for database or broker hiccups
_state: dict[str, Any] = {"flask_app": None, "predictor": None, "predictor_error": None, "pool_processes": None}


def flask_app():
    """The Flask app of this process, for database access (created on first use, after the fork)."""
    if _state["flask_app"] is None:
        from webapp import create_app

        _state["flask_app"] = create_app()
    return _state["flask_app"]


def load_predictor():
    """The model artifact in MODEL_DIR when it has a manifest, else an untrained model (labelled so)."""
    try:
        from ml import Predictor
    except ImportError:  # ml/__init__.py does not re-export it (yet)
        from ml.predictor import Predictor

    model_dir = Path(settings.MODEL_DIR)
    if (model_dir / "manifest.json").is_file():
        return Predictor.load(str(model_dir))
    log.warning("No model artifact at %s; using an UNTRAINED model of input size %s.", model_dir, settings.UNTRAINED_INPUT_SIZE)
    return Predictor.untrained(input_size=tuple(settings.UNTRAINED_INPUT_SIZE))


@worker_init.connect
def _remember_pool_size(sender=None, **_: Any) -> None:
    """The worker's -c, which its pool processes inherit over the fork (to share out the cores)."""
    concurrency = getattr(sender, "concurrency", None)
    _state["pool_processes"] = concurrency if isinstance(concurrency, int) and concurrency > 0 else None  # not "auto"


def limit_threads() -> int:
    """Gives this process's TensorFlow its share of the cores (webapp.config.worker_layout); must run
    before TensorFlow executes anything. Returns the thread count."""
    from webapp.config import worker_layout

    import tensorflow as tf

    _, threads = worker_layout(settings, _state.get("pool_processes"))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime was already initialised in this process (tests, solo pool)
        log.warning("TensorFlow already initialised; its thread count stays as it is.")
    return threads


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    from webapp.db import db

    with flask_app().app_context():
        db.engine.dispose(close=False)  # never share connections inherited from the parent over the fork
    log.info("TensorFlow threads in this pool process: %d.", limit_threads())
    _load_predictor_once()
    from . import batching

    batching.warm_up_process()  # trace the prediction pass at each batch size now, not on the first upload


def _load_predictor_once() -> None:
    try:
        started = time.monotonic()
        _state["predictor"] = load_predictor()
        log.info("Predictor loaded in %.1f s (pid %d).", time.monotonic() - started, os.getpid())
    except Exception as exc:  # keep the process alive: each job then fails with this reason
        log.exception("Could not load the predictor.")
        _state["predictor_error"] = f"Model could not be loaded: {exc.__class__.__name__}: {exc}"


def predictor():
    """This process's predictor; loaded on first use where no worker_process_init was sent (solo pool)."""
    if _state["predictor"] is None and not _state["predictor_error"]:
        _load_predictor_once()
    if _state["predictor"] is None:
        raise RuntimeError(_state["predictor_error"] or "Model could not be loaded.")
    return _state["predictor"]


def register_model_version(manifest: dict):
    """The ModelVersion row for the manifest's (name, version), created on first sight."""
    from webapp.db import db
    from webapp.models import ModelVersion

    name, version = str(manifest["name"]), str(manifest["version"])
    query = select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    row = db.session.scalar(query)
    if row is not None:
        return row
    row = ModelVersion(
        name=name,
        version=version,
        trained=bool(manifest.get("trained")),
        trained_on=manifest.get("trained_on"),
        class_names=list(manifest["class_names"]),
        manifest=_jsonable(manifest),
        # Where a re-run with this version finds the artifact (None: the untrained model, rebuilt from its manifest).
        artifact_path=str(settings.MODEL_DIR) if (Path(settings.MODEL_DIR) / "manifest.json").is_file() else None,
    )
    db.session.add(row)
    try:
        db.session.commit()
    except IntegrityError:  # another process registered it first
        db.session.rollback()
        row = db.session.scalar(query)
    return row


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _read_rgb(storage_key: str):
    import numpy as np
    from PIL import Image as PILImage

    from webapp.storage import storage_from_settings

    with storage_from_settings(settings).open(storage_key) as f:
        return np.asarray(PILImage.open(f).convert("RGB"), dtype=np.uint8)


def _now():
    from webapp.models import utcnow

    return utcnow()


def _fail(job_id: int, message: str) -> None:
    from webapp.db import db
    from webapp.models import Analysis, Job

    db.session.rollback()
    job = db.session.get(Job, job_id)
    if job is None or job.status == "succeeded":  # e.g. stored by an earlier pass of the same task: results are kept
        return
    job.status, job.error, job.finished_at = "failed", message[:4000], _now()
    if job.analysis_id is not None:
        analysis = db.session.get(Analysis, job.analysis_id)
        if analysis is not None and analysis.status != "succeeded":
            analysis.status, analysis.error, analysis.finished_at = "failed", message[:4000], _now()
    db.session.commit()


@app.task(name="worker.tasks.analyse", bind=True, max_retries=TRANSIENT_RETRIES)
def analyse(self, job_id: int) -> str:
    """Runs the predictor on the job's image and stores an Analysis per (image, model version).

    Returns the job's final status. Idempotent: the delivery first claims the job
    (worker.reliability.claim), so a redelivered or duplicated message adds nothing. Never leaves
    the job `running`: transient errors (database or broker briefly unavailable) put it back to
    `queued` and retry with backoff; every other error ends in `failed` with its reason (the soft
    time limit included).
    """
    from webapp.db import db
    from webapp.models import Job

    transient: BaseException | None = None
    with flask_app().app_context():
        claimed = False
        try:
            job = db.session.get(Job, job_id)
            if job is None:
                log.warning("Job %s does not exist; nothing to do.", job_id)
                return "missing"
            outcome = reliability.claim(job, self.request, settings, _now())
            if outcome is not None:
                return outcome
            claimed = True
            _run_analysis(job)
        except SoftTimeLimitExceeded:
            _fail(job_id, f"Timed out after {settings.TASK_SOFT_TIME_LIMIT} s.")
        except Exception as exc:
            if reliability.is_transient(exc):
                log.warning("Job %s: transient error, will retry: %s", job_id, exc)
                if claimed:
                    reliability.release(job_id)
                transient = exc
            else:
                log.error("Job %s failed:\n%s", job_id, traceback.format_exc())
                _fail(job_id, f"{exc.__class__.__name__}: {exc}")
        finally:
            db.session.remove()
        if transient is not None:  # outside the try: Retry is an Exception too
            raise self.retry(exc=transient, countdown=reliability.retry_countdown(self.request.retries))
        return db.session.get(Job, job_id).status


# --- Re-runs with a chosen model version (research portal) -------------------------------------
# A job whose model_version_id is set (webapp.model_versions.service) runs with that version's artifact, loaded once
# per pool process and kept; jobs without one use the process's default predictor as before.
_versioned_predictors: dict[int, Any] = {}


def predictor_for_job(job):
    """(predictor, ModelVersion row) for the job."""
    if job.model_version_id is None:
        model = predictor()
        return model, register_model_version(model.manifest)
    mv = job.model_version
    default = _state["predictor"]
    if default is not None and (str(default.manifest["name"]), str(default.manifest["version"])) == (mv.name, mv.version):
        return default, mv  # the served model: never a second copy in the cache
    model = _versioned_predictors.get(mv.id)
    if model is None:
        model = _versioned_predictors[mv.id] = _load_model_version(mv)
    return model, mv


def _load_model_version(mv):
    try:
        from ml import Predictor
    except ImportError:
        from ml.predictor import Predictor

    if mv.artifact_path and (Path(mv.artifact_path) / "manifest.json").is_file():
        return Predictor.load(mv.artifact_path)
    if not mv.trained:
        size = (mv.manifest or {}).get("input_size") or settings.UNTRAINED_INPUT_SIZE
        return Predictor.untrained(input_size=tuple(size))
    raise RuntimeError(
        f"Model version {mv.name} {mv.version} has no artifact folder on this worker ({mv.artifact_path!r}); "
        "register it with `flask --app webapp models register FOLDER`."
    )


def _run_analysis(job) -> None:
    from . import batching

    if batching.batch_limit() > 1:  # takes further queued jobs along into one forward pass
        return batching.run_batch(job)
    _run_single_analysis(job)


def _run_single_analysis(job) -> None:
    from webapp.db import db
    from webapp.models import Analysis

    model, model_version = predictor_for_job(job)  # re-run jobs name their model version
    job.model_version = model_version
    analysis = db.session.scalar(
        select(Analysis).where(Analysis.image_id == job.image_id, Analysis.model_version_id == model_version.id)
    )
    if analysis is not None and analysis.status == "succeeded":  # results are never overwritten
        job.analysis, job.status, job.finished_at = analysis, "succeeded", _now()
        db.session.commit()
        _queue_explanations(model, analysis.id)
        return
    if analysis is None:
        analysis = Analysis(image_id=job.image_id, model_version=model_version)
        db.session.add(analysis)
    analysis.status, analysis.error = "running", None
    job.analysis = analysis
    db.session.commit()

    t0 = time.perf_counter()
    pixels = _read_rgb(job.image.storage_key)
    t1 = time.perf_counter()
    probs, gradcam = _predict(model, pixels)
    t2 = time.perf_counter()

    class_names = list(model_version.class_names)
    if len(probs) != len(class_names):
        raise ValueError(f"The model returned {len(probs)} probabilities for {len(class_names)} classes.")
    probabilities = {c: float(p) for c, p in zip(class_names, probs)}
    analysis.probabilities = probabilities
    analysis.top_class = max(probabilities, key=probabilities.get)
    analysis.timings = {"load_image_ms": round((t1 - t0) * 1000, 1), "predict_ms": round((t2 - t1) * 1000, 1)}
    if gradcam is not None:  # the Grad-CAM map of the same pass, stored with the prediction
        from . import explain_tasks

        index, heatmap, error = gradcam
        class_name = class_names[index] if error is None else analysis.top_class
        explain_tasks.record_gradcam(analysis, class_name, heatmap, settings.GRADCAM_PLUS_PLUS, error)
    analysis.status, analysis.finished_at = "succeeded", _now()
    job.status, job.finished_at = "succeeded", _now()
    db.session.commit()
    _queue_explanations(model, analysis.id)


def _predict(model, pixels):
    """Probabilities and, for a Keras-backed predictor, the Grad-CAM map of the predicted class from
    the same forward pass: `(probs, (class_index, map, None))`. If the Grad-CAM pass fails the
    prediction is still made: `(probs, (None, None, reason))`. Without a model to explain: `(probs, None)`."""
    from . import explain_tasks

    if not explain_tasks.explainable(model):
        return model.predict([pixels])[0], None
    try:
        probs, index, heatmap = explain_tasks.prediction_pass(model, pixels, settings.GRADCAM_PLUS_PLUS)
        return probs, (index, heatmap, None)
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:  # an explanation never costs the prediction
        log.error("Grad-CAM pass failed; predicting without it:\n%s", traceback.format_exc())
        return model.predict([pixels])[0], (None, None, f"Grad-CAM failed: {exc.__class__.__name__}: {exc}")


def _queue_explanations(model, analysis_id: int) -> None:
    """SHAP rows for the top classes, sent to the explain queue after the prediction is stored."""
    from . import explain_tasks

    if not explain_tasks.explainable(model):
        return
    try:
        explain_tasks.queue_followups(analysis_id)
    except Exception:  # the prediction is stored; a lost SHAP request must not fail the job
        from webapp.db import db

        db.session.rollback()
        log.exception("Could not queue the explanations of analysis %s.", analysis_id)


@task_failure.connect
def _mark_failed(sender=None, task_id=None, exception=None, args=None, **_: Any) -> None:
    """Backstop for failures outside the task body (e.g. the hard time limit killed the process)."""
    if getattr(sender, "name", None) != analyse.name or not args:
        return
    try:
        from webapp.db import db
        from webapp.models import Job

        with flask_app().app_context():
            job = db.session.get(Job, int(args[0]))
            if job is not None and not job.finished:
                if reliability.is_transient(exception) or exception.__class__.__name__ in ("Reject", "Retry"):
                    reliability.release(job.id)  # a retry could not be published: the sweep sends it again
                    return
                if isinstance(exception, TimeLimitExceeded):
                    message = f"TimeLimitExceeded: stopped by the hard time limit of {settings.TASK_TIME_LIMIT} s."
                else:
                    message = f"{exception.__class__.__name__}: {exception}"
                _fail(job.id, message)
    except Exception:
        log.exception("Could not mark job %s failed.", args)


from . import explain_tasks  # noqa: E402,F401  (registers worker.tasks.explain_shap and explain_gradcam)
