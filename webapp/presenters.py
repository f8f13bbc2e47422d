"""Rows to the dicts that the API returns and the pages render (one representation for both)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .config import DISCLAIMER
from .explanations import explanation_dict, explanations_pending
from .models import Analysis, Case, Job, ModelVersion

UNTRAINED_WARNING = (
    "Untrained model — not a diagnosis: these probabilities come from randomly initialised weights "
    "and mean nothing; they only show that the pipeline runs."
)
STATUS_ORDER = ("running", "queued", "failed", "succeeded")


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def model_dict(mv: ModelVersion) -> dict[str, Any]:
    return {"name": mv.name, "version": mv.version, "trained": mv.trained, "trained_on": mv.trained_on}


def analysis_dict(analysis: Analysis) -> dict[str, Any]:
    mv = analysis.model_version
    names = mv.class_long_names
    d: dict[str, Any] = {
        "id": analysis.id,
        "image_id": analysis.image_id,
        "model": model_dict(mv),
        "status": analysis.status,
    }
    if not mv.trained:
        d["warning"] = UNTRAINED_WARNING
    if analysis.probabilities:
        probs = {c: float(analysis.probabilities.get(c, 0.0)) for c in mv.class_names}
        d.update(
            probabilities=probs,
            class_long_names=names,
            top_class=analysis.top_class,
            top_class_name=names.get(analysis.top_class, analysis.top_class),
            malignant_classes=mv.malignant_classes,
            malignant_probability=analysis.malignant_probability,
            top_class_malignant=analysis.top_class in mv.malignant_classes,
        )
    if analysis.error:
        d["error"] = analysis.error
    d["explanations"] = [explanation_dict(e) for e in analysis.explanations]
    d["timings_ms"] = analysis.timings or {}
    d["finished"] = iso(analysis.finished_at)
    return d


def job_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "image_id": job.image_id,
        "attempts": job.attempts,
        "error": job.error,
        "created": iso(job.created_at),
        "started": iso(job.started_at),
        "finished": iso(job.finished_at),
    }


def latest_jobs(case: Case) -> list[Job]:
    """The most recent job of each kind for each image of the case."""
    latest: dict[tuple[int, str], Job] = {}
    for image in case.images:
        for job in image.jobs:
            latest[(image.id, job.kind)] = job
    return list(latest.values())


def case_status(case: Case) -> str:
    statuses = {job.status for job in latest_jobs(case)}
    for status in STATUS_ORDER:
        if status in statuses:
            return status
    return "queued"


def case_dict(case: Case) -> dict[str, Any]:
    analyses = [a for image in case.images for a in image.analyses]
    return {
        "id": case.id,
        "status": case_status(case),
        "created": iso(case.created_at),
        "age": case.age,
        "sex": case.sex,
        "site": case.site,
        "patient_ref": case.patient_ref,
        "lesion_ref": case.lesion_ref,
        # Research portal: the dataset's reference diagnosis, the batch, the reviews.
        "reference_dx": case.reference_dx,
        "reference_dx_type": case.reference_dx_type,
        "batch_id": case.batch_id,
        "reviews": _reviews(case),
        "images": [
            {"id": im.id, "width": im.width, "height": im.height, "content_hash": im.content_hash,
             "original_filename": im.original_filename}
            for im in case.images
        ],
        "jobs": [job_dict(j) for j in latest_jobs(case)],
        "analyses": [analysis_dict(a) for a in analyses],
        "explanations_pending": explanations_pending(case),
        "disclaimer": DISCLAIMER,
    }


def _reviews(case: Case) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from .caselist import review_dict
    from .db import db
    from .models import Review

    return [review_dict(r) for r in db.session.scalars(select(Review).where(Review.case_id == case.id).order_by(Review.id))]
