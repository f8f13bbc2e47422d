"""Micro-batching of predictions, the worker's warm-up, and keeping SHAP out of the predictions' way.

Why: one EfficientNetB3 forward pass on 2 CPU cores costs ~0.1 s for one image but ~0.035 s per image
in a batch of 16, and everything around the model (Celery, the database, PNG decoding) is cheap next
to it. So when `worker.tasks.analyse(job_id)` runs, it also *claims* up to PREDICT_BATCH_SIZE - 1
further `queued` analyse jobs of the same model version (oldest first, each with the same
conditional UPDATE as worker.reliability.claim, so no two deliveries or workers take the same job),
decodes their stored PNGs in a small thread pool, runs ONE forward pass that gives the calibrated
probabilities and the Grad-CAM maps of all of them (`ml.explain.explain_gradcam`), stores every
result in one commit and marks the jobs succeeded. The Celery messages of the jobs taken along
then find their job finished and return at once (claim is idempotent).

Batches are padded (by repeating the last image) to a few fixed sizes (1, 2, 4, 8, 16, ...
up to PREDICT_BATCH_SIZE), so that the compiled pass only ever sees those shapes: oneDNN builds its
kernels per shape, which costs 0.3-1.5 s the first time a size is seen. `warm_up` runs each size
once in `worker_process_init`, so the first real upload does not pay for tracing (20-40 s cold).

SHAP (the `explain` queue) must never delay a prediction. When a worker serves both queues (make run):
- the Redis transport polls `predict` before `explain` (celery_app: queue_order_strategy=priority);
- `explain_shap` defers itself (re-sent with a countdown) while analyse jobs are queued;
- a running SHAP computation checks between its model batches and, if analyse jobs arrived, stops,
  puts its rows back to `queued` and re-sends itself (`PredictionsWaiting`).
A worker that consumes only `explain` (docker compose's explain workers) never defers.
"""

from __future__ import annotations

import logging
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update

from . import reliability

log = logging.getLogger(__name__)

_pool: ThreadPoolExecutor | None = None
DECODE_THREADS = 2
EXPLAIN_QUIET_S = 3.0  # SHAP waits until no upload has arrived for this long
GATHER_WAIT_S = 0.05  # a small batch waits this long (at most GATHER_ROUNDS times) while uploads stream in
GATHER_ROUNDS = 4


# --- sizes ----------------------------------------------------------------------------------------

def batch_limit() -> int:
    from . import tasks as core

    return max(1, int(getattr(core.settings, "PREDICT_BATCH_SIZE", 16)))


def bucket_sizes(limit: int) -> list[int]:
    """The padded batch sizes: powers of two below `limit`, then `limit` (e.g. 16 -> 1, 2, 4, 8, 16)."""
    sizes, size = [], 1
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


def padded_size(n: int, limit: int) -> int:
    """The smallest bucket that holds `n` images (n <= limit)."""
    return next(size for size in bucket_sizes(limit) if size >= n)


def pad(images: Sequence, size: int) -> list:
    """`images` followed by copies of its last image, `size` in all (real pixels: no NaN, no zero maps)."""
    images = list(images)
    return images + [images[-1]] * (size - len(images))


# --- the batched pass -----------------------------------------------------------------------------

def predict_batch(model, images: Sequence, limit: int | None = None, plus_plus: bool = False):
    """Probabilities and Grad-CAM maps of `images` from one padded forward pass.

    Args:
        model: an `ml.Predictor` (or a test double with `predict(list) -> (N, C)` only).
        images: HxWx3 uint8 RGB arrays, at most `limit` of them.
        limit: the largest batch (PREDICT_BATCH_SIZE by default).
        plus_plus: Grad-CAM++ instead of Grad-CAM.

    Returns:
        `(probs (N, C), gradcams)` where gradcams is None for a model without a Keras model to
        explain, else one `(class_index, map at the image's size, None)` per image, or
        `(None, None, reason)` for each image when the Grad-CAM pass failed (the probabilities then
        come from a plain forward pass: an explanation never costs the prediction).
    """
    from . import explain_tasks

    n = len(images)
    limit = limit or batch_limit()
    padded = pad(images, padded_size(n, max(limit, n)))
    if not explain_tasks.explainable(model):
        return _plain(model, padded, n), None
    try:
        from ml.explain import explain_gradcam

        result = explain_gradcam(model, padded, None, plus_plus=plus_plus, batch_size=len(padded))
        return result.probs[:n], [(int(c), m, None) for c, m in zip(result.class_indices[:n], result.maps[:n])]
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        log.error("Grad-CAM pass failed; predicting without it:\n%s", traceback.format_exc())
        reason = f"Grad-CAM failed: {exc.__class__.__name__}: {exc}"
        return _plain(model, padded, n), [(None, None, reason)] * n


