"""No job or explanation is lost or left `running`: claims, transient errors, failures, and the sweep.

Delivery is at least once: `task_acks_late` + `task_reject_on_worker_lost` put a message back when
the process running it dies, the sweep re-sends jobs whose message may be lost, and a retry
re-publishes. So a task may see its job again, or see it twice at once. The job row decides: a
delivery works on a job only after it has *claimed* it, with one conditional UPDATE
(`... WHERE id = :id AND status = :seen AND attempts = :seen_attempts`, `take`), which exactly one
of two racing deliveries wins. Results are stored per (image, model version) under a unique
constraint and never overwritten, so a repeated run adds no rows.

A job found `running` is claimed again only when this delivery is the same message coming back
(`delivery_info.redelivered`: its worker died), a retry of it, or when the job's start is older
than the hard time limit plus a margin (nobody can still be running it). Any other delivery of a
running job is a duplicate and is dropped.

Each claim records the claiming process as `host:pid` (`Job.claimed_by`). A pool process killed in the
middle of a micro-batch leaves the jobs it took along `running` with no message of their own to come
back; the sweep in every worker's main process re-queues such jobs of its own host as soon as their
process is gone (`orphaned`), instead of waiting for the time limit. Host names must therefore be
unique per process namespace (one per container, as Docker gives them).

The sweep (one pass: `sweep_once`, `requeue_orphans`, `sweep_explanations`; the timer thread that
runs them is worker.sweep):

1. **Queued too long.** A job still `queued` SWEEP_QUEUED_AFTER seconds after it was created may
   never have reached the broker (Redis was down at upload: the web app commits the job first and
   gives up publishing after about a second), or its message died with a Redis that had no
   persistence. Its task is sent again, unless a message for it is still in the broker (in the
   queue behind others, or delivered and unacknowledged: `pending_job_ids` reads kombu's Redis
   lists and its `unacked` hash). A Redis key with a TTL (`dermportal:sweep:sent:<id>`,
   10 x SWEEP_QUEUED_AFTER) also limits re-sends to one per job in that time. A duplicate message
   would be harmless anyway (the claim above).
2. **Running too long.** A job `running` for longer than TASK_TIME_LIMIT + SWEEP_RUNNING_MARGIN
   has no live worker: the hard time limit would have ended it. This happens when a whole worker
   (main process included) is killed: its message stays in Redis's `unacked` set until the
   visibility timeout (an hour). The job goes back to `queued` and is sent again, or, once it has
   been started TASK_MAX_ATTEMPTS times, it ends `failed` with the reason.
3. **Its process is gone** (`requeue_orphans`, every pass, in every worker, for its own host): the
   jobs a killed pool process took along into a micro-batch are re-queued (or failed, out of
   attempts) within one interval rather than after TASK_TIME_LIMIT + SWEEP_RUNNING_MARGIN.
4. **Explanation rows** get the same care (`sweep_explanations`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import traceback
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import redis
import redis.exceptions
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import task_failure
from flask import Flask
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError, OperationalError

from webapp.config import Settings
from webapp.db import db
from webapp.models import Analysis, Explanation, Job, utcnow
from webapp.queue import ANALYSE_TASK, PREDICT_QUEUE
from webapp.states import AnalysisStatus, ExplanationMethod, ExplanationStatus, JobKind, JobStatus

from .celery_app import GRADCAM_TASK, SHAP_TASK, current_settings, flask_app, send

log = logging.getLogger(__name__)

EXPLANATION_MAX_ATTEMPTS = 3  # starts of an explanation row before it ends failed
# Job kind -> (task name, queue). Explanations keep their own rows and claims (claim_explanations).
KIND_TASKS = {JobKind.ANALYSE: (ANALYSE_TASK, PREDICT_QUEUE)}
SENT_KEY = "dermportal:sweep:sent:{}"
BATCH = 500  # jobs per pass and kind of problem


# --- errors worth a retry ---------------------------------------------------------------------------

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    ConnectionError,
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    KombuOperationalError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says "try again later": the database or the broker is briefly unavailable."""
    if isinstance(exc, DBAPIError) and getattr(exc, "connection_invalidated", False):
        return True
    return isinstance(exc, TRANSIENT_ERRORS)


