"""Folder uploads (a folder sent in chunks, a zip archive or a server-side folder) stored as cases.

One bad image is a per-file error on the batch (a `BatchItem` with `error`), never a failed batch.
A chunk of files is committed in one transaction (its cases, images, jobs and items, one INSERT per
table); each file is checked on its own before, so a bad file is skipped and nothing is
half-stored, and a failed commit removes the chunk's files again (cases.intake.Intake).
A file whose normalised pixels are already stored is linked: its item points at the existing case
and image instead of storing it twice.

A zip archive is only checked from its central directory in the web request (inputs.open_archive),
then stored whole with one `pending` item per image entry; the ingest task (worker.ingest) decodes
the entries through the same `add_file`. Decoding three 36 MP PNGs costs tens of seconds of CPU,
which a 4 KB upload must not take from the web process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from flask import current_app
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from .. import queue
from ..cases.intake import DuplicateImage, Intake, StoredImage, Upload
from ..db import db
from ..imaging import UploadError
from ..models import Analysis, Batch, BatchItem, Explanation, Job, User
from ..queue import ANALYSE_TASK, INGEST_QUEUE, INGEST_TASK, PREDICT_QUEUE
from ..states import ExplanationStatus
from ..storage import check_key, storage_from_settings
from .inputs import (
    IMAGE_EXTENSIONS,
    Archive,
    BatchInputError,
    limit,
    open_archive,
    parse_metadata_csv,
)

log = logging.getLogger(__name__)


# --- storing ----------------------------------------------------------------------------------


def clean_filename(name: str | None) -> str:
    """The relative path as sent (folders kept for the record), without control characters."""
    name = "".join(ch for ch in (name or "") if ch.isprintable()).replace("\\", "/").strip().lstrip("/")
    return (name or "unnamed")[-255:]


def file_stem(name: str) -> str:
    base = PurePosixPath(name).name
    return base.rsplit(".", 1)[0] if "." in base else base


def create_batch(
    user: User | None,
    *,
    source: str,
    name: str | None = None,
    expected_files: int | None = None,
    metadata: dict[str, dict[str, Any]] | None = None,
    metadata_filename: str | None = None,
) -> Batch:
    batch = Batch(
        created_by=user,
        source=source,
        name=(name or "").strip()[:200] or None,
        expected_files=expected_files,
        metadata_rows=metadata,
        metadata_filename=clean_filename(metadata_filename) if metadata_filename else None,
    )
    db.session.add(batch)
    db.session.commit()
    return batch


def _latest_job_ids(image_ids: Iterable[int]) -> dict[int, int]:
    """The newest analyse job of each image, in one query."""
    ids = sorted(set(image_ids))
    if not ids:
        return {}
    query = select(Job.image_id, func.max(Job.id)).where(Job.image_id.in_(ids), Job.kind == "analyse")
    return dict(db.session.execute(query.group_by(Job.image_id)).tuples().all())


File = tuple[str, bytes | None, str | None]  # (filename as sent, bytes, error found before storing)
Outcome = StoredImage | DuplicateImage | str  # what staging one file gave: stored, a duplicate, or an error


def _stage_chunk(intake: Intake, batch: Batch, files: list[File], user: User | None) -> list[Outcome]:
    """Stages the batch's files (`Intake.stage_all`); a bad file gives its error, a duplicate its
    DuplicateImage, and neither adds anything to the session."""
    outcomes: list[Outcome | None] = []
    uploads: list[Upload] = []
    for name, data, error in files:
        filename = clean_filename(name)
        if error is None and not filename.lower().endswith(IMAGE_EXTENSIONS):
            error = "Skipped: not a .jpg, .jpeg or .png file."
        outcomes.append(error)
        if error is None:
            fields = dict((batch.metadata_rows or {}).get(file_stem(filename)) or {})
            uploads.append(Upload(data or b"", PurePosixPath(filename).name[:255], fields))
    staged = iter(intake.stage_all(uploads, user, batch))
    return [outcome if outcome is not None else _outcome(next(staged)) for outcome in outcomes]


def _outcome(staged: StoredImage | UploadError | DuplicateImage) -> Outcome:
    return staged.message if isinstance(staged, UploadError) else staged


def _item_values(outcome: Outcome, latest_jobs: dict[int, int]) -> dict[str, Any]:
    """The batch item's columns for one staged file (after the flush that gave the rows their ids).
    Every column is given, so that all the chunk's items share one INSERT."""
    values: dict[str, Any] = {"case_id": None, "image_id": None, "job_id": None, "duplicate": False, "error": None}
    if isinstance(outcome, str):
        values["error"] = outcome
    elif isinstance(outcome, DuplicateImage):
        image = outcome.image
        values.update(case_id=image.case_id, image_id=image.id, job_id=latest_jobs.get(image.id), duplicate=True)
    else:
        values.update(case_id=outcome.case.id, image_id=outcome.image.id, job_id=outcome.job.id)
    return values