def _plain(model, padded, n):
    import numpy as np

    return np.asarray(model.predict(padded))[:n]


def warm_up(model, limit: int | None = None) -> float:
    """Runs the prediction pass once at every padded batch size; returns the seconds it took."""
    import numpy as np

    from . import tasks as core

    started = time.monotonic()
    h, w = getattr(model, "input_size", (64, 64))
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    for size in bucket_sizes(limit or batch_limit()):
        predict_batch(model, [image] * size, limit, bool(core.settings.GRADCAM_PLUS_PLUS))
    return time.monotonic() - started


def warm_up_process() -> None:
    """worker_process_init: the first real request should not pay for tracing and kernel set-up."""
    from . import tasks as core

    model = core._state.get("predictor")
    if model is None or not getattr(core.settings, "PREDICT_WARMUP", True):
        return
    try:
        seconds = warm_up(model)
        log.info("Prediction pass warmed up for batch sizes %s in %.1f s.", bucket_sizes(batch_limit()), seconds)
    except Exception:  # a failed warm-up only means a slow first request
        log.exception("Warm-up failed (the first predictions will be slower).")
    try:
        seconds = warm_up_shap(model)
        if seconds is not None:
            log.info("SHAP function imported and traced in %.1f s.", seconds)
    except Exception:
        log.exception("SHAP warm-up failed (the first SHAP run will be slower).")


def warm_up_shap(model) -> float | None:
    """Imports shap (3 s) and traces the SHAP model function at batch 1 and PREDICT_BATCH_SIZE, on a
    worker that serves the explain queue: a SHAP run can only give way to a prediction between two
    model calls, so its first call must not be a 10-20 s trace. None when there is nothing to do."""
    import numpy as np

    from webapp.queue import EXPLAIN_QUEUE

    from . import explain_tasks
    from . import tasks as core

    try:
        consume_from = core.app.amqp.queues.consume_from
    except Exception:
        consume_from = None
    if int(core.settings.SHAP_TOP_K) <= 0 or not explain_tasks.explainable(model):
        return None
    if consume_from and EXPLAIN_QUEUE not in consume_from:
        return None
    started = time.monotonic()
    import shap  # noqa: F401  (pulls in numba and scikit-learn)

    from ml.explain.gradcam import predictor_temperature
    from ml.explain.shap_explainer import probability_function

    from ml.explain.shap_explainer import default_blur, shap_values

    fn = probability_function(model.model, predictor_temperature(model))
    h, w = model.input_size
    chunk = min(batch_limit(), int(core.settings.SHAP_BATCH_SIZE))
    for size in (1, chunk):  # the chunks of yielding()
        fn(np.full((size, h, w, 3), 128, dtype=np.float32))
    # A small explanation compiles shap's numba code (~5-7 s the first time), which no check can interrupt.
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3)).astype(np.float32)
    shap_values(fn, image, max_evals=4 * chunk, batch_size=chunk, class_indices=[0], blur=default_blur(h, w))
    return time.monotonic() - started


# --- claiming companions ----------------------------------------------------------------------------

