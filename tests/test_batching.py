"""Micro-batching in worker.tasks.analyse (worker/batching.py): several queued jobs in one forward
pass, exactly one analysis each, and padded batches that predict exactly what unpadded ones do."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image as PILImage
from portal_helpers import FAKE_CLASSES as CLASSES
from portal_helpers import FAKE_MANIFEST as MANIFEST
from portal_helpers import SMALL_IMAGES, image_bytes, make_token, make_user, upload_all, worker_serving

from webapp.db import db
from webapp.models import Analysis, Job


class BatchRecordingPredictor:
    """Probabilities that depend on each image (its mean brightness picks the top class)."""

    manifest = MANIFEST
    class_names = CLASSES

    def __init__(self):
        self.calls: list[int] = []

    def predict(self, images):
        self.calls.append(len(images))
        out = np.full((len(images), len(CLASSES)), 0.01, dtype=np.float32)
        for row, image in zip(out, images):
            row[int(np.mean(image)) % len(CLASSES)] = 1.0
        return out / out.sum(axis=1, keepdims=True)


@pytest.fixture
def predictors(app, monkeypatch):
    """This process's predictor state in worker.predict, with a recording predictor; tasks run in `app`."""
    import worker.predict as predict

    worker_serving(app, monkeypatch, BatchRecordingPredictor())
    return predict._state


@pytest.fixture
def tasks(predictors):
    import worker.tasks as tasks

    return tasks


def test_one_task_processes_the_queued_jobs_in_one_pass(app, client, sent_tasks, tasks, predictors):
    from worker.recovery import worker_identity

    job_ids = upload_all(app, client, sent_tasks)
    assert len(job_ids) == 4

    assert tasks.analyse(job_ids[1]) == "succeeded"  # any message may come first
    assert predictors["predictor"].calls == [4]  # one forward pass for all four

    with app.app_context():
        jobs = [db.session.get(Job, j) for j in job_ids]
        assert [(j.status, j.attempts) for j in jobs] == [("succeeded", 1)] * 4
        assert len({j.analysis_id for j in jobs}) == 4
        # Companions record their claimer too: the sweep re-queues them if this process dies.
        assert {j.claimed_by for j in jobs} == {worker_identity()}
        for job in jobs:
            analysis = job.analysis
            assert analysis.image_id == job.image_id and analysis.status == "succeeded"
            assert sum(analysis.probabilities.values()) == pytest.approx(1.0)

    # The messages of the jobs taken along find them finished: nothing more is computed or stored.
    for job_id in job_ids:
        assert tasks.analyse(job_id) == "succeeded"
    assert predictors["predictor"].calls == [4]
    with app.app_context():
        per_image = db.session.execute(
            db.select(Analysis.image_id, db.func.count(Analysis.id)).group_by(Analysis.image_id)
        ).all()
        assert sorted(n for _, n in per_image) == [1, 1, 1, 1]
        assert db.session.scalar(db.select(db.func.count(Job.id)).where(Job.attempts != 1)) == 0


def test_batch_size_limits_the_jobs_taken_along(app, client, sent_tasks, tasks, predictors, monkeypatch):
    monkeypatch.setitem(
        app.extensions, "settings", dataclasses.replace(app.extensions["settings"], PREDICT_BATCH_SIZE=3)
    )
    job_ids = upload_all(app, client, sent_tasks)
    tasks.analyse(job_ids[0])
    with app.app_context():
        statuses = [db.session.get(Job, j).status for j in job_ids]
    assert statuses == ["succeeded", "succeeded", "succeeded", "queued"]  # oldest first
    assert predictors["predictor"].calls == [3]
    tasks.analyse(job_ids[3])
    assert predictors["predictor"].calls == [3, 1]


def test_a_failed_batch_leaves_no_job_running(app, client, sent_tasks, tasks, predictors, monkeypatch):
    job_ids = upload_all(app, client, sent_tasks)

    def broken(images):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(predictors["predictor"], "predict", broken)
    assert tasks.analyse(job_ids[0]) == "failed"
    with app.app_context():
        jobs = [db.session.get(Job, j) for j in job_ids]
        assert all(j.status == "failed" and "out of cheese" in j.error for j in jobs)