def _store_once(
    batch: Batch, files: list[File], user: User | None, pending: list[BatchItem | None], prune: bool
) -> tuple[list[BatchItem], list[int]]:
    intake = Intake()
    try:
        outcomes = _stage_chunk(intake, batch, files, user)
        db.session.flush()  # one INSERT per table for the whole chunk; ids for the items
        duplicates = [o.image.id for o in outcomes if isinstance(o, DuplicateImage)]
        latest_jobs = _latest_job_ids(duplicates)
        items = []
        for (name, _, _), outcome, item in zip(files, outcomes, pending, strict=True):
            item = item or BatchItem(batch_id=batch.id, filename=clean_filename(name))
            for column, value in _item_values(outcome, latest_jobs).items():
                setattr(item, column, value)
            item.pending = False
            items.append(item)
        db.session.add_all(items)
        if prune:
            prune_metadata(batch)
    except BaseException:
        db.session.rollback()
        intake.remove_unnamed_files()
        raise
    intake.commit()
    return items, [o.job.id for o in outcomes if isinstance(o, StoredImage)]


def store_files(
    batch: Batch,
    files: Iterable[File],
    user: User | None,
    pending: Iterable[BatchItem | None] | None = None,
    prune: bool = False,
) -> tuple[list[BatchItem], list[int]]:
    """Stores files of the batch in one transaction; returns their items and the jobs to send.

    Each file is checked on its own: a bad file becomes an item with `error`, a duplicate (of a
    stored image or of an earlier file of the same call) an item linked to that case; neither
    stores anything. A pending item (an archive entry, worker.ingest) is filled in rather than a new
    one added. When a concurrent request committed one of the images first (a unique constraint),
    the whole call is staged again once, and that file then becomes a duplicate.

    Args:
        pending: per file, its pending item or None (default: None for each).
        prune: drop the metadata rows that no file of the batch uses once every announced file is
            in (`prune_metadata`), in the same transaction.
    """
    files = list(files)
    pending = list(pending) if pending is not None else [None] * len(files)
    try:
        return _store_once(batch, files, user, pending, prune)
    except IntegrityError:
        log.info("A concurrent upload stored one of %d files of batch %s first; storing again.", len(files), batch.id)
        return _store_once(batch, files, user, pending, prune)


def add_file(
    batch: Batch,
    filename: str,
    data: bytes | None,
    user: User | None,
    error: str | None = None,
    item: BatchItem | None = None,
) -> tuple[BatchItem, int | None]:
    """Stores one file of the batch (`store_files` of one); returns its item and the id of the job
    to send (None if none)."""
    (item,), job_ids = store_files(batch, [(filename, data, error)], user, [item])
    return item, (job_ids[0] if job_ids else None)


def send_jobs(job_ids: Iterable[int]) -> int:
    """Sends the committed jobs, one message per PREDICT_BATCH_SIZE jobs (the worker's micro-batch
    takes the jobs its message lists); stops at the first failed publish (the broker is down: the
    jobs stay queued for the sweep, and the upload does not wait a second per file). Returns how
    many jobs were sent."""
    size = current_app.extensions["settings"].PREDICT_BATCH_SIZE
    return queue.send_grouped(ANALYSE_TASK, list(job_ids), size, queue=PREDICT_QUEUE)


def add_files(batch: Batch, files: Iterable[File], user: User | None, prune: bool = False) -> list[BatchItem]:
    """Stores (filename, bytes, error) triples in one transaction (`store_files`), then sends their jobs."""
    session = db.session()
    # The rows committed here are exactly as written: expiring them at the commit would reload the
    # batch, the user and every item with one SELECT each.
    expire_on_commit, session.expire_on_commit = session.expire_on_commit, False
    try:
        items, job_ids = store_files(batch, files, user, prune=prune)
    finally:
        session.expire_on_commit = expire_on_commit
    send_jobs(job_ids)
    return items


# --- zip archives: stored now, decoded by the ingest task ---------------------------------------


def archive_key(batch_id: int) -> str:
    """Where a batch's zip archive waits for the ingest task (deleted once every entry is decoded)."""
    return check_key(f"archives/batch-{int(batch_id)}.zip")


