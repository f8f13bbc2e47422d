"""Deleting a case or a whole batch on request (a participant withdraws consent): one service that
the pages, the API and the command line call.

What goes: the cases with everything that hangs off them (images, jobs, analyses, explanations,
reviews and the audit entries about them, through ON DELETE CASCADE), the batch items that name
the cases together with their metadata rows, and, after the commit, the stored images and
explanation maps that no remaining row refers to. What stays: one audit entry saying who deleted
what, when and why, with ids, counts and content hashes only, never the patient data itself
(no references, ages, sites, file names or notes).

Queued work is cancelled by removing its rows: a message still in the broker then finds no job
and ends at once ("missing"). The job rows hold no Celery task id, so there is nothing to revoke.

A worker may be analysing the case at that moment. Both sides lock the image rows first
(`lock_images`), so a deletion waits for a worker that is storing its results and then removes
them as well, and a worker that comes second finds the rows gone and stores nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from sqlalchemy import Select, delete, func, select, update

from .. import audit
from ..batches.service import file_stem
from ..db import db
from ..models import Batch, BatchItem, Case, Explanation, Image, Job, Review, User
from ..states import ExplanationStatus, JobStatus
from ..storage import Storage, storage_from_settings

REASON_MIN, REASON_MAX = 3, 500
DELETE_ROLE = "admin"


class DeletionError(ValueError):
    """A deletion that cannot be done; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Deletion:
    """What one deletion removed (what its audit entry records, plus the file counts)."""

    entity: str
    entity_id: int
    case_ids: list[int]
    counts: dict[str, int]
    audit_id: int
    files_removed: int = 0
    files_kept: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "deleted": self.entity,
            "id": self.entity_id,
            "case_ids": self.case_ids,
            "counts": self.counts,
            "files_removed": self.files_removed,
            "files_kept": self.files_kept,
            "audit_id": self.audit_id,
        }


@dataclass
class _Doomed:
    """The rows a deletion removes, read after their image rows were locked."""

    case_ids: list[int]
    content_hashes: list[str] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)


# --- checks ------------------------------------------------------------------------------------------


def check_reason(reason: Any) -> str:
    """The reason as stored: stripped, 3-500 printable characters.

    Raises:
        DeletionError: 400 when it is missing, too short or too long.
    """
    text = " ".join(str(reason or "").split())
    if len(text) < REASON_MIN:
        raise DeletionError(400, f"reason is required: say why in at least {REASON_MIN} characters.")
    if len(text) > REASON_MAX or not text.isprintable():
        raise DeletionError(400, f"reason must be at most {REASON_MAX} printable characters.")
    return text


def check_actor(actor: User | None) -> User:
    """Only an active admin deletes (pages, API and CLI all pass through here).

    Raises:
        DeletionError: 403 for anyone else.
    """
    if actor is None or not actor.active or actor.role != DELETE_ROLE:
        role = actor.role if actor is not None else "nobody"
        raise DeletionError(403, f"Only an admin may delete cases; you are {role}.")
    return actor


def check_confirmed(form: Any) -> None:
    """A page's delete form carries a ticked "I understand" box (the API and CLI ask otherwise).

    Raises:
        DeletionError: 400 when it is not ticked.
    """
    if str(form.get("confirm", "")).strip().lower() not in ("yes", "on", "true", "1"):
        raise DeletionError(400, "Tick the box that confirms the deletion: it cannot be undone.")


# --- locking -----------------------------------------------------------------------------------------


def _lock(where: Any) -> set[int]:
    """Locks the image rows matching `where` until the transaction ends; returns their ids.

    A no-op UPDATE rather than SELECT ... FOR UPDATE: SQLite ignores FOR UPDATE, but any write takes
    its one write lock, and on PostgreSQL the UPDATE locks the rows.
    """
    rows = db.session.execute(
        update(Image)
        .where(where)
        .values(width=Image.width)
        .returning(Image.id)
        .execution_options(synchronize_session=False)
    )
    return {row[0] for row in rows}


