"""The sweeper: no job is left behind by a broker outage or a dead worker.

Every SWEEP_INTERVAL seconds, a daemon thread in each Celery worker's *main* process runs one pass
of worker.recovery (`requeue_orphans` for its own host; then, for one worker per interval,
`sweep_once` and `sweep_explanations`). What each pass looks for is described there.

Where it runs, and why: started by the `worker_ready` signal and stopped by `worker_shutdown`. It
needs no extra process or container (celery beat would be one more service to run exactly once,
with its own schedule file; `-B` is not meant for more than one worker), it runs wherever a worker
runs (`make run`, docker compose, the tests), and the main process never loads TensorFlow, so a
sweep costs milliseconds. With several workers (predict and explain containers), a Redis lock
(`SET NX EX`) lets one sweep run per interval. `python -m worker.sweep` runs one pass by hand.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from flask import Flask

from webapp import create_app
from webapp.config import Settings

from .celery_app import app as celery_app
from .celery_app import settings as worker_settings
from .ingest import sweep_archives
from .recovery import connect_redis, requeue_orphans, sweep_explanations, sweep_once

log = logging.getLogger(__name__)

LOCK_KEY = "dermportal:sweep:lock"


class Sweeper:
    """The timer thread in the worker's main process."""

    def __init__(self, celery_app: Celery, settings: Settings, interval: float | None = None):
        self.celery_app, self.settings = celery_app, settings
        self.interval = float(settings.SWEEP_INTERVAL if interval is None else interval)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        # The main process's own Flask app: pool processes forked later must not inherit it.
        self._flask_app: Flask | None = None
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    def send(self, task: str, job_id: int, queue: str) -> str:
        return self.celery_app.send_task(task, args=[job_id], queue=queue).id

    def run_once(self) -> dict[str, int] | None:
        if self._flask_app is None:
            self._flask_app = create_app()
        r: redis.Redis | None
        try:
            r = connect_redis(self.settings)
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
        archives = sweep_archives(self._flask_app, self.send, self.settings, r)
        counts.update({f"archives_{k}": v for k, v in archives.items()})
        return counts

    def _take_lock(self, r: redis.Redis) -> bool:
        try:
            return bool(r.set(LOCK_KEY, self.identity, ex=max(1, int(self.interval * 0.8)), nx=True))
        except Exception:
            return True

    def _sweep_explanations(self) -> dict[str, int]:
        """Explanation rows (SHAP, Grad-CAM on request) get the same care as prediction jobs."""
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
        log.info(
            "Sweep every %.0f s (queued > %.0f s re-sent; running > %.0f s re-queued).",
            self.interval,
            self.settings.SWEEP_QUEUED_AFTER,
            self.settings.TASK_TIME_LIMIT + self.settings.SWEEP_RUNNING_MARGIN,
        )

    def stop(self) -> None:
        self.stopped.set()


_sweeper: Sweeper | None = None


@worker_ready.connect(weak=False)
def _start(sender: Any = None, **_: Any) -> None:
    global _sweeper
    _sweeper = Sweeper(celery_app, worker_settings)
    _sweeper.start()


@worker_shutdown.connect(weak=False)
def _stop(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()


def main() -> None:
    """`python -m worker.sweep`: one pass now, printing what it did."""
    logging.basicConfig(level=logging.INFO)
    print(Sweeper(celery_app, worker_settings, interval=1).run_once())


if __name__ == "__main__":
    main()
