"""A worker's pool processes: their share of the cores, the model loaded after the fork, the warm-up.

`worker_process_init` runs in each pool process right after the fork. Loading the model there, and
never at import time, matters: forking a process with a loaded TensorFlow runtime hangs.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_init, worker_process_init

from webapp.config import worker_layout
from webapp.db import db
from webapp.queue import mark_worker_warm

from . import batching, explain, predict
from .celery_app import current_settings, flask_app
from .recovery import worker_identity

log = logging.getLogger(__name__)

_pool_processes: int | None = None  # the worker's -c, inherited by its pool processes over the fork


@worker_init.connect
def _remember_pool_size(sender: Any = None, **_: Any) -> None:
    """The worker's -c, which its pool processes inherit over the fork (to share out the cores)."""
    global _pool_processes
    concurrency = getattr(sender, "concurrency", None)
    _pool_processes = concurrency if isinstance(concurrency, int) and concurrency > 0 else None  # not "auto"


def limit_threads() -> int:
    """Gives this process's TensorFlow its share of the cores (webapp.config.worker_layout); must run
    before TensorFlow executes anything. Returns the thread count."""
    import tensorflow as tf  # after the fork only (this runs in worker_process_init)

    _, threads = worker_layout(current_settings(), _pool_processes)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime was already initialised in this process (tests, solo pool)
        log.warning("TensorFlow already initialised; its thread count stays as it is.")
    limit_blas_threads(threads)
    return threads


def limit_blas_threads(threads: int) -> None:
    """NumPy's BLAS (the embedding projection and the OOD detector's products on each batch) gets the
    same share: by default each pool process starts a BLAS thread per core, and those threads spin
    after each small product, taking CPU from the other pool process and the web server."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads, user_api="blas")


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    # A signal handler, not a task: it opens the app context FlaskTask gives every task.
    with flask_app().app_context():
        db.engine.dispose(close=False)  # never share connections inherited from the parent over the fork
    log.info("TensorFlow threads in this pool process: %d.", limit_threads())
    predict.load_default_predictor()
    warm_up()  # trace the prediction pass at each batch size now, not on the first upload
    report_warm()


def report_warm() -> None:
    """Tells the launcher this process can analyse at once (webapp.queue.mark_worker_warm): `make run`
    prints its ready banner only then. A Redis that does not answer only delays the banner."""
    settings = current_settings()
    try:
        mark_worker_warm(settings.REDIS_URL, worker_identity(), float(settings.BROKER_TIMEOUT))
    except Exception as exc:
        log.warning("Could not report this process warm: %s", exc)


def warm_up() -> None:
    """The first real request should not pay for tracing and kernel set-up (PREDICT_WARMUP)."""
    model = predict.loaded_predictor()
    if model is None or not getattr(current_settings(), "PREDICT_WARMUP", True):
        return
    try:
        seconds = batching.warm_up(model)
        log.info(
            "Prediction pass warmed up for batch sizes %s in %.1f s.",
            batching.bucket_sizes(predict.batch_limit()),
            seconds,
        )
    except Exception:  # a failed warm-up only means a slow first request
        log.exception("Warm-up failed (the first predictions will be slower).")
    try:
        seconds = explain.warm_up_shap(model)
        if seconds is not None:
            log.info("SHAP function imported and traced in %.1f s.", seconds)
    except Exception:
        log.exception("SHAP warm-up failed (the first SHAP run will be slower).")