def lock_images(image_ids: Iterable[int]) -> set[int]:
    """Locks the image rows until the session's transaction ends; returns the ids still there.

    The worker calls this before it stores results, the deletion before it reads what to remove, so
    the two never interleave: whichever comes second sees what the first committed.
    """
    ids = sorted(set(image_ids))
    return _lock(Image.id.in_(ids)) if ids else set()


def _lock_batch(batch_id: int) -> bool:
    """Locks the batch row (uploads into it wait), and, on SQLite, the database; whether it exists."""
    db.session.execute(select(Batch.id).where(Batch.id == batch_id).with_for_update())
    result = db.session.execute(
        update(Batch).where(Batch.id == batch_id).values(name=Batch.name).execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


# --- what goes -----------------------------------------------------------------------------------------


def _collect(cases: Select) -> _Doomed:
    """Locks the images of `cases` (a SELECT of case ids: no id list, however large the batch) and
    reads what the deletion removes (ids, hashes, keys, counts)."""
    _lock(Image.case_id.in_(cases))
    doomed = _Doomed(list(db.session.scalars(cases.order_by(Case.id))))
    images = db.session.execute(
        select(Image.content_hash, Image.storage_key).where(Image.case_id.in_(cases)).order_by(Image.id)
    ).all()
    doomed.content_hashes = [row.content_hash for row in images]
    doomed.keys = {row.storage_key for row in images}
    of_images = select(Image.id).where(Image.case_id.in_(cases))
    maps = db.session.execute(
        select(Explanation.raw_key, Explanation.overlay_key, Explanation.status).where(
            Explanation.image_id.in_(of_images)
        )
    ).all()
    doomed.keys |= {key for raw, overlay, _ in maps for key in (raw, overlay) if key}
    jobs = db.session.execute(select(Job.status, func.count()).where(Job.image_id.in_(of_images)).group_by(Job.status))
    by_status = dict(jobs.tuples().all())
    reviews = db.session.scalar(select(func.count()).select_from(Review).where(Review.case_id.in_(cases)))
    doomed.counts = {
        "cases": len(doomed.case_ids),
        "images": len(images),
        "jobs": sum(by_status.values()),
        "jobs_cancelled": by_status.get(JobStatus.QUEUED, 0) + by_status.get(JobStatus.RUNNING, 0),
        "explanations": len(maps),
        "explanations_cancelled": sum(1 for *_, status in maps if ExplanationStatus(status).pending),
        "reviews": reviews or 0,
    }
    return doomed


def _drop_items(cases: Select) -> int:
    """Removes the batch items that name the cases (their own, and duplicates linked from other
    batches), each one's metadata row, and one announced file per item, so that each batch's
    progress adds up and can still finish. Returns how many items went."""
    items = db.session.execute(select(BatchItem.batch_id, BatchItem.filename).where(BatchItem.case_id.in_(cases))).all()
    for batch_id in {item.batch_id for item in items}:
        batch = db.session.get(Batch, batch_id)
        mine = [item for item in items if item.batch_id == batch_id]
        stems = {file_stem(item.filename) for item in mine}
        if batch.metadata_rows:
            batch.metadata_rows = {k: v for k, v in batch.metadata_rows.items() if k not in stems}
        if batch.expected_files is not None:
            batch.expected_files = max(0, batch.expected_files - len(mine))
    db.session.execute(
        delete(BatchItem).where(BatchItem.case_id.in_(cases)).execution_options(synchronize_session=False)
    )
    return len(items)


def _delete(entity: str, entity_id: int, cases: Select, doomed: _Doomed, actor: User, reason: str) -> Deletion:
    """Deletes the cases, records the audit entry and commits; then removes the files nobody holds."""
    started = time.time()
    doomed.counts["batch_items"] = _drop_items(cases)
    db.session.execute(delete(Case).where(Case.id.in_(cases)).execution_options(synchronize_session=False))
    if entity == "batch":
        db.session.execute(delete(Batch).where(Batch.id == entity_id).execution_options(synchronize_session=False))
    audit_id = _audit(entity, entity_id, doomed, actor, reason)
    db.session.commit()
    removed, kept = _remove_unreferenced(doomed.keys, started)
    return Deletion(entity, entity_id, doomed.case_ids, doomed.counts, audit_id, removed, kept)


def _audit(entity: str, entity_id: int, doomed: _Doomed, actor: User, reason: str) -> int:
    """The deletion's audit entry (flushed, not committed): ids, hashes and counts, no patient data."""
    entry = audit.record(
        f"{entity}.delete",
        entity,
        entity_id,
        user=actor,
        # case_id stays empty: the audit entries of a case are deleted with it (ON DELETE CASCADE).
        new={
            "reason": reason,
            "case_ids": doomed.case_ids,
            "content_hashes": doomed.content_hashes,
            "counts": doomed.counts,
        },
    )
    db.session.flush()
    return entry.id


# --- files ----------------------------------------------------------------------------------------------

KEYS_PER_QUERY = 500


def _still_held(keys: list[str]) -> set[str]:
    """The keys that a remaining image or explanation row still names (a few queries per 500 keys)."""
    held: set[str] = set()
    for start in range(0, len(keys), KEYS_PER_QUERY):
        chunk = keys[start : start + KEYS_PER_QUERY]
        for column in (Image.storage_key, Explanation.raw_key, Explanation.overlay_key):
            held.update(db.session.scalars(select(column).where(column.in_(chunk)).distinct()))
    return held


def _rewritten_since(storage: Storage, key: str, started: float) -> bool:
    """Whether the object was written again after the deletion began: the same image uploaded anew
    (saved before its row is committed), whose file must stay."""
    modified = storage.modified(key)
    return modified is not None and modified >= started


def _remove_unreferenced(keys: Iterable[str], started: float) -> tuple[int, int]:
    """Deletes the stored objects that no row refers to any more (after the commit: a failed
    commit must leave every file in place). Returns (removed, kept)."""
    storage = storage_from_settings(current_app.extensions["settings"])
    keys = sorted(keys)
    held = _still_held(keys)
    removed = kept = 0
    for key in keys:
        if key in held or _rewritten_since(storage, key, started):
            kept += 1
            continue
        if storage.exists(key):
            storage.delete(key)
            removed += 1
    return removed, kept


# --- the two deletions ------------------------------------------------------------------------------------


def delete_case(case_id: int, actor: User | None, reason: Any) -> Deletion:
    """Deletes one case (with its images, results, reviews and files) and audits it.

    Raises:
        DeletionError: 403 (not an admin), 400 (no reason), 404 (no such case).
    """
    actor, reason = check_actor(actor), check_reason(reason)
    cases = select(Case.id).where(Case.id == case_id)
    doomed = _collect(cases)
    if not doomed.case_ids:  # read after the lock: a case deleted meanwhile is gone here too
        db.session.rollback()
        raise DeletionError(404, f"No case with id {case_id}.")
    return _delete("case", case_id, cases, doomed, actor, reason)


def delete_batch(batch_id: int, actor: User | None, reason: Any) -> Deletion:
    """Deletes a batch with every case it created (cases it merely linked as duplicates stay: they
    belong to other uploads), and audits it.

    Raises:
        DeletionError: 403 (not an admin), 400 (no reason), 404 (no such batch).
    """
    actor, reason = check_actor(actor), check_reason(reason)
    if not _lock_batch(batch_id):
        db.session.rollback()
        raise DeletionError(404, f"No batch with id {batch_id}.")
    cases = select(Case.id).where(Case.batch_id == batch_id)
    doomed = _collect(cases)
    doomed.counts["batch_items_total"] = db.session.scalar(
        select(func.count()).select_from(BatchItem).where(BatchItem.batch_id == batch_id)
    )
    return _delete("batch", batch_id, cases, doomed, actor, reason)


__all__ = [
    "Deletion",
    "DeletionError",
    "check_actor",
    "check_confirmed",
    "check_reason",
    "delete_batch",
    "delete_case",
    "lock_images",
]