def entry_names(archive: Archive) -> dict[str, Any]:
    """The archive's image entries by the item name each becomes; the ingest task finds an item's
    entry by it, so two entries may not share one.

    Raises:
        BatchInputError: two entries have the same name.
    """
    entries: dict[str, Any] = {}
    for info in archive.images:
        name = clean_filename(info.filename)
        if name in entries:
            raise BatchInputError(f"The archive has the entry {name!r} twice; rename one of them.")
        entries[name] = info
    return entries


def queue_archive(batch: Batch, stream: BinaryIO, archive: Archive) -> list[BatchItem]:
    """Stores the archive as uploaded and one pending item per image entry (one commit), then sends
    the ingest task. Nothing is decoded here; a broker that is down leaves the items pending for
    the sweep (worker.ingest.sweep_archives)."""
    items = [BatchItem(batch_id=batch.id, filename=name, pending=True) for name in entry_names(archive)]
    if items:
        stream.seek(0)
        storage_from_settings(current_app.extensions["settings"]).save(archive_key(batch.id), stream)
    skipped = "Skipped: not a .jpg, .jpeg or .png file."
    items += [BatchItem(batch_id=batch.id, filename=clean_filename(name), error=skipped) for name in archive.other]
    db.session.add_all(items)
    db.session.commit()
    if any(item.pending for item in items):
        queue.send(INGEST_TASK, batch.id, queue=INGEST_QUEUE)
    return items


# --- progress ---------------------------------------------------------------------------------


def item_state(error: str | None, job_status: str | None, pending: bool = False) -> str:
    if pending:
        return "pending"  # an archive entry not yet decoded
    if error:
        return "failed"
    if job_status in (None, "succeeded"):
        return "done"
    return {"failed": "failed", "running": "running"}.get(job_status, "queued")


def explanation_counts(batch_id: int) -> dict[str, int]:
    """Explanation maps (Grad-CAM and SHAP, every model version) of the batch's images, by status."""
    counts = {status.value: 0 for status in ExplanationStatus}
    rows = db.session.execute(
        select(Explanation.status, func.count(Explanation.id))
        .where(Explanation.image_id.in_(select(BatchItem.image_id).where(BatchItem.batch_id == batch_id)))
        .group_by(Explanation.status)
    ).all()
    for status, n in rows:
        counts[status] = int(n)
    return counts


def out_of_distribution_count(batch_id: int) -> int:
    """How many of the batch's analysed images were flagged as not dermoscopy (ml.ood)."""
    query = (
        select(func.count(Analysis.id))
        .join(Job, Job.analysis_id == Analysis.id)
        .join(BatchItem, BatchItem.job_id == Job.id)
        .where(BatchItem.batch_id == batch_id, Analysis.ood_flagged.is_(True))
    )
    return int(db.session.scalar(query) or 0)


def batch_progress(batch: Batch) -> dict[str, Any]:
    """The batch's counts, cases and per-file errors (one query over its items and their jobs)."""
    rows = db.session.execute(
        select(
            BatchItem.filename,
            BatchItem.case_id,
            BatchItem.error,
            BatchItem.duplicate,
            BatchItem.pending,
            Job.status,
            Job.error,
        )
        .outerjoin(Job, Job.id == BatchItem.job_id)
        .where(BatchItem.batch_id == batch.id)
        .order_by(BatchItem.id)
    ).all()
    counts = {"pending": 0, "queued": 0, "running": 0, "done": 0, "failed": 0}
    case_ids: dict[int, None] = {}  # insertion-ordered and O(1) membership: a batch has 10,000s of items
    errors: list[dict[str, str]] = []
    duplicates = 0
    for filename, case_id, error, duplicate, pending, job_status, job_error in rows:
        state = item_state(error, job_status, pending)
        counts[state] += 1
        duplicates += bool(duplicate)
        if case_id is not None:
            case_ids.setdefault(case_id)
        if state == "failed":
            errors.append({"file": filename, "error": error or f"Analysis failed: {job_error or 'unknown error'}"})
    total = len(rows)
    expected = batch.expected_files
    busy = counts["pending"] + counts["queued"] + counts["running"]
    predictions_finished = busy == 0 and (expected is None or total >= expected)
    maps = explanation_counts(batch.id)
    # "Finished" waits for the maps too: SHAP queued behind a batch used to run for many minutes
    # after the page said Finished.
    finished = predictions_finished and maps["queued"] + maps["running"] == 0
    return {
        "id": batch.id,
        "url": f"/api/v1/batches/{batch.id}",
        "name": batch.name,
        "source": batch.source,
        "created": batch.created_at.isoformat() if batch.created_at else None,
        "total": total,
        "expected": expected,
        "counts": counts,
        "duplicates": duplicates,
        "out_of_distribution": out_of_distribution_count(batch.id),
        "explanations": maps,
        "predictions_finished": predictions_finished,
        "finished": finished,
        "metadata_rows": len(batch.metadata_rows or {}),
        "case_ids": list(case_ids),
        "errors": errors,
    }


