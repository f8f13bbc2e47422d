"""Folder uploads (a folder sent in chunks, a zip archive or a server-side folder) stored as cases.

One bad image is a per-file error on the batch (a `BatchItem` with `error`), never a failed batch.
Each file is committed on its own (case, image, job and item together), so nothing is half-stored.
A file whose normalised pixels are already stored is linked: its item points at the existing case
and image instead of storing it twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath
from typing import Any

from flask import current_app
from sqlalchemy import func, select

from .. import queue
from ..cases.intake import DuplicateImage, store_image
from ..db import db
from ..imaging import UploadError
from ..models import Batch, BatchItem, Image, Job, User
from ..queue import ANALYSE_TASK, PREDICT_QUEUE
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


def _latest_job_id(image_id: int) -> int | None:
    return db.session.scalar(select(func.max(Job.id)).where(Job.image_id == image_id, Job.kind == "analyse"))


def _link_duplicate(batch: Batch, filename: str, image: Image) -> BatchItem:
    item = BatchItem(
        batch_id=batch.id,
        filename=filename,
        case_id=image.case_id,
        image_id=image.id,
        job_id=_latest_job_id(image.id),
        duplicate=True,
    )
    db.session.add(item)
    db.session.commit()
    return item


def _error_item(batch: Batch, filename: str, message: str) -> BatchItem:
    item = BatchItem(batch_id=batch.id, filename=filename, error=message)
    db.session.add(item)
    db.session.commit()
    return item


def add_file(
    batch: Batch, filename: str, data: bytes | None, user: User | None, error: str | None = None
) -> tuple[BatchItem, int | None]:
    """Stores one file of the batch; returns its item and the id of the job to send (None if none).

    A bad file becomes an item with `error`; a duplicate an item linked to the existing case.
    """
    filename = clean_filename(filename)
    if error is None and not filename.lower().endswith(IMAGE_EXTENSIONS):
        error = "Skipped: not a .jpg, .jpeg or .png file."
    if error is not None:
        return _error_item(batch, filename, error), None
    fields = dict((batch.metadata_rows or {}).get(file_stem(filename)) or {})
    try:
        stored = store_image(data or b"", PurePosixPath(filename).name[:255], fields, user, batch, filename)
    except UploadError as exc:
        return _error_item(batch, filename, exc.message), None
    except DuplicateImage as exc:
        return _link_duplicate(batch, filename, exc.image), None
    return stored.item, stored.job.id


def send_jobs(job_ids: Iterable[int]) -> int:
    """Sends the committed jobs, one message per PREDICT_BATCH_SIZE jobs (the worker's micro-batch
    takes the jobs its message lists); stops at the first failed publish (the broker is down: the
    jobs stay queued for the sweep, and the upload does not wait a second per file). Returns how
    many jobs were sent."""
    size = current_app.extensions["settings"].PREDICT_BATCH_SIZE
    return queue.send_grouped(ANALYSE_TASK, list(job_ids), size, queue=PREDICT_QUEUE)


def add_files(
    batch: Batch, files: Iterable[tuple[str, bytes | None, str | None]], user: User | None
) -> list[BatchItem]:
    """Stores (filename, bytes, error) triples one by one (a commit each), then sends their jobs."""
    items, job_ids = [], []
    session = db.session()
    # The rows committed here are exactly as written: expiring them at each commit would reload the
    # batch, the user and every item with one SELECT each (a third of an upload's time in profiles).
    expire_on_commit, session.expire_on_commit = session.expire_on_commit, False
    try:
        for filename, data, error in files:
            item, job_id = add_file(batch, filename, data, user, error)
            items.append(item)
            if job_id is not None:
                job_ids.append(job_id)
    finally:
        session.expire_on_commit = expire_on_commit
    send_jobs(job_ids)
    return items


def archive_files(archive: Archive) -> Iterator[tuple[str, bytes | None, str | None]]:
    cap = int(current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024)
    for info in archive.images:
        try:
            yield info.filename, archive.read(info, cap), None
        except UploadError as exc:
            yield info.filename, None, exc.message
    for name in archive.other:
        yield name, None, "Skipped: not a .jpg, .jpeg or .png file."


# --- progress ---------------------------------------------------------------------------------


def item_state(error: str | None, job_status: str | None) -> str:
    if error:
        return "failed"
    if job_status in (None, "succeeded"):
        return "done"
    return {"failed": "failed", "running": "running"}.get(job_status, "queued")


def batch_progress(batch: Batch) -> dict[str, Any]:
    """The batch's counts, cases and per-file errors (one query over its items and their jobs)."""
    rows = db.session.execute(
        select(BatchItem.filename, BatchItem.case_id, BatchItem.error, BatchItem.duplicate, Job.status, Job.error)
        .outerjoin(Job, Job.id == BatchItem.job_id)
        .where(BatchItem.batch_id == batch.id)
        .order_by(BatchItem.id)
    ).all()
    counts = {"queued": 0, "running": 0, "done": 0, "failed": 0}
    case_ids: list[int] = []
    errors: list[dict[str, str]] = []
    duplicates = 0
    for filename, case_id, error, duplicate, job_status, job_error in rows:
        state = item_state(error, job_status)
        counts[state] += 1
        duplicates += bool(duplicate)
        if case_id is not None and case_id not in case_ids:
            case_ids.append(case_id)
        if state == "failed":
            errors.append({"file": filename, "error": error or f"Analysis failed: {job_error or 'unknown error'}"})
    total = len(rows)
    expected = batch.expected_files
    finished = counts["queued"] == 0 and counts["running"] == 0 and (expected is None or total >= expected)
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
        "finished": finished,
        "metadata_rows": len(batch.metadata_rows or {}),
        "case_ids": case_ids,
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
        items += add_files(batch, archive_files(archive), user)
    return batch, items


def _batch_files(images: list, archive: Archive | None, expected: str) -> int:
    """How many files a new batch may have metadata rows for: those it announces (expected_files),
    brings (images, archive entries), or one request's worth of chunks to follow."""
    brought = len(images) + (len(archive.images) + len(archive.other) if archive is not None else 0)
    return max(int(expected or 0), brought, limit("BATCH_MAX_FILES_PER_REQUEST"))


def chunk_from_request(request, batch: Batch, user: User) -> list[BatchItem]:
    """Adds the request's `images` to an existing batch; the last announced chunk drops the
    metadata rows no file of the batch used."""
    items = add_files(batch, _image_triples(_uploaded_images(request)), user)
    prune_metadata(batch)
    return items


def prune_metadata(batch: Batch) -> None:
    """Once every announced file is in, keeps only the metadata rows of the batch's files."""
    if not batch.metadata_rows or not batch.expected_files:
        return
    names = db.session.scalars(select(BatchItem.filename).where(BatchItem.batch_id == batch.id)).all()
    if len(names) < batch.expected_files:
        return
    stems = {file_stem(name) for name in names}
    batch.metadata_rows = {stem: row for stem, row in batch.metadata_rows.items() if stem in stems}
    db.session.commit()


def items_summary(items: list[BatchItem]) -> dict[str, Any]:
    return {
        "received": len(items),
        "stored": sum(1 for i in items if i.error is None and not i.duplicate),
        "duplicates": sum(1 for i in items if i.duplicate),
        "errors": [{"file": i.filename, "error": i.error} for i in items if i.error],
    }
