"""Zip archives decoded here, not in the web request: the `ingest` queue's task.

The web request checks the archive's central directory, stores the archive as uploaded and one
`pending` batch item per image entry (webapp.batches.service.queue_archive). This task reads each
pending entry's raw bytes and hands them, a chunk at a time, to the same `store_files` as a
folder-upload chunk, which refuses a file already stored (the SHA-256 of the raw bytes against
`images.source_hash`, also an earlier entry of this archive) before decoding it. An entry whose
raw bytes equal an entry refused a moment ago gets the same reason without a second decode.

Nothing is lost to a killed worker: each chunk (PREDICT_BATCH_SIZE entries, at most CHUNK_BYTES)
is committed in one transaction (items, cases, images and jobs together), so a kill leaves the
entries of the chunk it was decoding pending, the archive stays stored until no entry is pending,
and the sweep (`sweep_archives`) re-sends the task for a batch whose entries wait with no worker
holding its claim.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import redis
from flask import Flask, current_app
from sqlalchemy import func, select

from webapp.batches.inputs import BatchInputError, open_archive
from webapp.batches.service import archive_key, entry_names, send_jobs, store_files
from webapp.config import Settings
from webapp.db import db
from webapp.imaging import UploadError
from webapp.models import Batch, BatchItem, utcnow
from webapp.queue import INGEST_QUEUE, INGEST_TASK
from webapp.storage import StorageError, storage_from_settings

from .celery_app import current_settings, send
from .recovery import connect_redis, worker_identity

log = logging.getLogger(__name__)

CLAIM_KEY = "dermportal:ingest:{}"  # held (with a TTL) by the process decoding the batch's archive
SENT_KEY = "dermportal:ingest-sent:{}"  # the sweep's last re-send of the batch's task
# Renewed before each entry; one entry (40 MP at most) decodes in well under this, so a claim that
# runs out belongs to a process that is gone.
CLAIM_SECONDS = 300
CHUNK_BYTES = 16 * 1024 * 1024  # uncompressed entries held per transaction, as a browser's chunk


def run_archive(batch_id: int) -> str:
    """Decodes the batch's pending archive entries; returns done, busy, continued or gone.

    Stops after half the soft time limit and sends itself again for the rest, so an archive of
    thousands of entries never meets the task's hard limit.
    """
    batch = db.session.get(Batch, batch_id)
    if batch is None:
        _drop_archive(batch_id)  # the batch was deleted before its entries were decoded
        return "gone"
    claims = _redis()
    if not _claim(claims, batch_id):
        return "busy"  # another process decodes it; the sweep re-sends if that one dies
    try:
        status = _ingest(batch, claims)
    finally:
        _release(claims, batch_id)
    if status == "continued":
        send(INGEST_TASK, batch_id, queue=INGEST_QUEUE)
    return status


def pending_items(batch_id: int) -> list[BatchItem]:
    return list(
        db.session.scalars(
            select(BatchItem).where(BatchItem.batch_id == batch_id, BatchItem.pending).order_by(BatchItem.id)
        )
    )


def _ingest(batch: Batch, claims: redis.Redis | None) -> str:
    items = pending_items(batch.id)
    if not items:
        _drop_archive(batch.id)
        return "done"
    try:
        archive = _open_stored(batch.id)
    except (StorageError, BatchInputError) as exc:
        reason = f"The stored archive could not be read ({exc}); upload it again."
        store_files(batch, [(item.filename, None, reason) for item in items], batch.created_by, items)
        return "done"
    entries = entry_names(archive)
    deadline = time.monotonic() + 0.5 * float(current_settings().TASK_SOFT_TIME_LIMIT)
    refused: dict[str, str] = {}
    for chunk in chunks(items, entries, current_settings().PREDICT_BATCH_SIZE):
        if time.monotonic() > deadline:
            return "continued"
        _renew(claims, batch.id)
        send_jobs(_ingest_chunk(batch, chunk, archive, entries, refused))  # analyses start while later entries decode
    _drop_archive(batch.id)
    return "done"


def chunks(items: list[BatchItem], entries: dict[str, Any], size: int) -> list[list[int]]:
    """The pending items' ids in chunks of at most `size` entries (a micro-batch: one message for
    their jobs) and CHUNK_BYTES of uncompressed entries (a larger entry goes alone)."""
    out: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for item in items:
        info = entries.get(item.filename)
        entry_bytes = info.file_size if info is not None else 0
        if current and (len(current) >= size or current_bytes + entry_bytes > CHUNK_BYTES):
            out.append(current)
            current, current_bytes = [], 0
        current.append(item.id)
        current_bytes += entry_bytes
    return out + [current] if current else out


def _ingest_chunk(
    batch: Batch, item_ids: list[int], archive: Any, entries: dict[str, Any], refused: dict[str, str]
) -> list[int]:
    """The chunk's entries that are still pending through store_files, in one transaction (which
    checks raw bytes against those stored before decoding); returns the jobs to send."""
    items = list(
        db.session.scalars(
            select(BatchItem)
            .where(BatchItem.id.in_(item_ids), BatchItem.pending)  # not decoded by another delivery meanwhile
            .order_by(BatchItem.id)
            .execution_options(populate_existing=True)
        )
    )
    if not items:
        return []
    files = [(item.filename, *_read_entry(archive, entries.get(item.filename), refused)) for item in items]
    stored, job_ids = store_files(batch, files, batch.created_by, items)
    for (_, data, _), item in zip(files, stored, strict=True):
        if data is not None and item.error:
            refused[hashlib.sha256(data).hexdigest()] = item.error
    return job_ids


def _read_entry(archive: Any, info: Any, refused: dict[str, str]) -> tuple[bytes | None, str | None]:
    """An entry's raw bytes, or why there are none; bytes refused a moment ago get the same reason
    without a second decode."""
    if info is None:
        return None, "The entry is missing from the stored archive."
    try:
        data = archive.read(info, int(current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024))
    except UploadError as exc:
        return None, exc.message
    return data, refused.get(hashlib.sha256(data).hexdigest())


def _open_stored(batch_id: int):
    storage = storage_from_settings(current_app.extensions["settings"])
    with storage.open(archive_key(batch_id)) as f:
        data = f.read()  # zipfile seeks; an archive is at most one request (BATCH_MAX_REQUEST_MB)
    return open_archive(io.BytesIO(data), int(current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024))


def _drop_archive(batch_id: int) -> None:
    """Every entry is decoded: the archive is not needed any more (its images are stored)."""
    storage = storage_from_settings(current_app.extensions["settings"])
    try:
        storage.delete(archive_key(batch_id))
    except StorageError:
        pass  # already gone


# --- the claim: one process per archive -------------------------------------------------------


def _redis() -> redis.Redis | None:
    try:
        return connect_redis(current_settings())
    except Exception:
        return None


def _claim(claims: redis.Redis | None, batch_id: int) -> bool:
    if claims is None:
        return True
    try:
        return bool(claims.set(CLAIM_KEY.format(batch_id), worker_identity(), ex=CLAIM_SECONDS, nx=True))
    except redis.RedisError:
        return True  # Redis gone: decode anyway (a second process skips entries no longer pending)


def _renew(claims: redis.Redis | None, batch_id: int) -> None:
    if claims is not None:
        try:
            claims.expire(CLAIM_KEY.format(batch_id), CLAIM_SECONDS)
        except redis.RedisError:
            pass


def _release(claims: redis.Redis | None, batch_id: int) -> None:
    if claims is not None:
        try:
            claims.delete(CLAIM_KEY.format(batch_id))
        except redis.RedisError:
            pass


# --- the sweep ----------------------------------------------------------------------------------


def sweep_archives(
    app: Flask,
    send_task: Callable[[str, int, str], Any],
    settings: Settings,
    redis_client: redis.Redis | None,
    now: datetime | None = None,
) -> dict[str, int]:
    """Re-sends the ingest task of each batch whose entries have waited longer than
    SWEEP_QUEUED_AFTER with no process holding its claim (at most once per 10 such periods)."""
    old = (now or utcnow()) - timedelta(seconds=float(settings.SWEEP_QUEUED_AFTER))
    counts = {"resent": 0, "send_errors": 0}
    with app.app_context():
        batch_ids = db.session.scalars(
            select(BatchItem.batch_id)
            .where(BatchItem.pending, BatchItem.created_at < old)
            .group_by(BatchItem.batch_id)
            .order_by(func.min(BatchItem.id))
            .limit(100)
        ).all()
        db.session.remove()
    for batch_id in batch_ids:
        if not _may_resend(redis_client, batch_id, 10 * float(settings.SWEEP_QUEUED_AFTER)):
            continue
        try:
            send_task(INGEST_TASK, batch_id, INGEST_QUEUE)
            counts["resent"] += 1
        except Exception as exc:
            log.warning("Could not re-send the ingest task of batch %s: %s", batch_id, exc)
            counts["send_errors"] += 1
    return counts


def _may_resend(r: redis.Redis | None, batch_id: int, ttl: float) -> bool:
    if r is None:
        return True
    try:
        if r.exists(CLAIM_KEY.format(batch_id)):
            return False  # a live process is decoding it
        return bool(r.set(SENT_KEY.format(batch_id), 1, ex=max(1, int(ttl)), nx=True))
    except redis.RedisError:
        return True