# --- from a multipart request (API and pages) --------------------------------------------------


def _uploaded_images(request) -> list:
    images = [f for f in request.files.getlist("images") if f and f.filename]
    if len(images) > limit("BATCH_MAX_FILES_PER_REQUEST"):
        raise BatchInputError(
            f"{len(images)} files in one request; send at most {limit('BATCH_MAX_FILES_PER_REQUEST')} per request "
            "(add the rest with POST .../files).",
            413,
        )
    return images


def _image_triples(images) -> Iterator[tuple[str, bytes | None, str | None]]:
    cap = int(current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024)
    for upload in images:
        yield upload.filename, upload.stream.read(cap + 1), None  # process_upload refuses the +1


def batch_from_request(request, user: User, source: str) -> tuple[Batch, list[BatchItem]]:
    """Creates a batch from multipart fields `images` (many), `metadata` (CSV), `archive` (zip),
    `name` and `expected_files`. The CSV and the archive are checked before anything is stored.

    Raises:
        BatchInputError: a bad CSV, a hostile or unreadable archive, too many files.
    """
    images = _uploaded_images(request)
    expected = request.form.get("expected_files", "").strip()
    if expected:
        if not expected.isdigit() or int(expected) > 10_000_000:
            raise BatchInputError("expected_files must be a whole number of files.")
    archive_file = request.files.get("archive")
    archive = None
    if archive_file is not None and archive_file.filename:
        if not archive_file.filename.lower().endswith(".zip"):
            raise BatchInputError("The archive must be a .zip file.", 415)
        archive = open_archive(archive_file.stream, int(current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024))
        entry_names(archive)  # refused before the batch is created
    files = _batch_files(images, archive, expected)
    metadata, metadata_name = None, None
    meta_file = request.files.get("metadata")
    if meta_file is not None and meta_file.filename:
        metadata, metadata_name = (
            parse_metadata_csv(meta_file.stream.read(limit("BATCH_MAX_CSV_BYTES") + 1), files),
            meta_file.filename,
        )
    if metadata is None and archive is not None and archive.metadata_csv is not None:
        metadata, metadata_name = parse_metadata_csv(archive.metadata_csv, files), archive.metadata_name
    name = request.form.get("name") or (archive_file.filename if archive is not None else None)
    batch = create_batch(
        user,
        source="zip" if archive is not None else source,
        name=name,
        expected_files=int(expected) if expected else None,
        metadata=metadata,
        metadata_filename=metadata_name,
    )
    items = add_files(batch, _image_triples(images), user)
    if archive is not None:
        items += queue_archive(batch, archive_file.stream, archive)
    return batch, items


def _batch_files(images: list, archive: Archive | None, expected: str) -> int:
    """How many files a new batch may have metadata rows for: those it announces (expected_files),
    brings (images, archive entries), or one request's worth of chunks to follow."""
    brought = len(images) + (len(archive.images) + len(archive.other) if archive is not None else 0)
    return max(int(expected or 0), brought, limit("BATCH_MAX_FILES_PER_REQUEST"))


def chunk_from_request(request, batch: Batch, user: User) -> list[BatchItem]:
    """Adds the request's `images` to an existing batch in one transaction; the last announced
    chunk drops the metadata rows no file of the batch used."""
    return add_files(batch, _image_triples(_uploaded_images(request)), user, prune=True)


def prune_metadata(batch: Batch) -> None:
    """Once every announced file is in, keeps only the metadata rows of the batch's files (the
    caller commits)."""
    if not batch.metadata_rows or not batch.expected_files:
        return
    names = db.session.scalars(select(BatchItem.filename).where(BatchItem.batch_id == batch.id)).all()
    if len(names) < batch.expected_files:
        return
    stems = {file_stem(name) for name in names}
    batch.metadata_rows = {stem: row for stem, row in batch.metadata_rows.items() if stem in stems}


def items_summary(items: list[BatchItem]) -> dict[str, Any]:
    return {
        "received": len(items),
        "stored": sum(1 for i in items if i.error is None and not i.duplicate and not i.pending),
        "pending": sum(1 for i in items if i.pending),
        "duplicates": sum(1 for i in items if i.duplicate),
        "errors": [{"file": i.filename, "error": i.error} for i in items if i.error],
    }