def retry_countdown(retries: int) -> float:
    """Exponential backoff: 2, 4, 8, ... seconds, at most 60."""
    return float(min(60, 2 ** (retries + 1)))


class RetryLater(Exception):
    """A transient error put the job back to `queued`; the task retries with `cause`."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


# --- who runs a job ---------------------------------------------------------------------------------


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


def stale_after(settings: Settings) -> timedelta:
    """A job running for longer than this has no live worker: the hard limit would have ended it."""
    return timedelta(seconds=float(settings.TASK_TIME_LIMIT) + float(settings.SWEEP_RUNNING_MARGIN))


# --- claiming, releasing and failing jobs -------------------------------------------------------------


def take(job_id: int, seen_status: str, seen_attempts: int, now: datetime) -> bool:
    """The conditional UPDATE that makes this process the job's owner: `running`, attempts + 1,
    claimed by `worker_identity()`, if status and attempts are still as seen. Not committed.

    Returns:
        Whether this process won the job (another delivery or worker may have taken it first).
    """
    result = db.session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == seen_status, Job.attempts == seen_attempts)
        .values(**_claimed(now))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def _claimed(now: datetime) -> dict:
    """What claiming a job writes, for one job (`take`) or many (`take_queued`)."""
    return {
        "status": JobStatus.RUNNING,
        "attempts": Job.attempts + 1,
        "started_at": now,
        "error": None,
        "claimed_by": worker_identity(),
    }


def take_queued(job_ids: Sequence[int], now: datetime) -> list[int]:
    """`take` for many queued jobs in one UPDATE: each still `queued` (and not out of attempts)
    becomes this process's, exactly as `take` would make it. Not committed.

    Returns:
        The ids this process won (another delivery or worker may have taken some first).
    """
    if not job_ids:
        return []
    result = db.session.execute(
        update(Job)
        .where(
            Job.id.in_(list(job_ids)),
            Job.status == JobStatus.QUEUED,
            Job.attempts < current_settings().TASK_MAX_ATTEMPTS,
        )
        .values(**_claimed(now))
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(row[0] for row in result)


TakeAlong = Callable[[Job, datetime], Any]  # claims further jobs in the lead's transaction (not committed)


def claim(job: Job, request: Any, settings: Settings, now: datetime, take_along: TakeAlong | None = None) -> str | None:
    """Claims `job` for this delivery.

    Args:
        job: the Job row (in the current session).
        request: the task's `self.request` (delivery_info, retries).
        settings: webapp.config.Settings (time limits, TASK_MAX_ATTEMPTS).
        now: the current UTC time.
        take_along: called as `take_along(job, now)` once the job is won, before the commit, to
            claim the jobs of its micro-batch (worker.batching) in the same transaction.

    Returns:
        None when this delivery now owns the job (status running, attempts + 1, committed);
        otherwise the status the task should return without doing anything.
    """
    if job.finished:
        return job.status  # a redelivered or duplicated message: the work is done
    if job.status == JobStatus.RUNNING:
        delivery_info = getattr(request, "delivery_info", None) or {}
        redelivered = bool(delivery_info.get("redelivered"))
        retried = bool(getattr(request, "retries", 0))
        stale = job.started_at is None or now - job.started_at > stale_after(settings)
        if not (redelivered or retried or stale):
            log.info("Job %s is already running in another delivery; dropping this duplicate.", job.id)
            return JobStatus.RUNNING
    if job.attempts >= settings.TASK_MAX_ATTEMPTS:
        job.status, job.finished_at = JobStatus.FAILED, now
        job.error = (
            f"Gave up after {job.attempts} attempts: the worker stopped (killed, out of memory or "
            "restarted) during each."
        )
        db.session.commit()
        return JobStatus.FAILED
    won = take(job.id, job.status, job.attempts, now)
    if won and take_along is not None:
        take_along(job, now)
    db.session.commit()
    db.session.refresh(job)
    if not won:
        log.info("Job %s was claimed by another delivery.", job.id)
        return job.status
    return None


def release(job_id: int) -> None:
    """Puts a job back to `queued` after a transient error (its attempt does not count)."""
    try:
        db.session.rollback()
        db.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
            .values(status=JobStatus.QUEUED, attempts=Job.attempts - 1)
            .execution_options(synchronize_session=False)
        )
        db.session.commit()
    except Exception:  # the database itself may be what is down; the sweep will find the job
        db.session.rollback()
        log.warning("Could not put job %s back to queued.", job_id, exc_info=True)


def fail_job(job_id: int, message: str) -> None:
    """Ends the job (and its analysis, unless that succeeded) `failed` with `message`; a job that
    succeeded (e.g. stored by an earlier pass of the same task) keeps its results."""
    db.session.rollback()
    job = db.session.get(Job, job_id)
    if job is None or job.status == JobStatus.SUCCEEDED:
        return
    job.status, job.error, job.finished_at = JobStatus.FAILED, message[:4000], utcnow()
    if job.analysis_id is not None:
        analysis = db.session.get(Analysis, job.analysis_id)
        if analysis is not None and analysis.status != AnalysisStatus.SUCCEEDED:
            analysis.status, analysis.error, analysis.finished_at = AnalysisStatus.FAILED, message[:4000], utcnow()
    db.session.commit()


def fail_jobs(job_ids: Iterable[int], message: str) -> None:
    """`fail_job` for each; one that cannot be marked is logged, not raised."""
    for job_id in job_ids:
        try:
            fail_job(job_id, message)
        except Exception:
            log.exception("Could not mark job %s failed.", job_id)


def run_job(job_id: int, request: Any, work: Callable[[Job], None], take_along: TakeAlong | None = None) -> str:
    """One delivery of a job's task: claim the job (and, with `take_along`, the rest of its
    micro-batch in the same transaction: `claim`), run `work(job)`, end it `succeeded` or `failed`.

    Never leaves the job `running`: every error but a transient one ends it `failed` with its
    reason (the soft time limit included); a transient error (database or broker briefly
    unavailable) puts it back to `queued`.

    Returns:
        The job's status afterwards, "missing", or "deleted" (its case was deleted meanwhile).

    Raises:
        RetryLater: after a transient error; the task retries with backoff.
    """
    settings = current_settings()
    claimed = False
    try:
        job = db.session.get(Job, job_id)
        if job is None:
            log.warning("Job %s does not exist; nothing to do.", job_id)
            return "missing"
        outcome = claim(job, request, settings, utcnow(), take_along)
        if outcome is not None:
            return outcome
        claimed = True
        work(job)
    except SoftTimeLimitExceeded:
        fail_job(job_id, f"Timed out after {settings.TASK_SOFT_TIME_LIMIT} s.")
    except Exception as exc:
        if not is_transient(exc):
            if job_deleted(job_id):
                log.info("Job %s was deleted with its case while it ran; nothing is stored.", job_id)
            else:
                log.error("Job %s failed:\n%s", job_id, traceback.format_exc())
                fail_job(job_id, f"{exc.__class__.__name__}: {exc}")
        else:
            log.warning("Job %s: transient error, will retry: %s", job_id, exc)
            if claimed:
                release(job_id)
            raise RetryLater(exc) from exc
    finally:
        db.session.remove()
    job = db.session.get(Job, job_id)
    return job.status if job is not None else "deleted"


def job_deleted(job_id: int) -> bool:
    """Whether the job's row is gone (its case was deleted, webapp.cases.deletion): not a failure."""
    db.session.rollback()
    return db.session.scalar(select(Job.id).where(Job.id == job_id)) is None


