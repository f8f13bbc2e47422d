"""The worker's tasks: each takes ids, and its work lives in the module named in its body.

The web app sends them by name (`worker.tasks.analyse`, `worker.tasks.explain_shap`,
`worker.tasks.explain_gradcam`, `worker.tasks.ingest_archive`); each runs inside an application context (worker.celery_app.FlaskTask).
"""

from __future__ import annotations

from functools import partial

from celery import Task

from webapp.queue import ANALYSE_TASK, INGEST_TASK

from . import batching, explain, ingest, recovery
from .celery_app import GRADCAM_TASK, SHAP_TASK, app

TRANSIENT_RETRIES = 5  # retries with backoff (2, 4, 8, 16, 32 s) for database or broker hiccups


@app.task(name=ANALYSE_TASK, bind=True, max_retries=TRANSIENT_RETRIES)
def analyse(self: Task, job_id: int, *listed_job_ids: int) -> str:
    """Predicts the job's image (with the queued jobs it takes along, worker.batching) and stores an
    Analysis per (image, model version). Returns the job's final status.

    A folder upload sends one message per micro-batch: `listed_job_ids` are taken along first.

    Idempotent: the delivery first claims the job (worker.recovery), so a redelivered or duplicated
    message adds nothing. Never leaves the job `running`: a transient error (database or broker
    briefly unavailable) puts it back to `queued` and retries with backoff; every other error ends
    in `failed` with its reason.
    """
    companions = batching.Companions(listed_job_ids)  # claimed with the job, in one transaction
    try:
        work = partial(batching.run_batch, companions=companions)
        status = recovery.run_job(job_id, self.request, work, companions.take)
        batching.send_left_behind(companions.listed)  # whether this delivery ran the batch or not
        return str(status)
    except recovery.RetryLater as later:
        raise self.retry(exc=later.cause, countdown=recovery.retry_countdown(self.request.retries)) from None


@app.task(name=SHAP_TASK, bind=True)
def explain_shap(self: Task, analysis_id: int, *more_analysis_ids: int) -> str:
    """SHAP maps for every queued SHAP row of the analysis; gives way to predictions (worker.priority).

    A micro-batch sends one message for its analyses: `more_analysis_ids` go on in a message of
    their own (worker.explain.run_shap)."""
    return str(explain.run_shap(self, analysis_id, more_analysis_ids))


@app.task(name=GRADCAM_TASK)
def explain_gradcam(explanation_id: int) -> str:
    """A requested Grad-CAM or Grad-CAM++ map for the row's class."""
    return str(explain.run_gradcam(explanation_id))


@app.task(name=INGEST_TASK)
def ingest_archive(batch_id: int) -> str:
    """Decodes the pending entries of a batch's stored zip archive into cases (worker.ingest)."""
    return ingest.run_archive(batch_id)
