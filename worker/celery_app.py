"""The worker's Celery app: `celery -A worker.celery_app worker -Q predict,explain`.

Importing this module is light (no TensorFlow): the model is loaded in each pool process after the
fork, by the `worker_process_init` handler in worker.tasks.
"""

from __future__ import annotations

from celery import Celery

from webapp.config import Settings
from webapp.queue import ANALYSE_TASK, EXPLAIN_QUEUE, PREDICT_QUEUE, broker_options

settings = Settings.load()

app = Celery("dermportal", broker=settings.REDIS_URL, include=["worker.tasks", "worker.sweep"])
app.conf.update(broker_options(settings.BROKER_TIMEOUT))
# A worker consuming `-Q predict,explain` polls predict first, always (Redis BRPOP takes the first
# non-empty list): SHAP never starts while an upload waits (worker/batching.py).
app.conf.broker_transport_options = {**app.conf.broker_transport_options, "queue_order_strategy": "priority"}
app.conf.update(
    task_default_queue=PREDICT_QUEUE,
    task_routes={ANALYSE_TASK: {"queue": PREDICT_QUEUE},
                 "worker.tasks.explain_shap": {"queue": EXPLAIN_QUEUE},
                 "worker.tasks.explain_gradcam": {"queue": EXPLAIN_QUEUE}},
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

__all__ = ["app", "celery", "settings", "EXPLAIN_QUEUE"]