# --- explanation rows ---------------------------------------------------------------------------------


def _claimable(row: Explanation, now: datetime) -> bool:
    """Queued, or left running by a worker that died longer ago than the hard time limit."""
    if row.status == ExplanationStatus.QUEUED:
        return True
    if row.status != ExplanationStatus.RUNNING or row.started_at is None:
        return False
    return now - row.started_at > timedelta(seconds=current_settings().TASK_TIME_LIMIT)


def claim_explanations(rows: Iterable[Explanation]) -> list[Explanation]:
    """Marks the claimable rows running (attempts + 1) and commits; rows out of attempts end failed.

    Returns:
        The rows this delivery now computes.
    """
    claimed = []
    for row in rows:
        now = utcnow()
        if not _claimable(row, now):
            continue
        if row.attempts >= EXPLANATION_MAX_ATTEMPTS:
            row.status, row.finished_at = ExplanationStatus.FAILED, now
            row.error = f"Gave up after {row.attempts} attempts (the worker stopped during each)."
            continue
        row.status, row.started_at, row.attempts, row.error = ExplanationStatus.RUNNING, now, row.attempts + 1, None
        claimed.append(row)
    db.session.commit()
    return claimed


def fail_explanations(ids: Iterable[int], message: str) -> None:
    """Ends the given rows `failed` with `message`, unless already done."""
    db.session.rollback()
    for row_id in ids:
        row = db.session.get(Explanation, row_id)
        if row is not None and row.status != ExplanationStatus.DONE:
            row.status, row.error, row.finished_at = ExplanationStatus.FAILED, message[:4000], utcnow()
    db.session.commit()


