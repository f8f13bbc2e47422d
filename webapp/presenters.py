"""Rows to the dicts that the API returns and the pages render (one representation for both)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import url_for
from sqlalchemy import select

from .config import DISCLAIMER
from .db import db
from .models import Analysis, Case, Explanation, Job, ModelVersion, Review
from .states import ExplanationStatus, JobStatus

UNTRAINED_WARNING = (
    "Untrained model — not a diagnosis: these probabilities come from randomly initialised weights "
    "and mean nothing; they only show that the pipeline runs."
)
STATUS_ORDER = (JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.FAILED, JobStatus.SUCCEEDED)
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "shap": "SHAP"}


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


ARGMAX_RULE = "The top class is the class with the highest probability."


INPUTS = {
    False: "the image alone",
    True: "the image with the case's age, sex and anatomical site (the version's metadata head)",
}


def top_class_rule(mv: ModelVersion, metadata_used: bool = False) -> str:
    """The one sentence saying how this version's top class is chosen (from its artifact's manifest);
    with metadata, the metadata head's own decision chose it."""
    manifest = mv.manifest or {}
    source = (manifest.get("fusion") or {}) if metadata_used else manifest
    return (source.get("decision") or {}).get("description") or ARGMAX_RULE


def model_dict(mv: ModelVersion, metadata_used: bool = False) -> dict[str, Any]:
    """The version that answered and how: its name, training, decision rule and inputs."""
    return {
        "name": mv.name,
        "version": mv.version,
        "trained": mv.trained,
        "trained_on": mv.trained_on,
        "top_class_rule": top_class_rule(mv, metadata_used),
        "inputs": INPUTS[bool(metadata_used)],
    }


def out_of_distribution(analysis: Analysis) -> dict[str, Any] | None:
    """The out-of-distribution verdict of the prediction pass (ml.ood): flagged when the image looks
    unlike the dermoscopy the model was trained on; None for an analysis without one (stored before
    the verdict existed, or by a model version without a detector)."""
    if analysis.ood_score is None:
        return None
    threshold = (analysis.model_version.manifest.get("ood") or {}).get("threshold")
    return {
        "flagged": bool(analysis.ood_flagged),
        "score": round(float(analysis.ood_score), 4),
        "threshold": None if threshold is None else round(float(threshold), 4),
    }


def analysis_dict(analysis: Analysis) -> dict[str, Any]:
    mv = analysis.model_version
    names = mv.class_long_names
    d: dict[str, Any] = {
        "id": analysis.id,
        "image_id": analysis.image_id,
        "model": model_dict(mv, analysis.metadata_used),
        "metadata_used": bool(analysis.metadata_used),
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
    d["out_of_distribution"] = out_of_distribution(analysis)
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
    return JobStatus.QUEUED


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
            {
                "id": im.id,
                "width": im.width,
                "height": im.height,
                "content_hash": im.content_hash,
                "original_filename": im.original_filename,
                "url": url_for("cases.stored_file", key=im.storage_key),  # session or bearer token
            }
            for im in case.images
        ],
        "jobs": [job_dict(j) for j in latest_jobs(case)],
        "analyses": [analysis_dict(a) for a in analyses],
        "explanations_pending": explanations_pending(case),
        "disclaimer": DISCLAIMER,
    }


def _reviews(case: Case) -> list[dict[str, Any]]:
    return [
        review_dict(r) for r in db.session.scalars(select(Review).where(Review.case_id == case.id).order_by(Review.id))
    ]


def review_dict(review: Review, email: str | None = None) -> dict[str, Any]:
    return {
        "id": review.id,
        "reviewer": email if email is not None else (review.reviewer.email if review.reviewer else None),
        "diagnosis": review.diagnosis,
        "agrees_with_model": review.agrees_with_model,
        "confidence": review.confidence,
        "notes": review.notes,
        "analysis_id": review.analysis_id,
        "created": iso(review.created_at),
        "updated": iso(review.updated_at),
    }


def explanation_dict(e: Explanation) -> dict[str, Any]:
    """The API/page representation; `url`/`raw_url` are set once the maps are stored (status done)."""
    done = e.status == ExplanationStatus.DONE and e.overlay_key and e.raw_key
    case_id = e.image.case_id
    d: dict[str, Any] = {
        "id": e.id,
        "method": e.method,
        "method_label": METHOD_LABELS.get(e.method, e.method),
        "class": e.class_name,
        "class_name": e.model_version.class_long_names.get(e.class_name, e.class_name),
        "status": e.status,
        "url": url_for("explanations.overlay", case_id=case_id, explanation_id=e.id) if done else None,
        "raw_url": url_for("explanations.raw", case_id=case_id, explanation_id=e.id) if done else None,
        "model": {"name": e.model_version.name, "version": e.model_version.version, "trained": e.model_version.trained},
        "params": e.params or {},
        "timings_ms": e.timings or {},
        "attempts": e.attempts,
        "created": e.created_at.isoformat() if e.created_at else None,
        "finished": e.finished_at.isoformat() if e.finished_at else None,
    }
    if e.error:
        d["error"] = e.error
    return d


def explanations_pending(case: Case) -> bool:
    return any(e.pending for im in case.images for a in im.analyses for e in a.explanations)