def claim_companions(lead, model_version_id: int | None, count: int, now) -> list:
    """Claims up to `count` further queued analyse jobs of the same model version, oldest first.

    Each claim is the conditional UPDATE of worker.reliability.claim (status and attempts as seen), so a
    job that another delivery or worker takes at the same moment is skipped. Committed.
    """
    from webapp.db import db
    from webapp.models import Job

    from . import tasks as core

    if count <= 0:
        return []
    same_version = Job.model_version_id.is_(None) if model_version_id is None else Job.model_version_id == model_version_id
    candidates = db.session.execute(
        select(Job.id, Job.attempts)
        .where(Job.status == "queued", Job.kind == lead.kind, Job.id != lead.id, same_version,
               Job.attempts < core.settings.TASK_MAX_ATTEMPTS)
        .order_by(Job.id).limit(count)
    ).all()
    claimed = []
    for job_id, attempts in candidates:
        result = db.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued", Job.attempts == attempts)
            .values(status="running", attempts=Job.attempts + 1, started_at=now, error=None,
                    claimed_by=reliability.worker_identity())
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            claimed.append(job_id)
    db.session.commit()
    return [db.session.get(Job, job_id) for job_id in claimed]


def uploads_streaming(lead, window: float = 0.5) -> bool:
    """Whether another analyse job was created in the last `window` seconds (a folder is being uploaded)."""
    from datetime import timedelta

    from webapp.db import db
    from webapp.models import Job

    from . import tasks as core

    since = core._now() - timedelta(seconds=window)
    newest = db.session.scalar(select(Job.created_at).where(Job.kind == "analyse", Job.id != lead.id)
                               .order_by(Job.id.desc()).limit(1))
    return newest is not None and newest > since


def gather(lead, version_id: int | None, count: int) -> list:
    """Companions for the lead job. While uploads stream in and the batch is less than half full, waits
    GATHER_WAIT_S (up to GATHER_ROUNDS times) for more: the CPU goes to the uploads meanwhile, and a
    batch of 8 costs about as much as 3 single passes. A lone upload never waits."""
    from . import tasks as core

    companions = claim_companions(lead, version_id, count, core._now())
    for _ in range(GATHER_ROUNDS):
        if len(companions) + 1 > (count + 1) // 2 or not uploads_streaming(lead):
            break
        time.sleep(GATHER_WAIT_S)
        companions += claim_companions(lead, version_id, count - len(companions), core._now())
    return companions


# --- one batch ---------------------------------------------------------------------------------------

def run_batch(lead) -> None:
    """analyse's work for the claimed job `lead` plus the queued jobs it takes along.

    Raises whatever ends the lead job (analyse turns it into `failed` or a retry); the companions are
    failed (or, for transient errors, put back to `queued`) here first, so none is left `running`.
    """
    from . import reliability
    from . import tasks as core

    version_id = lead.model_version_id  # None: the worker's default model
    model, model_version = core.predictor_for_job(lead)
    companions = gather(lead, version_id, batch_limit() - 1)
    companion_ids = [job.id for job in companions]
    try:
        _process([lead] + companions, model, model_version)
    except BaseException as exc:
        if reliability.is_transient(exc):
            for job_id in companion_ids:
                reliability.release(job_id)
        elif isinstance(exc, SoftTimeLimitExceeded):
            _fail_all(companion_ids, f"Timed out after {core.settings.TASK_SOFT_TIME_LIMIT} s.")
        else:
            _fail_all(companion_ids, f"{exc.__class__.__name__}: {exc}")
        raise


def _fail_all(job_ids, message: str) -> None:
    from . import tasks as core

    for job_id in job_ids:
        try:
            core._fail(job_id, message)
        except Exception:
            log.exception("Could not mark job %s failed.", job_id)


