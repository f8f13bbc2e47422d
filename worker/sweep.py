"""The periodic sweep: no job is left behind by a broker outage or a dead worker.

Every SWEEP_INTERVAL seconds, one pass (`sweep_once`):

1. **Queued too long.** A job still `queued` SWEEP_QUEUED_AFTER seconds after it was created may
   never have reached the broker (Redis was down at upload: the web app commits the job first and
   gives up publishing after about a second), or its message died with a Redis that had no
   persistence. Its task is sent again, unless a message for it is still in the broker (in the
   queue behind others, or delivered and unacknowledged: `pending_job_ids` reads kombu's Redis
   lists and its `unacked` hash). A Redis key with a TTL (`dermportal:sweep:sent:<id>`,
   10 x SWEEP_QUEUED_AFTER) also limits re-sends to one per job in that time. A duplicate message
   would be harmless anyway (worker.reliability).
2. **Running too long.** A job `running` for longer than TASK_TIME_LIMIT + SWEEP_RUNNING_MARGIN
   has no live worker: the hard time limit would have ended it. This happens when a whole worker
   (main process included) is killed: its message stays in Redis's `unacked` set until the
   visibility timeout (an hour). The job goes back to `queued` and is sent again, or, once it has
   been started TASK_MAX_ATTEMPTS times, it ends `failed` with the reason.
3. **Its process is gone** (`requeue_orphans`, every pass, in every worker, for its own host). Each
   claim records `host:pid` (`Job.claimed_by`). When a pool process dies in the middle of a
   micro-batch, Celery redelivers the message it was running, but the jobs it took along have no
   message of their own to come back: their rows say `running` for a process that no longer exists.
   They are re-queued (or failed, out of attempts) within one interval rather than after
   TASK_TIME_LIMIT + SWEEP_RUNNING_MARGIN. The same holds after a whole worker on this host was killed
   and started again.

Where it runs, and why: a daemon thread in each Celery worker's *main* process, started by the
`worker_ready` signal and stopped by `worker_shutdown`. It needs no extra process or container
(celery beat would be one more service to run exactly once, with its own schedule file; `-B` is
not meant for more than one worker), it runs wherever a worker runs (`make run`, docker compose,
the tests), and the main process never loads TensorFlow, so a sweep costs milliseconds. With
several workers (predict and explain containers), a Redis lock (`SET NX EX`) lets one sweep run
per interval. `python -m worker.sweep` runs one pass by hand.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta
from typing import Any, Callable

from sqlalchemy import select, update

log = logging.getLogger(__name__)

# Job kind -> (task name, queue). The explain work keeps its own rows and claims (worker.explain_tasks).
KIND_TASKS = {"analyse": ("worker.tasks.analyse", "predict")}
LOCK_KEY = "dermportal:sweep:lock"
SENT_KEY = "dermportal:sweep:sent:{}"
BATCH = 500  # jobs per pass and kind of problem


def _redis(settings):
    import redis

    timeout = float(settings.BROKER_TIMEOUT)
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=timeout, socket_timeout=timeout)


def _mark_sent(r, job_id: int, ttl: float) -> bool:
    """True when the job was not re-sent in the last `ttl` seconds (and records this send)."""
    if r is None:
        return True
    try:
        return bool(r.set(SENT_KEY.format(job_id), 1, ex=max(1, int(ttl)), nx=True))
    except Exception:
        return True  # Redis down: the send below fails too, and the next pass tries again


def pending_job_ids(r, queues) -> set[int] | None:
    """Job ids with a message waiting in the broker: in a queue list, or delivered and not yet
    acknowledged (kombu's Redis transport keeps those in the `unacked` hash). None when unknown."""
    import base64
    import json

    if r is None:
        return None

    def job_id(payload) -> int | None:
        try:
            message = json.loads(payload)
            if isinstance(message, list):  # unacked entries are [message, exchange, routing_key]
                message = message[0]
            if message.get("headers", {}).get("task") not in {t for t, _ in KIND_TASKS.values()}:
                return None
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            return int(args[0])
        except Exception:
            return None

    try:
        payloads = []
        for queue in queues:  # kombu's priority lists: "q", "q\x06\x163", "q\x06\x166", "q\x06\x169"
            for name in [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]:
                payloads += r.lrange(name, 0, -1)
        payloads += r.hvals("unacked")
    except Exception:
        return None
    return {i for i in map(job_id, payloads) if i is not None}


def sweep_once(app, send: Callable[[str, int, str], Any], settings=None, now=None, redis_client=None) -> dict[str, int]:
    """One pass over stuck jobs.

    Args:
        app: a Flask app (database access).
        send: send(task_name, job_id, queue) publishes a task; raises or returns None on failure.
        settings: webapp.config.Settings (default: the app's).
        now: the current UTC time (tests).
        redis_client: for the re-send guard (None: no guard).

    Returns:
        Counts: resent (queued jobs sent again), requeued (stale running jobs sent again),
        failed (stale running jobs out of attempts), send_errors.
    """
    from webapp.db import db
    from webapp.models import Job, utcnow

    settings = settings or app.extensions["settings"]
    now = now or utcnow()
    counts = {"resent": 0, "requeued": 0, "failed": 0, "send_errors": 0}
    kinds = list(KIND_TASKS)
    guard_ttl = 10 * float(settings.SWEEP_QUEUED_AFTER)
    with app.app_context():
        try:
            # 2. running too long: back to queued (or failed), with a conditional update so that a
            # worker finishing it at this moment wins.
            stale = now - timedelta(seconds=float(settings.TASK_TIME_LIMIT) + float(settings.SWEEP_RUNNING_MARGIN))
            for job in db.session.scalars(select(Job).where(
                    Job.status == "running", Job.kind.in_(kinds), Job.started_at < stale).limit(BATCH)).all():
                reason = f"attempt {job.attempts} did not finish within {settings.TASK_TIME_LIMIT} s (its worker stopped)"
                _count(counts, _requeue_running(job, reason, send, settings, now, redis_client))

            # 1. queued too long, and no message for it in the broker: send again (at most once per
            # guard_ttl, in case the broker's contents cannot be read).
            old = now - timedelta(seconds=float(settings.SWEEP_QUEUED_AFTER))
            waiting = db.session.execute(select(Job.id, Job.kind).where(
                Job.status == "queued", Job.kind.in_(kinds), Job.created_at < old).order_by(Job.id).limit(BATCH)).all()
            pending = pending_job_ids(redis_client, {q for _, q in KIND_TASKS.values()}) if waiting else None
            for job_id, kind in waiting:
                if pending is not None and job_id in pending:
                    continue  # its message is in the queue (behind others) or being worked on
                if not _mark_sent(redis_client, job_id, guard_ttl):
                    continue
                task, queue = KIND_TASKS[kind]
                if _send(send, task, job_id, queue):
                    counts["resent"] += 1
                else:
                    counts["send_errors"] += 1
                    if redis_client is not None:  # let the next pass try again
                        try:
                            redis_client.delete(SENT_KEY.format(job_id))
                        except Exception:
                            pass
        finally:
            db.session.remove()
    if any(counts.values()):
        log.info("Sweep: %s", counts)
    return counts


def requeue_orphans(app, send: Callable[[str, int, str], Any], host: str, settings=None, now=None,
                    redis_client=None) -> dict[str, int]:
    """Re-queues (or fails) the `running` jobs claimed by processes of `host` that no longer exist: a
    pool process killed mid-batch (out of memory, kill -9) or a whole worker that was restarted. Each
    worker's main process runs this every interval for its own host, whoever holds the sweep lock:
    only there can the process table answer.

    Returns counts: requeued, failed, send_errors.
    """
    from webapp.db import db
    from webapp.models import Job, utcnow

    from .reliability import orphaned

    settings = settings or app.extensions["settings"]
    now = now or utcnow()
    counts = {"requeued": 0, "failed": 0, "send_errors": 0}
    with app.app_context():
        try:
            running = db.session.scalars(select(Job).where(
                Job.status == "running", Job.kind.in_(list(KIND_TASKS)), Job.claimed_by.like(f"{host}:%"))
                .limit(BATCH)).all()
            for job in running:
                if orphaned(job.claimed_by, host):
                    reason = f"the process running attempt {job.attempts} ({job.claimed_by}) is gone"
                    _count(counts, _requeue_running(job, reason, send, settings, now, redis_client))
        finally:
            db.session.remove()
    if any(counts.values()):
        log.info("Jobs of dead processes: %s", counts)
    return counts


def _requeue_running(job, reason: str, send, settings, now, redis_client) -> str | None:
    """A running job nobody works on any more goes back to `queued` and its task is sent again, or,
    out of attempts, ends `failed`. The update is conditional on the attempt seen, so that a worker
    finishing it at this moment wins. Returns "failed", "requeued", "send_error" or None (lost the race)."""
    from webapp.db import db
    from webapp.models import Job

    if job.attempts >= settings.TASK_MAX_ATTEMPTS:
        values = {"status": "failed", "finished_at": now, "error": (
            f"Gave up after {job.attempts} attempts: the worker stopped (killed, out of memory or "
            "restarted) during each.")}
    else:
        values = {"status": "queued", "error": f"Re-queued by the sweep: {reason}."}
    done = db.session.execute(
        update(Job).where(Job.id == job.id, Job.status == "running", Job.started_at == job.started_at)
        .values(**values).execution_options(synchronize_session=False)).rowcount
    db.session.commit()
    if not done:
        return None
    if values["status"] == "failed":
        return "failed"
    task, queue = KIND_TASKS[job.kind]
    _mark_sent(redis_client, job.id, 10 * float(settings.SWEEP_QUEUED_AFTER))
    return "requeued" if _send(send, task, job.id, queue) else "send_error"


def _count(counts: dict[str, int], outcome: str | None) -> None:
    if outcome is not None:
        counts["send_errors" if outcome == "send_error" else outcome] += 1


def _send(send, task: str, job_id: int, queue: str) -> bool:
    try:
        return send(task, job_id, queue) is not None
    except Exception as exc:
        log.warning("Sweep could not send %s(%s): %s", task, job_id, exc)
        return False


class Sweeper:
    """The timer thread in the worker's main process."""

    def __init__(self, celery_app, settings, interval: float | None = None):
        self.celery_app, self.settings = celery_app, settings
        self.interval = float(settings.SWEEP_INTERVAL if interval is None else interval)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self._flask_app = None
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    def send(self, task: str, job_id: int, queue: str):
        return self.celery_app.send_task(task, args=[job_id], queue=queue).id

    def run_once(self) -> dict[str, int] | None:
        if self._flask_app is None:
            from webapp import create_app

            self._flask_app = create_app()
        try:
            r = _redis(self.settings)
            r.ping()
        except Exception:
            r = None  # Redis down: sweep anyway (the job checks need only the database)
        orphans = requeue_orphans(self._flask_app, self.send, socket.gethostname(), self.settings, redis_client=r)
        # One sweep per interval across all workers.
        if r is not None and not self._take_lock(r):
            return {f"orphans_{k}": v for k, v in orphans.items()}
        counts = sweep_once(self._flask_app, self.send, self.settings, redis_client=r)
        counts.update({f"orphans_{k}": v for k, v in orphans.items()})
        counts.update({f"explanations_{k}": v for k, v in self._sweep_explanations().items()})
        return counts

    def _take_lock(self, r) -> bool:
        try:
            return bool(r.set(LOCK_KEY, self.identity, ex=max(1, int(self.interval * 0.8)), nx=True))
        except Exception:
            return True

    def _sweep_explanations(self) -> dict[str, int]:
        """Explanation rows (SHAP, Grad-CAM on request) get the same care as prediction jobs."""
        from .explain_tasks import sweep_explanations

        return sweep_explanations(self._flask_app, queued_after=self.settings.SWEEP_QUEUED_AFTER)

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.run_once()
            except Exception:
                log.exception("The sweep failed; it runs again in %.0f s.", self.interval)

    def start(self) -> None:
        if self.interval <= 0 or self.thread is not None:
            return
        self.thread = threading.Thread(target=self._loop, name="dermportal-sweep", daemon=True)
        self.thread.start()
        log.info("Sweep every %.0f s (queued > %.0f s re-sent; running > %.0f s re-queued).", self.interval,
                 self.settings.SWEEP_QUEUED_AFTER, self.settings.TASK_TIME_LIMIT + self.settings.SWEEP_RUNNING_MARGIN)

    def stop(self) -> None:
        self.stopped.set()


_sweeper: Sweeper | None = None


def _connect_signals() -> None:
    from celery.signals import worker_ready, worker_shutdown

    @worker_ready.connect(weak=False)
    def _start(sender=None, **_: Any) -> None:
        global _sweeper
        from .celery_app import app, settings

        _sweeper = Sweeper(app, settings)
        _sweeper.start()

    @worker_shutdown.connect(weak=False)
    def _stop(**_: Any) -> None:
        if _sweeper is not None:
            _sweeper.stop()


_connect_signals()


def main() -> None:
    """`python -m worker.sweep`: one pass now, printing what it did."""
    logging.basicConfig(level=logging.INFO)
    from .celery_app import app, settings

    sweeper = Sweeper(app, settings, interval=1)
    print(sweeper.run_once())


if __name__ == "__main__":
    main()
