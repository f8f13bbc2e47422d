"""No job stays `running`: a real Celery worker whose model ignores the soft time limit is killed by
the hard limit, and the job ends `failed` with the reason. A stand-in predictor keeps this fast
(no TensorFlow); everything else (Redis, Celery prefork pool, SQLite, the web client) is real."""

from __future__ import annotations

import io
import sys

import pytest
from e2e_support import wait_for
from portal_helpers import image_bytes, make_token, make_user

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

STUBBORN_WORKER = """
import time
from celery.exceptions import SoftTimeLimitExceeded
import worker.predict as predict
from worker.celery_app import app

class StubbornPredictor:
    manifest = {"name": "stubborn", "version": "0", "trained": False, "trained_on": None,
                "class_names": ["a", "b"], "class_long_names": {}, "malignant_classes": []}

    def predict(self, images):
        try:
            time.sleep(60)
        except SoftTimeLimitExceeded:
            time.sleep(60)  # swallows the soft limit, as code stuck in C would

predict.load_predictor = StubbornPredictor
app.worker_main(["worker", "-Q", "predict", "-c", "1", "--pool", "prefork", "-l", "INFO", "-n", "stubborn@%h"])
"""


def test_hard_time_limit_ends_the_job_failed(web_app, start_worker):
    worker = start_worker(
        [sys.executable, "-c", STUBBORN_WORKER], {"TASK_SOFT_TIME_LIMIT": "1", "TASK_TIME_LIMIT": "3"}
    )
    make_user(web_app, "u@example.org")
    headers = {"Authorization": f"Bearer {make_token(web_app, 'u@example.org')}"}
    client = web_app.test_client()
    response = client.post("/api/v1/cases", data={"image": (io.BytesIO(image_bytes()), "x.jpg")}, headers=headers)
    assert response.status_code == 202

    def failed():
        body = client.get(response.json["url"], headers=headers).json
        return body if body["status"] == "failed" else None

    body = wait_for(failed, 120, worker, "the hard time limit")
    job = body["jobs"][0]
    assert "TimeLimitExceeded" in job["error"] and job["finished"], (job, worker.tail())