def with_batch_size(app, monkeypatch, size: int) -> None:
    settings = dataclasses.replace(app.extensions["settings"], PREDICT_BATCH_SIZE=size)
    monkeypatch.setitem(app.extensions, "settings", settings)


def upload_folder(app, client, sent_tasks, count: int) -> list[tuple[int, ...]]:
    """A folder of `count` distinct images in one batch request; returns the analyse messages' job ids."""
    make_user(app, "f@example.org")
    headers = {"Authorization": f"Bearer {make_token(app, 'f@example.org')}"}
    rng = np.random.default_rng(3)
    files = []
    for i in range(count):
        buffer = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        files.append((io.BytesIO(buffer.getvalue()), f"folder/lesion-{i}.png"))
    response = client.post("/api/v1/batches", data={"images": files}, headers=headers)
    assert response.status_code == 202 and response.json["stored"] == count, response.json
    return [args for task, args, _ in sent_tasks if task == "worker.tasks.analyse"]


def test_a_folder_sends_one_message_per_micro_batch_and_one_pass_takes_its_jobs(
    app, client, sent_tasks, tasks, predictors, monkeypatch
):
    with_batch_size(app, monkeypatch, 3)
    messages = upload_folder(app, client, sent_tasks, 7)
    assert [len(ids) for ids in messages] == [3, 3, 1]
    assert sorted(i for ids in messages for i in ids) == list(range(min(messages[0]), min(messages[0]) + 7))

    # The second message first: its own jobs, not the oldest queued ones, make up the pass.
    assert tasks.analyse(*messages[1]) == "succeeded"
    with app.app_context():
        done = set(db.session.scalars(db.select(Job.id).where(Job.status == "succeeded")))
    assert done == set(messages[1]) and predictors["predictor"].calls == [3]
    for ids in (messages[0], messages[2]):
        tasks.analyse(*ids)
    assert predictors["predictor"].calls == [3, 3, 1]
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Job.id)).where(Job.status != "succeeded")) == 0
        assert db.session.scalar(db.select(db.func.count(Analysis.id))) == 7


def test_listed_jobs_beyond_the_batch_are_sent_on_their_own(app, client, sent_tasks, tasks, predictors, monkeypatch):
    import worker.batching as batching

    resent: list[tuple] = []
    monkeypatch.setattr(batching, "send", lambda name, *args, queue: resent.append((name, args, queue)) or "id")
    with_batch_size(app, monkeypatch, 4)
    (ids,) = upload_folder(app, client, sent_tasks, 4)
    with_batch_size(app, monkeypatch, 2)  # a worker with smaller batches than the web app's
    assert tasks.analyse(*ids) == "succeeded"
    assert predictors["predictor"].calls == [2]
    assert resent == [("worker.tasks.analyse", (ids[2],), "predict"), ("worker.tasks.analyse", (ids[3],), "predict")]
    with app.app_context():
        assert [db.session.get(Job, i).status for i in ids] == ["succeeded", "succeeded", "queued", "queued"]


def test_a_message_whose_lead_another_delivery_took_hands_on_the_rest_of_its_list(
    app, client, sent_tasks, tasks, predictors, monkeypatch
):
    import worker.batching as batching

    resent: list[tuple] = []
    monkeypatch.setattr(batching, "send", lambda name, *args, queue: resent.append((name, args, queue)) or "id")
    with_batch_size(app, monkeypatch, 4)
    (ids,) = upload_folder(app, client, sent_tasks, 4)
    with_batch_size(app, monkeypatch, 2)
    assert tasks.analyse(ids[0]) == "succeeded"  # another message for the lead came first: takes ids[1] along
    assert resent == []
    assert tasks.analyse(*ids) == "succeeded"  # the folder's message finds its lead done
    assert resent == [("worker.tasks.analyse", (ids[2],), "predict"), ("worker.tasks.analyse", (ids[3],), "predict")]
    with app.app_context():
        assert [db.session.get(Job, i).status for i in ids] == ["succeeded", "succeeded", "queued", "queued"]


def test_a_listed_job_taken_by_another_delivery_is_skipped(app, client, sent_tasks, tasks, predictors, monkeypatch):
    with_batch_size(app, monkeypatch, 4)
    (ids,) = upload_folder(app, client, sent_tasks, 4)
    assert tasks.analyse(ids[2]) == "succeeded"  # a single message of one of them came first: takes all four
    assert tasks.analyse(*ids) == "succeeded"  # the batch message then finds its jobs finished
    assert predictors["predictor"].calls == [4]
    with app.app_context():
        assert [db.session.get(Job, i).attempts for i in ids] == [1, 1, 1, 1]