class ImageDeleted(Exception):
    """The image's case was deleted while its explanation was computed: nothing is stored."""


def explanations_deleted(ids: Sequence[int]) -> bool:
    """Whether every one of the rows is gone (deleted with its case, webapp.cases.deletion)."""
    db.session.rollback()
    return db.session.scalar(select(func.count()).select_from(Explanation).where(Explanation.id.in_(ids))) == 0


def run_explanations(ids: Sequence[int], work: Callable[[], None]) -> str:
    """Runs `work()`; any error ends the rows failed with its reason. Returns "done", "failed" or
    "deleted" (the case was deleted meanwhile)."""
    try:
        work()
        return ExplanationStatus.DONE
    except SoftTimeLimitExceeded:
        fail_explanations(ids, f"Timed out after {current_settings().TASK_SOFT_TIME_LIMIT} s.")
    except Exception as exc:
        if isinstance(exc, ImageDeleted) or explanations_deleted(ids):
            log.info("Explanations %s were deleted with their case while computed; nothing is stored.", list(ids))
            return "deleted"
        log.error("Explanation %s failed:\n%s", list(ids), traceback.format_exc())
        fail_explanations(ids, f"{exc.__class__.__name__}: {exc}")
    finally:
        db.session.remove()
    return ExplanationStatus.FAILED


# --- backstops for failures outside a task body -------------------------------------------------------


def _failure_message(exception: BaseException, settings: Settings) -> str:
    if isinstance(exception, TimeLimitExceeded):
        return f"TimeLimitExceeded: stopped by the hard time limit of {settings.TASK_TIME_LIMIT} s."
    return f"{exception.__class__.__name__}: {exception}"


@task_failure.connect
def _mark_failed(sender: Any = None, exception: BaseException | None = None, args: Any = None, **_: Any) -> None:
    """Backstop for failures outside the task body (e.g. the hard time limit killed the process).

    Signal handlers run outside the task's application context, so this one opens its own.
    """
    name = getattr(sender, "name", None)
    if name not in (ANALYSE_TASK, SHAP_TASK, GRADCAM_TASK) or not args:
        return
    try:
        with flask_app().app_context():
            if name == ANALYSE_TASK:
                _mark_job_failed(int(args[0]), exception)
            else:
                _mark_explanations_failed(name, int(args[0]), exception)
            db.session.remove()
    except Exception:
        log.exception("Could not mark %s%s failed.", name, args)


