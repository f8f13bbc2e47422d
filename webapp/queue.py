"""Sending tasks to the worker by name, and asking the broker and worker how they are (and whether
the worker's processes have warmed their models).

The web process never imports `worker/` (nor TensorFlow through it): it holds a bare Celery client
that only publishes messages; the Celery app itself is created on first use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery
from flask import Flask, current_app

log = logging.getLogger(__name__)

ANALYSE_TASK = "worker.tasks.analyse"
# A zip archive's entries are decoded by a worker (worker.ingest), never in the web request.
INGEST_TASK = "worker.tasks.ingest_archive"
PREDICT_QUEUE = "predict"
INGEST_QUEUE = "ingest"
EXPLAIN_QUEUE = "explain"
# A Redis hash: one field (host:pid) per worker pool process that has loaded and warmed its model.
WARM_WORKERS_KEY = "dermportal:warm-workers"


def broker_options(timeout: float) -> dict[str, Any]:
    """Celery settings shared by the web client and the worker: give up quickly when Redis is down."""
    return {
        "broker_connection_timeout": timeout,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "socket_connect_timeout": timeout,
            "socket_timeout": max(timeout, 5.0),
            "visibility_timeout": 3600,
        },
        "task_publish_retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        "task_ignore_result": True,
    }


def celery_client(app: Flask | None = None):
    """The web process's Celery client (one per app), created on first use."""
    app = app or current_app
    client = app.extensions.get("celery_client")
    if client is None:
        client = Celery("dermportal-web", broker=app.config["REDIS_URL"], set_as_current=False)
        client.conf.update(broker_options(app.config["BROKER_TIMEOUT"]))
        app.extensions["celery_client"] = client
    return client


def send(task_name: str, *args: Any, queue: str) -> str | None:
    """Publishes `task_name(*args)` on `queue`; returns the task id, or None when the broker is down.

    The caller has already committed the job row, so a failed publish loses nothing: the job stays
    `queued` in the database (a periodic sweep re-sends such jobs).
    """
    try:
        result = celery_client().send_task(task_name, args=list(args), queue=queue)
    except Exception as exc:  # kombu raises several connection error types
        log.warning("Could not send %s%s to queue %s: %s", task_name, args, queue, exc)
        return None
    return result.id


def send_grouped(task_name: str, ids: Sequence[int], group_size: int, *, queue: str) -> int:
    """Publishes one `task_name(*group)` message per `group_size` ids (a worker's micro-batch), so a
    folder's jobs cost one message per batch rather than one per image. Stops at the first failed
    publish (the broker is down: the rest stay queued in the database for the sweep). Returns how
    many ids were sent."""
    group_size = max(1, int(group_size))
    sent = 0
    for start in range(0, len(ids), group_size):
        group = list(ids[start : start + group_size])
        if send(task_name, *group, queue=queue) is None:
            break
        sent += len(group)
    return sent


def broker_status(app: Flask | None = None) -> dict[str, Any]:
    """Pings Redis directly with a short timeout."""
    app = app or current_app
    timeout = app.config["BROKER_TIMEOUT"]
    try:
        client = redis.Redis.from_url(app.config["REDIS_URL"], socket_connect_timeout=timeout, socket_timeout=timeout)
        client.ping()
    except Exception as exc:
        return {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"}
    return {"ok": True}


def worker_status(app: Flask | None = None, timeout: float = 1.0) -> dict[str, Any]:
    """Asks the workers to answer a ping within `timeout` seconds (never hangs longer)."""
    try:
        replies = celery_client(app).control.inspect(timeout=timeout).ping() or {}
    except Exception as exc:
        return {"ok": False, "workers": [], "error": f"{exc.__class__.__name__}: {exc}"}
    return {"ok": bool(replies), "workers": sorted(replies)}


def _redis(url: str, timeout: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)


def mark_worker_warm(url: str, identity: str, timeout: float = 2.0) -> None:
    """Records that the pool process `identity` has loaded and warmed its model (worker.process), so
    that the launcher (scripts/run_portal.py) says ready only when an upload is analysed at once."""
    _redis(url, timeout).hset(WARM_WORKERS_KEY, identity, f"{time.time():.3f}")


def warm_workers(url: str, timeout: float = 2.0) -> int:
    """How many worker pool processes have reported warm since `forget_warm_workers`."""
    return int(_redis(url, timeout).hlen(WARM_WORKERS_KEY))


def forget_warm_workers(url: str, timeout: float = 2.0) -> None:
    """Drops earlier reports (a previous run's processes) before a worker is started."""
    _redis(url, timeout).delete(WARM_WORKERS_KEY)
