"""Model versions: registering an artifact, and re-running cases with another version.

Re-runs are new jobs that carry the target version. Results stand side by side: an image that already has a succeeded analysis by that version, or a
job for it still waiting, is skipped; nothing is overwritten. The worker loads the version's
artifact (`model_versions.artifact_path`) for such jobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from .. import audit
from ..batches.service import send_jobs
from ..cases.listing import conditions
from ..db import db
from ..models import Analysis, BatchItem, Case, Image, Job, ModelVersion, User
from ..states import AnalysisStatus, JobKind, JobStatus

MAX_RERUN_IMAGES = 100_000


class RerunError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


def register_model_version(manifest: dict[str, Any], artifact_path: str | Path | None) -> ModelVersion:
    """The ModelVersion row of the manifest's (name, version), created on first sight.

    `artifact_path` is where a re-run with this version finds the artifact (None for the untrained
    model, which is rebuilt from its manifest); a known version gets the new path.

    Raises:
        KeyError, TypeError: for a manifest without name, version or class names.
    """
    name, version = str(manifest["name"]), str(manifest["version"])
    query = select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    row = db.session.scalar(query)
    if row is None:
        row = ModelVersion(
            name=name,
            version=version,
            trained=bool(manifest.get("trained")),
            trained_on=manifest.get("trained_on"),
            class_names=list(manifest["class_names"]),
            manifest=_jsonable(manifest),
        )
        db.session.add(row)
    path = str(Path(artifact_path).resolve()) if artifact_path else row.artifact_path
    if row.id is not None and row.artifact_path == path:
        return row  # known and unchanged: no transaction of its own (the worker asks once per micro-batch)
    row.artifact_path = path
    try:
        db.session.commit()
    except IntegrityError:  # another process registered it first
        db.session.rollback()
        row = db.session.scalar(query)
    return row


def _jsonable(value: Any) -> Any:
    """The manifest as plain JSON (NumPy arrays and other objects turned into lists and strings)."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def model_version_or_error(value: Any) -> ModelVersion:
    try:
        mv = db.session.get(ModelVersion, int(value))
    except (TypeError, ValueError):
        mv = None
    if mv is None:
        raise RerunError("Choose a registered model version (model_version_id).")
    return mv


def rerun_images(image_ids_query, mv: ModelVersion, user: User, scope: dict[str, Any]) -> dict[str, Any]:
    """Queues one analyse job per image of the selection that has no result (or pending job) for `mv`."""
    image_ids = list(db.session.scalars(image_ids_query.limit(MAX_RERUN_IMAGES + 1)))
    if len(image_ids) > MAX_RERUN_IMAGES:
        raise RerunError(f"The selection has more than {MAX_RERUN_IMAGES} images; narrow the filters.")
    done: set[int] = set()
    for start in range(0, len(image_ids), 500):
        chunk = image_ids[start : start + 500]
        done.update(
            db.session.scalars(
                select(Analysis.image_id).where(
                    Analysis.model_version_id == mv.id,
                    Analysis.status == AnalysisStatus.SUCCEEDED,
                    Analysis.image_id.in_(chunk),
                )
            )
        )
        done.update(
            db.session.scalars(
                select(Job.image_id).where(
                    Job.model_version_id == mv.id,
                    Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)),
                    Job.image_id.in_(chunk),
                )
            )
        )
    todo = [i for i in image_ids if i not in done]
    jobs = [Job(kind=JobKind.ANALYSE, status=JobStatus.QUEUED, image_id=i, model_version_id=mv.id) for i in todo]
    db.session.add_all(jobs)
    summary = {
        "model_version_id": mv.id,
        "model": f"{mv.name} {mv.version}",
        "images": len(image_ids),
        "queued": len(jobs),
        "skipped": len(image_ids) - len(jobs),
        **scope,
    }
    audit.record("rerun", "model_version", mv.id, user=user, case_id=scope.get("case_id"), new=summary)
    db.session.commit()
    summary["sent"] = send_jobs(j.id for j in jobs)
    return summary


def rerun_case(case_id: int, mv: ModelVersion, user: User) -> dict[str, Any]:
    return rerun_images(
        select(Image.id).where(Image.case_id == case_id).order_by(Image.id), mv, user, {"case_id": case_id}
    )


def rerun_batch(batch_id: int, mv: ModelVersion, user: User) -> dict[str, Any]:
    query = (
        select(Image.id)
        .where(Image.id.in_(select(BatchItem.image_id).where(BatchItem.batch_id == batch_id)))
        .order_by(Image.id)
    )
    return rerun_images(query, mv, user, {"batch_id": batch_id})


def rerun_filtered(filters, mv: ModelVersion, user: User) -> dict[str, Any]:
    query = (
        select(Image.id).where(Image.case_id.in_(select(Case.id).where(*conditions(filters, user)))).order_by(Image.id)
    )
    return rerun_images(query, mv, user, {"filters": filters.query_args(cursor="")})


def versions_with_counts() -> list[tuple[ModelVersion, int]]:
    """Every model version, oldest first, with its number of succeeded analyses."""
    return db.session.execute(
        select(ModelVersion, func.count(Analysis.id))
        .outerjoin(
            Analysis,
            (Analysis.model_version_id == ModelVersion.id) & (Analysis.status == AnalysisStatus.SUCCEEDED),
        )
        .group_by(ModelVersion.id)
        .order_by(ModelVersion.id)
    ).all()
