"""Claiming a job for one delivery of its task, and the errors worth a retry.

Delivery is at least once: `task_acks_late` + `task_reject_on_worker_lost` put a message back when
the process running it dies, the sweep (worker/sweep.py) re-sends jobs whose message may be lost,
and a retry re-publishes. So a task may see its job again, or see it twice at once. The job row
decides: a delivery works on a job only after it has *claimed* it, with one conditional UPDATE
(`... WHERE id = :id AND status = :seen AND attempts = :seen_attempts`), which exactly one of two
racing deliveries wins. Results are stored per (image, model version) under a unique constraint
and never overwritten, so a repeated run adds no rows.

A job found `running` is claimed again only when this delivery is the same message coming back
(`delivery_info.redelivered`: its worker died), a retry of it, or when the job's start is older
than the hard time limit plus a margin (nobody can still be running it). Any other delivery of a
running job is a duplicate and is dropped.

Each claim records the claiming process as `host:pid` (`Job.claimed_by`). A pool process killed in the
middle of a micro-batch leaves the jobs it took along `running` with no message of their own to come
back; the sweep in every worker's main process re-queues such jobs of its own host as soon as their
process is gone (`orphaned`), instead of waiting for the time limit. Host names must therefore be
unique per process namespace (one per container, as Docker gives them).
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import DBAPIError, OperationalError

log = logging.getLogger(__name__)


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors that say "try again later": the database or the broker is briefly unavailable."""
    errors: list[type[BaseException]] = [OperationalError, ConnectionError, TimeoutError]
    try:
        import redis.exceptions

        errors += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from kombu.exceptions import OperationalError as KombuOperationalError

        errors.append(KombuOperationalError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and getattr(exc, "connection_invalidated", False):
        return True
    return isinstance(exc, transient_errors())


def retry_countdown(retries: int) -> float:
    """Exponential backoff: 2, 4, 8, ... seconds, at most 60."""
    return float(min(60, 2 ** (retries + 1)))


def worker_identity() -> str:
    """This process as `host:pid`, what a claim records."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def orphaned(claimed_by: str | None, host: str) -> bool:
    """Whether a job claimed by `claimed_by` belongs to a process of `host` that no longer exists."""
    if not claimed_by:
        return False
    claim_host, _, pid = claimed_by.rpartition(":")
    return claim_host == host and pid.isdigit() and not process_alive(int(pid))


def stale_after(settings) -> timedelta:
    """A job running for longer than this has no live worker: the hard limit would have ended it."""
    return timedelta(seconds=float(settings.TASK_TIME_LIMIT) + float(settings.SWEEP_RUNNING_MARGIN))


def claim(job, request: Any, settings, now) -> str | None:
    """Claims `job` for this delivery.

    Args:
        job: the Job row (in the current session).
        request: the task's `self.request` (delivery_info, retries).
        settings: webapp.config.Settings (time limits, TASK_MAX_ATTEMPTS).
        now: the current UTC time.

    Returns:
        None when this delivery now owns the job (status running, attempts + 1, committed);
        otherwise the status the task should return without doing anything.
    """
    from webapp.db import db
    from webapp.models import Job

    if job.finished:
        return job.status  # a redelivered or duplicated message: the work is done
    if job.status == "running":
        delivery_info = getattr(request, "delivery_info", None) or {}
        redelivered = bool(delivery_info.get("redelivered"))
        retried = bool(getattr(request, "retries", 0))
        stale = job.started_at is None or now - job.started_at > stale_after(settings)
        if not (redelivered or retried or stale):
            log.info("Job %s is already running in another delivery; dropping this duplicate.", job.id)
            return "running"
    if job.attempts >= settings.TASK_MAX_ATTEMPTS:
        _give_up(job, now)
        return "failed"
    result = db.session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == job.status, Job.attempts == job.attempts)
        .values(status="running", attempts=Job.attempts + 1, started_at=now, error=None,
                claimed_by=worker_identity())
        .execution_options(synchronize_session=False)
    )
    db.session.commit()
    db.session.refresh(job)
    if result.rowcount != 1:
        log.info("Job %s was claimed by another delivery.", job.id)
        return job.status
    return None


def _give_up(job, now) -> None:
    from webapp.db import db

    job.status, job.finished_at = "failed", now
    job.error = (f"Gave up after {job.attempts} attempts: the worker stopped (killed, out of memory or "
                 "restarted) during each.")
    db.session.commit()


def release(job_id: int) -> None:
    """Puts a job back to `queued` after a transient error (its attempt does not count)."""
    from webapp.db import db
    from webapp.models import Job

    try:
        db.session.rollback()
        db.session.execute(
            update(Job).where(Job.id == job_id, Job.status == "running")
            .values(status="queued", attempts=Job.attempts - 1)
            .execution_options(synchronize_session=False)
        )
        db.session.commit()
    except Exception:  # the database itself may be what is down; the sweep will find the job
        db.session.rollback()
        log.warning("Could not put job %s back to queued.", job_id, exc_info=True)