def _process(jobs, model, model_version) -> None:
    from webapp.db import db
    from webapp.models import Analysis, Image

    from . import tasks as core

    # The claimed jobs and their analyses are this delivery's alone: keep the loaded rows after each
    # commit instead of reloading every attribute with one query each (~40% of a batch's time).
    db.session().expire_on_commit = False
    image_ids = [job.image_id for job in jobs]
    db.session.scalars(select(Image).where(Image.id.in_(image_ids))).all()  # one query, not one per job
    existing = {a.image_id: a for a in db.session.scalars(
        select(Analysis).where(Analysis.image_id.in_(image_ids), Analysis.model_version_id == model_version.id))}
    todo, reused = [], []
    for job in jobs:
        job.model_version = model_version
        analysis = existing.get(job.image_id)
        if analysis is not None and analysis.status == "succeeded":  # results are never overwritten
            job.analysis, job.status, job.finished_at = analysis, "succeeded", core._now()
            reused.append(analysis.id)
            continue
        if analysis is None:
            analysis = Analysis(image_id=job.image_id, model_version=model_version)
            db.session.add(analysis)
            existing[job.image_id] = analysis  # two jobs for one image share the analysis
        analysis.status, analysis.error = "running", None
        job.analysis = analysis
        todo.append(job)
    db.session.commit()

    shap_pending = _predict_and_store(todo, model, model_version) if todo else []
    from . import explain_tasks

    for analysis_id in shap_pending:
        explain_tasks.send(explain_tasks.SHAP_TASK, analysis_id)
    for analysis_id in dict.fromkeys(reused):
        core._queue_explanations(model, analysis_id)


def _decoder_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # created on first use, i.e. after the fork
        _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
    return _pool


def _load(storage_key: str):
    """(pixels or None, seconds, error or None): PNG decoding releases the GIL, so threads overlap."""
    from . import tasks as core

    t0 = time.perf_counter()
    try:
        return core._read_rgb(storage_key), time.perf_counter() - t0, None
    except Exception as exc:
        return None, time.perf_counter() - t0, exc


def _overlay(heatmap):
    """The Grad-CAM colour layer as PNG bytes, or the exception (encoded in the thread pool)."""
    from . import explain_tasks

    try:
        return explain_tasks.gradcam_layer_png(heatmap)
    except Exception as exc:
        return exc


def _predict_and_store(jobs, model, model_version) -> list[int]:
    """Loads, predicts and stores the jobs' analyses (one commit); returns the analyses with SHAP to send."""
    from webapp.db import db

    from . import tasks as core

    # Several jobs may name one image (a repeated upload of the same file): predict it once.
    analyses = list(dict.fromkeys(job.analysis for job in jobs))
    loaded = list(_decoder_pool().map(_load, [a.image.storage_key for a in analyses]))
    for analysis, (_, _, error) in zip(analyses, loaded):
        if error is not None:
            message = f"{error.__class__.__name__}: {error}"
            log.error("Could not read the image of analysis %s: %s", analysis.id, message)
            analysis.status, analysis.error, analysis.finished_at = "failed", message[:4000], core._now()
    ok = [(a, pixels, seconds) for a, (pixels, seconds, error) in zip(analyses, loaded) if error is None]

    shap_pending: list[int] = []
    if ok:
        t0 = time.perf_counter()
        probs, gradcams = predict_batch(model, [pixels for _, pixels, _ in ok], plus_plus=core.settings.GRADCAM_PLUS_PLUS)
        predict_ms = round((time.perf_counter() - t0) * 1000, 1)
        class_names = list(model_version.class_names)
        for i, (analysis, _, seconds) in enumerate(ok):
            if len(probs[i]) != len(class_names):
                raise ValueError(f"The model returned {len(probs[i])} probabilities for {len(class_names)} classes.")
            probabilities = {c: float(p) for c, p in zip(class_names, probs[i])}
            analysis.probabilities = probabilities
            analysis.top_class = max(probabilities, key=probabilities.get)
            # predict_ms: the batched pass this image was part of (len(ok) images).
            analysis.timings = {"load_image_ms": round(seconds * 1000, 1), "predict_ms": predict_ms}
            analysis.status, analysis.finished_at = "succeeded", core._now()
        if gradcams is not None:
            shap_pending = _store_explanations([a for a, _, _ in ok], gradcams, class_names)
        log.info("Predicted %d image(s) in one pass of %.0f ms.", len(ok), predict_ms)

    for job in jobs:
        analysis = job.analysis
        job.finished_at = core._now()
        if analysis.status == "succeeded":
            job.status = "succeeded"
        else:
            job.status, job.error = "failed", analysis.error
    db.session.commit()
    return shap_pending