def _mark_job_failed(job_id: int, exception: BaseException) -> None:
    job = db.session.get(Job, job_id)
    if job is None or job.finished:
        return
    if is_transient(exception) or exception.__class__.__name__ in ("Reject", "Retry"):
        release(job.id)  # a retry could not be published: the sweep sends it again
        return
    fail_job(job.id, _failure_message(exception, current_settings()))


def _mark_explanations_failed(name: str, arg: int, exception: BaseException) -> None:
    if name == SHAP_TASK:
        ids = db.session.scalars(
            select(Explanation.id).where(
                Explanation.analysis_id == arg,
                Explanation.method == ExplanationMethod.SHAP,
                Explanation.status == ExplanationStatus.RUNNING,
            )
        ).all()
    else:
        ids = [arg]
    fail_explanations(ids, _failure_message(exception, current_settings()))


# --- the sweep: one pass ------------------------------------------------------------------------------


def connect_redis(settings: Settings) -> redis.Redis:
    """A client of the broker's Redis with the broker's timeouts (for the sweep's guard and lock)."""
    timeout = float(settings.BROKER_TIMEOUT)
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=timeout, socket_timeout=timeout)


def _mark_sent(r: redis.Redis | None, job_id: int, ttl: float) -> bool:
    """True when the job was not re-sent in the last `ttl` seconds (and records this send)."""
    if r is None:
        return True
    try:
        return bool(r.set(SENT_KEY.format(job_id), 1, ex=max(1, int(ttl)), nx=True))
    except Exception:
        return True  # Redis down: the send below fails too, and the next pass tries again


def pending_job_ids(r: redis.Redis | None, queues: Iterable[str]) -> set[int] | None:
    """Job ids with a message waiting in the broker: in a queue list, or delivered and not yet
    acknowledged (kombu's Redis transport keeps those in the `unacked` hash). None when unknown."""
    if r is None:
        return None
    task_names = {t for t, _ in KIND_TASKS.values()}

    def job_ids(payload: bytes | str) -> list[int]:  # a folder's message lists a micro-batch of jobs
        try:
            message = json.loads(payload)
            if isinstance(message, list):  # unacked entries are [message, exchange, routing_key]
                message = message[0]
            if message.get("headers", {}).get("task") not in task_names:
                return []
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            return [int(arg) for arg in json.loads(body)[0]]
        except Exception:
            return []

    try:
        payloads = []
        for queue in queues:  # kombu's priority lists: "q", "q\x06\x163", "q\x06\x166", "q\x06\x169"
            for name in [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]:
                payloads += r.lrange(name, 0, -1)
        payloads += r.hvals("unacked")
    except Exception:
        return None
    return {i for payload in payloads for i in job_ids(payload)}


SendJob = Callable[[str, int, str], Any]  # send(task_name, job_id, queue) -> task id, or None / raises


def sweep_once(
    app: Flask,
    send_job: SendJob,
    settings: Settings | None = None,
    now: datetime | None = None,
    redis_client: redis.Redis | None = None,
) -> dict[str, int]:
    """One pass over stuck jobs.

    Args:
        app: a Flask app (database access).
        send_job: send_job(task_name, job_id, queue) publishes a task; raises or returns None on failure.
        settings: webapp.config.Settings (default: the app's).
        now: the current UTC time (tests).
        redis_client: for the re-send guard (None: no guard).

    Returns:
        Counts: resent (queued jobs sent again), requeued (stale running jobs sent again),
        failed (stale running jobs out of attempts), send_errors.
    """
    settings = settings or app.extensions["settings"]
    now = now or utcnow()
    counts = {"resent": 0, "requeued": 0, "failed": 0, "send_errors": 0}
    with app.app_context():
        try:
            _requeue_stale_running(counts, send_job, settings, now, redis_client)
            _resend_waiting(counts, send_job, settings, now, redis_client)
        finally:
            db.session.remove()
    if any(counts.values()):
        log.info("Sweep: %s", counts)
    return counts


