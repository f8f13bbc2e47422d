"""The worker's Celery app: `celery -A worker.celery_app worker -Q predict,ingest,explain`.

Every task runs inside an application context of this process's Flask app (`FlaskTask`, the pattern
of Flask's "Background Tasks with Celery"), so task code uses `db.session` and reads its settings
from `current_app` without opening a context of its own.

Importing this module is light (no TensorFlow): the model is loaded in each pool process after the
fork, by the `worker_process_init` handler in worker.process.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from flask import Flask, current_app, has_app_context

from webapp import create_app
from webapp.cases.explanations import GRADCAM_TASK, SHAP_TASK
from webapp.config import Settings
from webapp.queue import ANALYSE_TASK, EXPLAIN_QUEUE, INGEST_QUEUE, INGEST_TASK, PREDICT_QUEUE, broker_options

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(
    logging.WARNING
)  # create_app() loads Flask-Migrate; its INFO lines are noise here

settings = Settings.load()
_flask_app: Flask | None = None


def flask_app() -> Flask:
    """The Flask app of this process, for database access (created on first use, after the fork)."""
    global _flask_app
    if _flask_app is None:
        _flask_app = create_app()
    return _flask_app


def current_settings() -> Settings:
    """The settings of the Flask app whose context is active (a task's), else the worker's own
    (signal handlers and warm-up outside any task). Both are loaded from the same environment."""
    return current_app.extensions["settings"] if has_app_context() else settings


class FlaskTask(Task):
    """A task that runs inside an application context of `flask_app()`.

    Calls `run` directly, as Flask's Celery pattern does: the worker's tracer has already pushed the
    request (delivery_info, retries), which Task.__call__ would replace with a bare one.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with flask_app().app_context():
            return self.run(*args, **kwargs)


app = Celery(
    "dermportal",
    broker=settings.REDIS_URL,
    task_cls=FlaskTask,
    include=["worker.tasks", "worker.process", "worker.sweep"],
)
app.conf.update(broker_options(settings.BROKER_TIMEOUT))
# A worker consuming `-Q predict,ingest,explain` polls predict first, always (Redis BRPOP takes the
# first non-empty list): SHAP never starts while an upload waits (worker/priority.py), and a zip's
# decoding never delays the analyses of cases already stored.
app.conf.broker_transport_options = {**app.conf.broker_transport_options, "queue_order_strategy": "priority"}
app.conf.update(
    task_default_queue=PREDICT_QUEUE,
    task_routes={
        ANALYSE_TASK: {"queue": PREDICT_QUEUE},
        INGEST_TASK: {"queue": INGEST_QUEUE},
        SHAP_TASK: {"queue": EXPLAIN_QUEUE},
        # A Grad-CAM map (~0.1 s) on the predict queue, which SHAP never fills (worker/priority.py).
        GRADCAM_TASK: {"queue": PREDICT_QUEUE},
    },
    task_create_missing_queues=True,
    # A task is acknowledged after it ran, so a worker that dies mid-task does not lose it;
    # one message at a time per process, since a prediction holds the CPU for seconds.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # A Redis restart must not end the worker: reconnect forever (the default gives up after 100 tries).
    broker_connection_retry=True,
    broker_connection_max_retries=None,
    # A task running when the broker connection drops finishes and stores its result (the job row
    # is the truth; a later redelivery of its message finds the job finished and does nothing).
    worker_cancel_long_running_tasks_on_connection_loss=False,
    task_soft_time_limit=settings.TASK_SOFT_TIME_LIMIT,
    task_time_limit=settings.TASK_TIME_LIMIT,
    # Building the model in worker_process_init takes longer than Celery's default 4 s.
    worker_proc_alive_timeout=300,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_serializer="json",
    accept_content=["json"],
)
celery = app


def send(task_name: str, *args: Any, queue: str | None = None) -> str | None:
    """Publishes a task by name from the worker (on its routed queue unless given); None (logged)
    when the broker refuses."""
    queue = queue or app.conf.task_routes.get(task_name, {}).get("queue", EXPLAIN_QUEUE)
    try:
        return app.send_task(task_name, args=list(args), queue=queue).id
    except Exception as exc:
        log.warning("Could not send %s%s: %s", task_name, args, exc)
        return None


def consumes(queue: str) -> bool:
    """Whether this worker consumes `queue` (True when unknown: outside a worker, or no -Q given)."""
    try:
        consume_from = app.amqp.queues.consume_from
    except Exception:
        return True
    return not consume_from or queue in consume_from


__all__ = [
    "app",
    "celery",
    "settings",
    "EXPLAIN_QUEUE",
    "FlaskTask",
    "flask_app",
    "current_settings",
    "send",
    "consumes",
    "SHAP_TASK",
    "GRADCAM_TASK",
]