def _store_explanations(analyses, gradcams, class_names) -> list[int]:
    """The batch's Grad-CAM rows (done, or failed with the reason) and queued SHAP rows for the top
    SHAP_TOP_K classes, as explain_tasks.record_gradcam + queue_followups do per analysis, with one
    query for the existing rows and the PNG layers encoded in the thread pool. The caller commits.

    Returns:
        The ids of the analyses that have queued SHAP rows (their task is sent after the commit).
    """
    from webapp.db import db
    from webapp.models import Explanation

    from . import explain_tasks
    from . import tasks as core

    plus_plus = bool(core.settings.GRADCAM_PLUS_PLUS)
    method = "gradcam++" if plus_plus else "gradcam"
    top_k = int(core.settings.SHAP_TOP_K)
    rows = {(r.image_id, r.method, r.class_name): r for r in db.session.scalars(select(Explanation).where(
        Explanation.image_id.in_([a.image_id for a in analyses]),
        Explanation.model_version_id == analyses[0].model_version_id))}

    def row_for(analysis, kind, class_name, **fields):
        row = rows.get((analysis.image_id, kind, class_name))
        if row is None:
            row = Explanation(analysis=analysis, image_id=analysis.image_id, model_version_id=analysis.model_version_id,
                              method=kind, class_name=class_name, **fields)
            db.session.add(row)
            rows[(analysis.image_id, kind, class_name)] = row
        return row

    overlays = list(_decoder_pool().map(_overlay, [heatmap if error is None else None
                                                   for _, heatmap, error in gradcams]))
    shap_pending = []
    for analysis, (index, heatmap, error), overlay in zip(analyses, gradcams, overlays):
        class_name = class_names[index] if error is None else analysis.top_class
        row = row_for(analysis, method, class_name, attempts=0)
        if row.status != "done":  # never overwritten
            row.attempts, row.started_at = (row.attempts or 0) + 1, core._now()
            if error is None and isinstance(overlay, Exception):
                error = f"{overlay.__class__.__name__}: {overlay}"
            if error is None:
                t0 = time.perf_counter()
                try:
                    explain_tasks.store_explanation(row, analysis.image, heatmap, overlay,
                                                    {"in_prediction_pass": True, "cmap": "jet", "range": [0.0, 1.0]})
                    row.timings = {"store_ms": round((time.perf_counter() - t0) * 1000, 1)}
                except SoftTimeLimitExceeded:
                    raise
                except Exception as exc:
                    log.error("Could not store the Grad-CAM map:\n%s", traceback.format_exc())
                    error = f"{exc.__class__.__name__}: {exc}"
            if error is not None:
                row.status, row.error, row.finished_at = "failed", error[:4000], core._now()
        ranked = sorted(analysis.probabilities, key=analysis.probabilities.get, reverse=True)
        pending = False
        for shap_class in ranked[:top_k]:
            shap_row = row_for(analysis, "shap", shap_class, status="queued",
                               params={"max_evals": int(core.settings.SHAP_MAX_EVALS)})
            pending = pending or shap_row.status == "queued"
        if pending:
            shap_pending.append(analysis)
    db.session.flush()  # ids for the SHAP messages
    return [a.id for a in shap_pending]


# --- SHAP yields to predictions -----------------------------------------------------------------------

class PredictionsWaiting(BaseException):
    """Raised inside a SHAP computation when analyse jobs are waiting: the rows go back to `queued`.

    A BaseException on purpose, like Celery's own control-flow exceptions: the explain task's
    `except Exception` handlers would otherwise mark the rows failed.
    """


def serves_predict() -> bool:
    """Whether this worker consumes the predict queue (unknown -> True)."""
    from webapp.queue import PREDICT_QUEUE

    from . import tasks as core

    try:
        consume_from = core.app.amqp.queues.consume_from
    except Exception:
        return True
    return not consume_from or PREDICT_QUEUE in consume_from