def _requeue_stale_running(
    counts: dict[str, int], send_job: SendJob, settings: Settings, now: datetime, redis_client: redis.Redis | None
) -> None:
    """Running too long: back to queued (or failed), with a conditional update so that a worker
    finishing it at this moment wins."""
    stale = now - stale_after(settings)
    for job in db.session.scalars(
        select(Job)
        .where(Job.status == JobStatus.RUNNING, Job.kind.in_(list(KIND_TASKS)), Job.started_at < stale)
        .limit(BATCH)
    ).all():
        reason = f"attempt {job.attempts} did not finish within {settings.TASK_TIME_LIMIT} s (its worker stopped)"
        _count(counts, _requeue_running(job, reason, send_job, settings, now, redis_client))


def _resend_waiting(
    counts: dict[str, int], send_job: SendJob, settings: Settings, now: datetime, redis_client: redis.Redis | None
) -> None:
    """Queued too long, and no message for it in the broker: sent again (at most once per guard
    period, in case the broker's contents cannot be read)."""
    guard_ttl = 10 * float(settings.SWEEP_QUEUED_AFTER)
    old = now - timedelta(seconds=float(settings.SWEEP_QUEUED_AFTER))
    waiting = db.session.execute(
        select(Job.id, Job.kind)
        .where(Job.status == JobStatus.QUEUED, Job.kind.in_(list(KIND_TASKS)), Job.created_at < old)
        .order_by(Job.id)
        .limit(BATCH)
    ).all()
    pending = pending_job_ids(redis_client, {q for _, q in KIND_TASKS.values()}) if waiting else None
    for job_id, kind in waiting:
        if pending is not None and job_id in pending:
            continue  # its message is in the queue (behind others) or being worked on
        if not _mark_sent(redis_client, job_id, guard_ttl):
            continue
        task, queue = KIND_TASKS[kind]
        if _send(send_job, task, job_id, queue):
            counts["resent"] += 1
            continue
        counts["send_errors"] += 1
        if redis_client is not None:  # let the next pass try again
            try:
                redis_client.delete(SENT_KEY.format(job_id))
            except Exception:
                pass


def requeue_orphans(
    app: Flask,
    send_job: SendJob,
    host: str,
    settings: Settings | None = None,
    now: datetime | None = None,
    redis_client: redis.Redis | None = None,
) -> dict[str, int]:
    """Re-queues (or fails) the `running` jobs claimed by processes of `host` that no longer exist: a
    pool process killed mid-batch (out of memory, kill -9) or a whole worker that was restarted. Each
    worker's main process runs this every interval for its own host, whoever holds the sweep lock:
    only there can the process table answer.

    Returns:
        Counts: requeued, failed, send_errors.
    """
    settings = settings or app.extensions["settings"]
    now = now or utcnow()
    counts = {"requeued": 0, "failed": 0, "send_errors": 0}
    with app.app_context():
        try:
            running = db.session.scalars(
                select(Job)
                .where(
                    Job.status == JobStatus.RUNNING, Job.kind.in_(list(KIND_TASKS)), Job.claimed_by.like(f"{host}:%")
                )
                .limit(BATCH)
            ).all()
            for job in running:
                if orphaned(job.claimed_by, host):
                    reason = f"the process running attempt {job.attempts} ({job.claimed_by}) is gone"
                    _count(counts, _requeue_running(job, reason, send_job, settings, now, redis_client))
        finally:
            db.session.remove()
    if any(counts.values()):
        log.info("Jobs of dead processes: %s", counts)
    return counts


