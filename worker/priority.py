"""SHAP (the `explain` queue) never delays a prediction.

When a worker serves both queues (make run):
- the Redis transport polls `predict` before `explain` (celery_app: queue_order_strategy=priority);
- `explain_shap` defers itself (re-sent with a countdown) while analyse jobs are queued (`should_defer`,
  `defer`);
- a requested Grad-CAM is sent to the predict queue (webapp.cases.explanations), and a queued
  Grad-CAM row counts as a waiting prediction below, so it never waits behind SHAP;
- a running SHAP computation checks between its model batches and, if analyse jobs arrived, stops
  (`yielding` raises `PredictionsWaiting`), puts its rows back to `queued` and re-sends itself
  (`requeue_explanations`).
A worker that consumes only `explain` (docker compose's explain workers) never defers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from celery import Task
from sqlalchemy import func, select, update

from webapp.db import db
from webapp.models import Explanation, Job, utcnow
from webapp.queue import EXPLAIN_QUEUE, PREDICT_QUEUE
from webapp.states import ExplanationMethod, ExplanationStatus, JobKind, JobStatus

from .celery_app import consumes, current_settings
from .predict import batch_limit

log = logging.getLogger(__name__)

EXPLAIN_QUIET_S = 3.0  # SHAP waits until no upload has arrived for this long


class PredictionsWaiting(BaseException):
    """Raised inside a SHAP computation when analyse jobs are waiting: the rows go back to `queued`.

    A BaseException on purpose, like Celery's own control-flow exceptions: the explain task's
    `except Exception` handlers would otherwise mark the rows failed.
    """


def serves_predict() -> bool:
    """Whether this worker consumes the predict queue (unknown -> True)."""
    return consumes(PREDICT_QUEUE)


def queued_predictions() -> int:
    """Analyse jobs (else requested Grad-CAM maps) waiting in the database, or 1 when uploads are still arriving (the newest analyse
    job is younger than EXPLAIN_QUIET_S): a SHAP started between two uploads would hold the CPU for a
    whole model batch before it could notice the next one. 0 when this worker serves no predictions."""
    if not serves_predict():
        return 0
    # Its own short connection: the SHAP task's session may hold a read transaction, and on SQLite
    # (WAL) that snapshot would never show the jobs uploaded since it began.
    with db.engine.connect() as conn:
        queued = int(
            conn.execute(
                select(func.count(Job.id)).where(Job.status == JobStatus.QUEUED, Job.kind == JobKind.ANALYSE)
            ).scalar()
            or 0
        )
        if queued:
            return queued
        gradcams = int(
            conn.execute(
                select(func.count(Explanation.id)).where(
                    Explanation.status == ExplanationStatus.QUEUED,
                    Explanation.method.in_((ExplanationMethod.GRADCAM, ExplanationMethod.GRADCAM_PLUS_PLUS)),
                )
            ).scalar()
            or 0
        )
        if gradcams:
            return gradcams
        newest = conn.execute(
            select(Job.created_at).where(Job.kind == JobKind.ANALYSE).order_by(Job.id.desc()).limit(1)
        ).scalar()
    return int(newest is not None and (utcnow() - newest).total_seconds() < EXPLAIN_QUIET_S)


def defer_countdown(queued: int) -> float:
    """Seconds before a deferred SHAP task looks again. Each look is a task run (~5 ms), so the wait
    grows with the SHAP messages waiting (all of them cycle; one carries a micro-batch's analyses,
    SHAP_TOP_K explanations each) and with the predictions queued; jittered."""
    pending = int(
        db.session.scalar(
            select(func.count(Explanation.id)).where(
                Explanation.method == ExplanationMethod.SHAP, Explanation.status == ExplanationStatus.QUEUED
            )
        )
        or 0
    )
    settings = current_settings()
    pending_tasks = pending / max(1, int(settings.SHAP_TOP_K) * int(settings.PREDICT_BATCH_SIZE))
    return float(min(120.0, 3.0 + 0.1 * pending_tasks + 0.05 * queued) + random.uniform(0.0, 2.0))


def should_defer(task: Task) -> int:
    """For a SHAP delivery from the broker: the number of queued predictions it should wait for (0: run)."""
    if getattr(task.request, "called_directly", True):
        return 0
    return queued_predictions()


def defer(task: Task, analysis_ids: Sequence[int], queued: int) -> str:
    """Re-sends the explain task for these analyses, as one message, with a countdown (a new
    message: no retry budget is used)."""
    countdown = defer_countdown(queued)
    task.apply_async(args=list(analysis_ids), queue=EXPLAIN_QUEUE, countdown=countdown)
    log.info("SHAP for analyses %s deferred %.0f s: %d prediction(s) queued.", analysis_ids, countdown, queued)
    return "deferred"


def yielding(
    fn: Callable[[np.ndarray], Any], task: Task, chunk: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """Wraps a SHAP model function so that it gives way to predictions: each call (SHAP_BATCH_SIZE
    masked images, ~2 s on 2 cores) runs in chunks of PREDICT_BATCH_SIZE, and before each chunk
    it stops (PredictionsWaiting) if analyse jobs wait. A prediction then waits ~0.5 s at most."""
    if getattr(task.request, "called_directly", True) or not serves_predict():
        return fn
    chunk = chunk or batch_limit()

    def wrapped(images: np.ndarray) -> np.ndarray:
        parts = []
        for i in range(0, len(images), chunk):
            if queued_predictions():
                raise PredictionsWaiting()
            parts.append(np.asarray(fn(images[i : i + chunk])))
        return np.concatenate(parts)

    return wrapped


def requeue_explanations(task: Task, analysis_id: int, row_ids: Sequence[int]) -> str:
    """After PredictionsWaiting: the rows go back to `queued` (the attempt does not count), and the
    task is re-sent with a countdown."""
    db.session.rollback()
    db.session.execute(
        update(Explanation)
        .where(Explanation.id.in_(list(row_ids)), Explanation.status == ExplanationStatus.RUNNING)
        .values(status=ExplanationStatus.QUEUED, attempts=Explanation.attempts - 1)
        .execution_options(synchronize_session=False)
    )
    db.session.commit()
    queued = queued_predictions()
    db.session.remove()
    return defer(task, [analysis_id], queued)