def queued_predictions() -> int:
    """Analyse jobs waiting in the database, or 1 when uploads are still arriving (the newest analyse
    job is younger than EXPLAIN_QUIET_S): a SHAP started between two uploads would hold the CPU for a
    whole model batch before it could notice the next one. 0 when this worker serves no predictions."""
    from sqlalchemy import func

    from webapp.db import db
    from webapp.models import Job

    from . import tasks as core

    if not serves_predict():
        return 0
    # Its own short connection: the SHAP task's session may hold a read transaction, and on SQLite
    # (WAL) that snapshot would never show the jobs uploaded since it began.
    with db.engine.connect() as conn:
        queued = int(conn.execute(select(func.count(Job.id)).where(Job.status == "queued", Job.kind == "analyse")).scalar() or 0)
        if queued:
            return queued
        newest = conn.execute(select(Job.created_at).where(Job.kind == "analyse").order_by(Job.id.desc()).limit(1)).scalar()
    return int(newest is not None and (core._now() - newest).total_seconds() < EXPLAIN_QUIET_S)


def defer_countdown(queued: int) -> float:
    """Seconds before a deferred SHAP task looks again. Each look is a task run (~5 ms), so the wait
    grows with the SHAP tasks waiting (all of them cycle) and with the predictions queued; jittered."""
    import random

    from sqlalchemy import func

    from webapp.db import db
    from webapp.models import Explanation

    from . import tasks as core

    pending = int(db.session.scalar(select(func.count(Explanation.id)).where(
        Explanation.method == "shap", Explanation.status == "queued")) or 0) / max(1, int(core.settings.SHAP_TOP_K))
    return float(min(120.0, 3.0 + 0.1 * pending + 0.05 * queued) + random.uniform(0.0, 2.0))


def should_defer(task) -> int:
    """For a SHAP delivery from the broker: the number of queued predictions it should wait for (0: run)."""
    if getattr(task.request, "called_directly", True):
        return 0
    return queued_predictions()


def defer(task, analysis_id: int, queued: int) -> str:
    """Re-sends the explain task with a countdown (a new message: no retry budget is used)."""
    from webapp.queue import EXPLAIN_QUEUE

    countdown = defer_countdown(queued)
    task.apply_async(args=[analysis_id], queue=EXPLAIN_QUEUE, countdown=countdown)
    log.info("SHAP for analysis %s deferred %.0f s: %d prediction(s) queued.", analysis_id, countdown, queued)
    return "deferred"


def yielding(fn, task, chunk: int | None = None):
    """Wraps a SHAP model function so that it gives way to predictions: each call (SHAP_BATCH_SIZE
    masked images, ~2 s on 2 cores) runs in chunks of PREDICT_BATCH_SIZE, and before each chunk
    it stops (PredictionsWaiting) if analyse jobs wait. A prediction then waits ~0.5 s at most."""
    import numpy as np

    if getattr(task.request, "called_directly", True) or not serves_predict():
        return fn
    chunk = chunk or batch_limit()

    def wrapped(images):
        parts = []
        for i in range(0, len(images), chunk):
            if queued_predictions():
                raise PredictionsWaiting()
            parts.append(np.asarray(fn(images[i:i + chunk])))
        return np.concatenate(parts)

    return wrapped


def requeue_explanations(task, analysis_id: int, row_ids: Sequence[int]) -> str:
    """After PredictionsWaiting: the rows go back to `queued` (the attempt does not count), and the
    task is re-sent with a countdown."""
    from webapp.db import db
    from webapp.models import Explanation

    db.session.rollback()
    db.session.execute(
        update(Explanation).where(Explanation.id.in_(list(row_ids)), Explanation.status == "running")
        .values(status="queued", attempts=Explanation.attempts - 1)
        .execution_options(synchronize_session=False))
    db.session.commit()
    queued = queued_predictions()
    db.session.remove()
    return defer(task, analysis_id, queued)


__all__: list[Any] = ["run_batch", "predict_batch", "warm_up", "bucket_sizes", "PredictionsWaiting"]
