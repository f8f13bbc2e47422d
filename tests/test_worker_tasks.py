"""worker.tasks.analyse with a fake predictor (no TensorFlow): success, failure, idempotence."""

import io

import numpy as np
import pytest
from portal_helpers import FAKE_CLASSES as CLASSES
from portal_helpers import FAKE_MANIFEST as MANIFEST
from portal_helpers import image_bytes, make_user, worker_serving

from webapp.db import db
from webapp.models import Analysis, Job, ModelVersion


class FakePredictor:
    manifest = MANIFEST
    class_names = CLASSES

    def __init__(self, fail=False):
        self.fail = fail
        self.seen = []

    def predict(self, images):
        if self.fail:
            raise RuntimeError("out of cheese")
        self.seen.extend(im.shape for im in images)
        p = np.arange(1, 8, dtype=np.float32)
        return (p / p.sum())[None, :]


@pytest.fixture
def predictors(app, monkeypatch):
    """This process's predictor state in worker.predict, with a fake predictor; tasks run in `app`."""
    import worker.predict as predict

    worker_serving(app, monkeypatch, FakePredictor())
    return predict._state


@pytest.fixture
def tasks(predictors):
    import worker.tasks as tasks

    return tasks


@pytest.fixture
def job_id(app, client, sent_tasks):
    from portal_helpers import make_token

    make_user(app, "u@example.org")
    headers = {"Authorization": f"Bearer {make_token(app, 'u@example.org')}"}
    client.post("/api/v1/cases", data={"image": (io.BytesIO(image_bytes()), "x.jpg")}, headers=headers)
    return sent_tasks[0][1][0]


def test_analyse_stores_probabilities_per_model_version(app, tasks, predictors, job_id):
    assert tasks.analyse(job_id) == "succeeded"
    with app.app_context():
        job = db.session.get(Job, job_id)
        assert job.status == "succeeded" and job.attempts == 1 and job.started_at <= job.finished_at
        analysis = job.analysis
        assert analysis.status == "succeeded" and analysis.top_class == "vasc"
        assert sum(analysis.probabilities.values()) == pytest.approx(1.0)
        assert set(analysis.timings) == {"load_image_ms", "predict_ms"}
        mv = db.session.scalars(db.select(ModelVersion)).one()
        assert (mv.name, mv.version, mv.trained, mv.class_names) == ("efficientnetb3-cbam", "untrained", False, CLASSES)
        assert mv.manifest["class_long_names"]["mel"] == "MEL"
    assert predictors["predictor"].seen == [(150, 200, 3)]


def test_redelivered_or_repeated_work_is_not_redone(app, tasks, predictors, job_id):
    tasks.analyse(job_id)
    assert tasks.analyse(job_id) == "succeeded"  # same message again
    with app.app_context():
        image_id = db.session.get(Job, job_id).image_id
        second = Job(image_id=image_id, kind="analyse")
        db.session.add(second)
        db.session.commit()
        second_id = second.id
    tasks.analyse(second_id)
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Analysis.id))) == 1
        assert db.session.get(Job, second_id).analysis_id == db.session.get(Job, job_id).analysis_id
    assert len(predictors["predictor"].seen) == 1


def test_a_failure_ends_in_failed_with_its_reason(app, tasks, predictors, job_id):
    predictors["predictor"] = FakePredictor(fail=True)
    assert tasks.analyse(job_id) == "failed"
    with app.app_context():
        job = db.session.get(Job, job_id)
        assert job.status == "failed" and "RuntimeError: out of cheese" in job.error and job.finished_at
        assert job.analysis is None  # the results are stored in one transaction after the pass: none began
    predictors["predictor"] = FakePredictor()  # a retry may still succeed: failed results are not kept
    with app.app_context():
        db.session.get(Job, job_id).status = "queued"
        db.session.commit()
    assert tasks.analyse(job_id) == "succeeded"


def test_model_that_could_not_load(app, tasks, predictors, job_id):
    predictors.update(predictor=None, predictor_error="Model could not be loaded: FileNotFoundError: x")
    assert tasks.analyse(job_id) == "failed"
    with app.app_context():
        assert "Model could not be loaded" in db.session.get(Job, job_id).error


def test_soft_time_limit_marks_the_job_failed(app, tasks, predictors, job_id, monkeypatch):
    from celery.exceptions import SoftTimeLimitExceeded

    def slow(images):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(predictors["predictor"], "predict", slow)
    assert tasks.analyse(job_id) == "failed"
    with app.app_context():
        assert "Timed out" in db.session.get(Job, job_id).error


def test_stuck_job_gives_up_after_max_attempts(app, tasks, job_id):
    with app.app_context():
        job = db.session.get(Job, job_id)
        job.status, job.attempts = "running", app.extensions["settings"].TASK_MAX_ATTEMPTS
        db.session.commit()
    assert tasks.analyse(job_id) == "failed"
    assert tasks.analyse(424242) == "missing"


def test_celery_settings():
    from worker.celery_app import app

    conf = app.conf
    assert conf.task_acks_late and conf.worker_prefetch_multiplier == 1
    assert 0 < conf.task_soft_time_limit < conf.task_time_limit
    assert conf.task_routes["worker.tasks.analyse"]["queue"] == "predict"
    import worker.tasks  # noqa: F401  (registers the task)

    assert "worker.tasks.analyse" in app.tasks