def test_bucket_sizes_and_padding():
    from worker.batching import bucket_sizes, pad, padded_size

    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    assert bucket_sizes(1) == [1]
    assert [padded_size(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert pad(["a", "b"], 4) == ["a", "b", "b", "b"]


@pytest.fixture(scope="module")
def tiny_predictor():
    from ml.predictor import Predictor

    return Predictor.untrained(input_size=(32, 32))


def test_padded_batches_predict_what_unpadded_ones_do(tiny_predictor, monkeypatch):
    import worker.celery_app as celery_app
    from ml.explain import explain_gradcam
    from worker.batching import predict_batch

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (30 + 5 * i, 40, 3), dtype=np.uint8) for i in range(5)]
    monkeypatch.setattr(celery_app, "settings", dataclasses.replace(celery_app.settings, PREDICT_BATCH_SIZE=16))

    probs, gradcams, pooled = predict_batch(tiny_predictor, images)  # 5 images padded to 8
    unpadded = explain_gradcam(tiny_predictor, images, batch_size=5)
    one_by_one = np.concatenate([tiny_predictor.predict([image]) for image in images])
    assert probs.shape == (5, len(tiny_predictor.class_names))
    np.testing.assert_allclose(probs, unpadded.probs, atol=1e-5)
    np.testing.assert_allclose(probs, one_by_one, atol=1e-5)
    np.testing.assert_allclose(pooled, unpadded.embeddings, atol=1e-5)
    for (index, heatmap, error), expected_index, expected_map, image in zip(
        gradcams, unpadded.class_indices, unpadded.maps, images
    ):
        assert error is None and index == expected_index and heatmap.shape == image.shape[:2]
        np.testing.assert_allclose(heatmap, expected_map, atol=1e-5)


def test_a_metadata_head_answers_for_cases_with_metadata_and_the_map_explains_its_class(
    app, client, sent_tasks, tasks, predictors, tiny_predictor, monkeypatch
):
    from ml import metadata as MD
    from ml.decision import Decision
    from webapp.models import Explanation

    head = MD.FusionHead.neutral(7)
    df = tiny_predictor.class_names.index("df")
    head.weights[7 + MD.METADATA_FEATURES.index("site_acral"), df] = 50.0  # acral site: df, whatever the image
    monkeypatch.setattr(tiny_predictor, "metadata_head", MD.MetadataHead(head, 1.0, Decision()))
    monkeypatch.setitem(predictors, "predictor", tiny_predictor)
    make_user(app, "u@example.org")
    headers = {"Authorization": f"Bearer {make_token(app, 'u@example.org')}"}
    for name, site in zip(SMALL_IMAGES[:2], ["acral", None]):
        data = {"image": (io.BytesIO(image_bytes(name)), name), **({"site": site} if site else {})}
        assert client.post("/api/v1/cases", data=data, headers=headers).status_code == 202
    job_ids = [args[0] for task, args, _ in sent_tasks if task == "worker.tasks.analyse"]

    first = np.asarray(PILImage.open(io.BytesIO(image_bytes(SMALL_IMAGES[0]))).convert("RGB"))
    assert tiny_predictor.decision.choose(tiny_predictor.predict([first]))[0] != df  # its map must be redone

    assert tasks.analyse(job_ids[0]) == "succeeded"

    with app.app_context():
        acral, plain = (db.session.get(Job, j).analysis for j in job_ids)
        assert (acral.metadata_used, acral.top_class) == (True, "df") and acral.probabilities["df"] > 0.99
        network = tiny_predictor.decision.choose(np.array([list(plain.probabilities.values())]))[0]
        assert plain.metadata_used is False and plain.top_class == tiny_predictor.class_names[network]
        for analysis in (acral, plain):
            (gradcam,) = db.session.scalars(
                db.select(Explanation).where(Explanation.image_id == analysis.image_id, Explanation.method == "gradcam")
            ).all()
            assert gradcam.class_name == analysis.top_class and gradcam.status == "done"