def _requeue_running(
    job: Job, reason: str, send_job: SendJob, settings: Settings, now: datetime, redis_client: redis.Redis | None
) -> str | None:
    """A running job nobody works on any more goes back to `queued` and its task is sent again, or,
    out of attempts, ends `failed`. The update is conditional on the attempt seen, so that a worker
    finishing it at this moment wins. Returns "failed", "requeued", "send_error" or None (lost the race)."""
    if job.attempts >= settings.TASK_MAX_ATTEMPTS:
        values = {
            "status": JobStatus.FAILED,
            "finished_at": now,
            "error": (
                f"Gave up after {job.attempts} attempts: the worker stopped (killed, out of memory or "
                "restarted) during each."
            ),
        }
    else:
        values = {"status": JobStatus.QUEUED, "error": f"Re-queued by the sweep: {reason}."}
    done = db.session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.RUNNING, Job.started_at == job.started_at)
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    db.session.commit()
    if not done:
        return None
    if values["status"] == JobStatus.FAILED:
        return "failed"
    task, queue = KIND_TASKS[job.kind]
    _mark_sent(redis_client, job.id, 10 * float(settings.SWEEP_QUEUED_AFTER))
    return "requeued" if _send(send_job, task, job.id, queue) else "send_error"


def _count(counts: dict[str, int], outcome: str | None) -> None:
    if outcome is not None:
        counts["send_errors" if outcome == "send_error" else outcome] += 1


def _send(send_job: SendJob, task: str, job_id: int, queue: str) -> bool:
    try:
        return send_job(task, job_id, queue) is not None
    except Exception as exc:
        log.warning("Sweep could not send %s(%s): %s", task, job_id, exc)
        return False


def sweep_explanations(
    app: Flask,
    now: datetime | None = None,
    send_fn: Callable[..., Any] | None = None,
    queued_after: float | None = None,
    running_margin: float = 60.0,
) -> dict[str, int]:
    """One pass for the periodic sweep: no explanation stays pending.

    - `running` longer than TASK_TIME_LIMIT + running_margin: its worker died without the
      task_failure backstop (killed with its main process) -> `failed` with the reason.
    - `queued` longer than `queued_after` (default SWEEP_QUEUED_AFTER, else 300 s): its message may
      be lost (broker down when it was sent) -> sent again, at most once per 10 x queued_after
      (`params.resent_at`); a duplicate message is harmless (rows are claimed).

    Args:
        send_fn: send_fn(task_name, *args) publishes a task (default: worker.celery_app.send).

    Returns:
        Counts: failed, resent.
    """
    settings = app.extensions["settings"]
    now = now or utcnow()
    send_fn = send_fn or send
    queued_after = float(queued_after or getattr(settings, "SWEEP_QUEUED_AFTER", 300))
    counts = {"failed": 0, "resent": 0}
    with app.app_context():
        try:
            stale = now - timedelta(seconds=float(settings.TASK_TIME_LIMIT) + running_margin)
            for row in db.session.scalars(
                select(Explanation).where(
                    Explanation.status == ExplanationStatus.RUNNING, Explanation.started_at < stale
                )
            ).all():
                row.status, row.finished_at = ExplanationStatus.FAILED, now
                row.error = (
                    f"Stopped without finishing within {settings.TASK_TIME_LIMIT} s (its worker stopped); "
                    "request it again."
                )
                counts["failed"] += 1
            db.session.commit()
            old = now - timedelta(seconds=queued_after)
            shap_analyses: set[int] = set()
            for row in db.session.scalars(
                select(Explanation).where(Explanation.status == ExplanationStatus.QUEUED, Explanation.created_at < old)
            ).all():
                resent = (row.params or {}).get("resent_at")
                if resent and now - datetime.fromisoformat(resent) < timedelta(seconds=10 * queued_after):
                    continue
                row.params = {**(row.params or {}), "resent_at": now.isoformat()}
                if row.method == ExplanationMethod.SHAP:
                    shap_analyses.add(row.analysis_id)
                else:
                    send_fn(GRADCAM_TASK, row.id)
                counts["resent"] += 1
            db.session.commit()
            for analysis_id in sorted(shap_analyses):
                send_fn(SHAP_TASK, analysis_id)
        finally:
            db.session.remove()
    return counts
