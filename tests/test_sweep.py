"""worker/recovery.py (claims and the sweep) without processes: which jobs are re-sent, re-queued or
failed, and how a delivery claims its job."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from types import SimpleNamespace

import pytest

from webapp.db import db
from webapp.models import Case, Image, Job, utcnow


@pytest.fixture
def make_job(app):
    counter = iter(range(1000))

    def make(status="queued", age=0.0, started_age=None, attempts=0, claimed_by=None) -> int:
        with app.app_context():
            n = next(counter)
            case = Case()
            image = Image(case=case, content_hash=f"{n:064x}", storage_key=f"images/k{n}.png", width=1, height=1)
            job = Job(
                image=image,
                status=status,
                attempts=attempts,
                claimed_by=claimed_by,
                created_at=utcnow() - timedelta(seconds=age),
            )
            if started_age is not None:
                job.started_at = utcnow() - timedelta(seconds=started_age)
            db.session.add_all([case, image, job])
            db.session.commit()
            return job.id

    return make


def status_of(app, job_id):
    with app.app_context():
        job = db.session.get(Job, job_id)
        return job.status, job.attempts, job.error


def run_sweep(app, sent, send=None, **overrides):
    """One sweep pass with short limits; `send` replaces the recorder of sent tasks (a broker that fails)."""
    from dataclasses import replace

    from worker.recovery import sweep_once

    settings = replace(
        app.extensions["settings"],
        TASK_TIME_LIMIT=30,
        TASK_SOFT_TIME_LIMIT=20,
        SWEEP_QUEUED_AFTER=10,
        SWEEP_RUNNING_MARGIN=5,
        **overrides,
    )
    send = send or (lambda task, job_id, queue: sent.append((task, job_id, queue)) or "id")
    return sweep_once(app, send, settings)


def test_sweep_resends_old_queued_jobs_only(app, make_job):
    fresh, old = make_job(age=1), make_job(age=60)
    done = make_job(status="succeeded", age=60)
    sent: list = []
    counts = run_sweep(app, sent)
    assert sent == [("worker.tasks.analyse", old, "predict")]
    assert counts["resent"] == 1
    assert status_of(app, fresh)[0] == "queued" and status_of(app, done)[0] == "succeeded"


def test_sweep_requeues_a_job_whose_worker_died_and_fails_it_after_max_attempts(app, make_job):
    alive = make_job(status="running", started_age=20, attempts=1)  # within 30 + 5 s
    dead = make_job(status="running", started_age=60, attempts=1)
    exhausted = make_job(status="running", started_age=60, attempts=3)
    sent: list = []
    counts = run_sweep(app, sent)
    assert counts == {"resent": 0, "requeued": 1, "failed": 1, "send_errors": 0}
    assert sent == [("worker.tasks.analyse", dead, "predict")]
    assert status_of(app, alive)[0] == "running"
    status, attempts, error = status_of(app, dead)
    assert status == "queued" and attempts == 1 and "Re-queued by the sweep" in error
    status, attempts, error = status_of(app, exhausted)
    assert status == "failed" and "Gave up after 3 attempts" in error


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_jobs_of_a_dead_process_on_this_host_are_requeued_at_once(app, make_job):
    import os
    import socket
    from dataclasses import replace

    from worker.recovery import requeue_orphans

    host, gone = socket.gethostname(), dead_pid()
    orphan = make_job(status="running", started_age=1, attempts=1, claimed_by=f"{host}:{gone}")
    exhausted = make_job(status="running", started_age=1, attempts=3, claimed_by=f"{host}:{gone}")
    alive = make_job(status="running", started_age=1, attempts=1, claimed_by=f"{host}:{os.getpid()}")
    elsewhere = make_job(status="running", started_age=1, attempts=1, claimed_by=f"other-host:{gone}")
    unknown = make_job(status="running", started_age=1, attempts=1)
    sent: list = []
    settings = replace(app.extensions["settings"], TASK_TIME_LIMIT=3600)
    counts = requeue_orphans(
        app, lambda task, job_id, queue: sent.append((task, job_id, queue)) or "id", host, settings
    )
    assert counts == {"requeued": 1, "failed": 1, "send_errors": 0}
    assert sent == [("worker.tasks.analyse", orphan, "predict")]
    status, attempts, error = status_of(app, orphan)
    assert (status, attempts) == ("queued", 1) and f"{host}:{gone}" in error and "is gone" in error
    assert status_of(app, exhausted)[0] == "failed"
    for job in (alive, elsewhere, unknown):  # a live process, another host's process table, no record
        assert status_of(app, job)[0] == "running"


def test_orphaned_reads_host_and_pid():
    import os

    from worker.recovery import orphaned

    gone = dead_pid()
    assert orphaned(f"h:{gone}", "h") and orphaned(f"a:b:{gone}", "a:b")
    assert not orphaned(f"h:{os.getpid()}", "h")
    assert not orphaned(f"h:{gone}", "other") and not orphaned(None, "h") and not orphaned("h:x", "h")


def test_a_broker_that_is_down_loses_no_job_and_the_next_pass_sends_them(app, make_job):
    waiting = make_job(age=60)
    stale = make_job(status="running", age=90, started_age=60, attempts=1)

    def down(task, job_id, queue):
        raise ConnectionError("redis is down")

    counts = run_sweep(app, [], send=down)
    # Three tries: the waiting job, the stale one when re-queued, and the stale one again as a waiting
    # job of the same pass (without Redis there is no re-send guard to stop that second try).
    assert counts == {"resent": 0, "requeued": 0, "failed": 0, "send_errors": 3}
    assert status_of(app, waiting) == ("queued", 0, None)
    status, attempts, error = status_of(app, stale)  # back in the queue in the database, attempt kept
    assert (status, attempts) == ("queued", 1) and "Re-queued by the sweep" in error
    sent: list = []
    counts = run_sweep(app, sent)  # the broker is back
    assert counts == {"resent": 2, "requeued": 0, "failed": 0, "send_errors": 0}
    assert sorted(sent) == [("worker.tasks.analyse", waiting, "predict"), ("worker.tasks.analyse", stale, "predict")]


def test_pending_job_ids_reads_queues_and_unacked():
    from worker.recovery import pending_job_ids

    def message(*job_ids):
        body = base64.b64encode(json.dumps([list(job_ids), {}, {}]).encode()).decode()
        return json.dumps(
            {"body": body, "headers": {"task": "worker.tasks.analyse"}, "properties": {"body_encoding": "base64"}}
        )

    class FakeRedis:
        def lrange(self, name, start, end):
            return [message(4), message(5), b"not json"] if name == "predict" else []

        def hvals(self, name):
            # A folder's message lists its micro-batch: every job it names has a message.
            return [json.dumps([json.loads(message(9, 10, 11)), "", "predict"])]

    assert pending_job_ids(FakeRedis(), {"predict"}) == {4, 5, 9, 10, 11}
    assert pending_job_ids(None, {"predict"}) is None


# --- claims ------------------------------------------------------------------------------------------


def claim(app, job_id, redelivered=False, retries=0, **settings_overrides):
    from dataclasses import replace

    from worker.recovery import claim as claim_job

    settings = replace(
        app.extensions["settings"],
        TASK_TIME_LIMIT=30,
        TASK_SOFT_TIME_LIMIT=20,
        SWEEP_RUNNING_MARGIN=5,
        **settings_overrides,
    )
    request = SimpleNamespace(delivery_info={"redelivered": redelivered}, retries=retries)
    with app.app_context():
        return claim_job(db.session.get(Job, job_id), request, settings, utcnow())


def test_a_queued_job_is_claimed_once(app, make_job):
    from worker.recovery import worker_identity

    job = make_job()
    assert claim(app, job) is None
    assert status_of(app, job)[:2] == ("running", 1)
    with app.app_context():
        assert db.session.get(Job, job).claimed_by == worker_identity()
    assert claim(app, job) == "running"  # a duplicate message while it runs: dropped
    assert status_of(app, job)[:2] == ("running", 1)


def test_a_redelivered_or_retried_message_takes_the_running_job_again(app, make_job):
    job = make_job(status="running", started_age=1, attempts=1)
    assert claim(app, job, redelivered=True) is None
    assert status_of(app, job)[:2] == ("running", 2)
    assert claim(app, job, retries=1) is None
    assert status_of(app, job)[:2] == ("running", 3)
    assert claim(app, job, redelivered=True) == "failed"
    status, attempts, error = status_of(app, job)
    assert (status, attempts) == ("failed", 3) and "Gave up after 3 attempts" in error


def test_a_finished_job_is_left_alone(app, make_job):
    job = make_job(status="succeeded")
    assert claim(app, job, redelivered=True) == "succeeded"


def test_transient_errors_are_recognised():
    from sqlalchemy.exc import IntegrityError, OperationalError

    from worker.recovery import is_transient, retry_countdown

    assert is_transient(OperationalError("SELECT 1", {}, Exception("database is locked")))
    assert is_transient(ConnectionError())
    assert not is_transient(IntegrityError("INSERT", {}, Exception("unique")))
    assert not is_transient(ValueError())
    assert [retry_countdown(n) for n in range(7)] == [2, 4, 8, 16, 32, 60, 60]


def test_a_transient_error_puts_the_job_back_and_retries(app, monkeypatch):
    """analyse() with a database hiccup in the middle: the job is queued again and a retry raised."""
    from celery.exceptions import Retry
    from portal_helpers import image_bytes
    from sqlalchemy.exc import OperationalError
    from test_worker_tasks import FakePredictor

    import worker.batching as batching
    import worker.celery_app as celery_app
    import worker.predict as predict
    import worker.tasks as tasks
    from webapp.storage import storage_from_settings

    monkeypatch.setattr(celery_app, "_flask_app", app)
    monkeypatch.setitem(predict._state, "predictor", FakePredictor())
    with app.app_context():
        storage_from_settings(app.extensions["settings"]).save("images/x.png", image_bytes())
        case = Case()
        image = Image(case=case, content_hash="e" * 64, storage_key="images/x.png", width=1, height=1)
        job = Job(image=image)
        db.session.add_all([case, image, job])
        db.session.commit()
        job_id = job.id

    def hiccup(job, **kwargs):
        raise OperationalError("UPDATE", {}, Exception("database is locked"))

    monkeypatch.setattr(batching, "run_batch", hiccup)
    monkeypatch.setattr(tasks.analyse, "retry", lambda exc=None, countdown=None: Retry(exc=exc, when=countdown))
    with pytest.raises(Retry):
        tasks.analyse(job_id)
    assert status_of(app, job_id)[:2] == ("queued", 0)
