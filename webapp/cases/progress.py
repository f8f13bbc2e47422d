"""Where a case's unfinished work stands: its place in the queue, which model version a pending
analysis runs, and whether the worker is still warming its model.

Read by templates/cases/_progress.html (on the case page and in the status answer that
static/case.js polls), so a case that waits says why instead of showing a bare "queued".
"""

from __future__ import annotations

import logging
from typing import Any

from flask import current_app
from sqlalchemy import func, select

from .. import queue
from ..db import db
from ..models import Explanation, Image, Job
from ..states import ExplanationMethod, ExplanationStatus, JobKind, JobStatus

log = logging.getLogger(__name__)
WAITING = (JobStatus.QUEUED, JobStatus.RUNNING)


def queue_place(job: Job) -> tuple[int, int]:
    """(this job's place among the queued jobs of its kind, oldest first; how many are queued).
    (0, n) for a job that is no longer queued."""
    queued = select(func.count(Job.id)).where(Job.kind == job.kind, Job.status == JobStatus.QUEUED)
    total = int(db.session.scalar(queued) or 0)
    if job.status != JobStatus.QUEUED:
        return 0, total
    return int(db.session.scalar(queued.where(Job.id <= job.id)) or 0), total


def shap_place(case_id: int) -> tuple[int, int] | None:
    """(the place of this case's first queued SHAP map among all queued SHAP maps; their number),
    or None when the case has none queued. SHAP runs in the order the rows were created."""
    mine = db.session.scalar(
        select(func.min(Explanation.id))
        .join(Image, Image.id == Explanation.image_id)
        .where(
            Image.case_id == case_id,
            Explanation.method == ExplanationMethod.SHAP,
            Explanation.status == ExplanationStatus.QUEUED,
        )
    )
    if mine is None:
        return None
    queued = select(func.count(Explanation.id)).where(
        Explanation.method == ExplanationMethod.SHAP, Explanation.status == ExplanationStatus.QUEUED
    )
    return int(db.session.scalar(queued.where(Explanation.id <= mine)) or 0), int(db.session.scalar(queued) or 0)


def worker_warm() -> bool | None:
    """Whether any worker process has reported its model loaded and warmed (worker.process); None
    when Redis cannot tell (then the page says nothing rather than guess)."""
    app = current_app
    try:
        return queue.warm_workers(app.config["REDIS_URL"], timeout=min(0.5, app.config["BROKER_TIMEOUT"])) > 0
    except Exception as exc:  # redis raises several connection error types
        log.debug("Could not read the warm workers: %s", exc)
        return None


def case_progress(case_id: int) -> dict[str, Any]:
    """The case's waiting analyses (model version, status, queue place), its queued SHAP maps'
    place, and `warming` (True while jobs wait and no worker process has warmed its model)."""
    jobs = db.session.scalars(
        select(Job)
        .join(Image, Image.id == Job.image_id)
        .where(Image.case_id == case_id, Job.kind == JobKind.ANALYSE, Job.status.in_(WAITING))
        .order_by(Job.id)
    ).all()
    waiting = []
    for job in jobs:
        place, total = queue_place(job)
        mv = job.model_version
        waiting.append(
            {
                "job_id": job.id,
                "status": job.status,
                "model": f"{mv.name} {mv.version}" if mv else "the default model",
                "place": place,
                "queued": total,
            }
        )
    warming = None
    if any(j["status"] == JobStatus.QUEUED for j in waiting):
        warm = worker_warm()
        warming = None if warm is None else not warm
    return {"jobs": waiting, "warming": bool(warming), "shap": shap_place(case_id)}
