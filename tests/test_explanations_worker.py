"""Explanation work in the worker with a real, tiny, untrained predictor (64x64 EfficientNetB3+CBAM).

Grad-CAM comes out of the prediction pass of worker.tasks.analyse; SHAP rows are queued for the top
SHAP_TOP_K classes and computed by worker.tasks.explain_shap; requested Grad-CAM(++) maps by
worker.tasks.explain_gradcam. Files are checked as stored: raw .npy (Grad-CAM float16) at the model's input size
(64x64 here; the image is 200x150), overlay PNGs drawn from that map at its size (Grad-CAM: the colour
map as palette, pixel for pixel colorize(); SHAP: RGBA).
"""

from __future__ import annotations

import dataclasses
import io
import types

import numpy as np
import pytest
from PIL import Image as PILImage
from portal_helpers import SMALL_IMAGES, image_bytes, make_token, make_user, worker_serving

pytestmark = pytest.mark.slow
SHAP_TASK = "worker.tasks.explain_shap"
GRADCAM_TASK = "worker.tasks.explain_gradcam"


@pytest.fixture(scope="module")
def tiny_predictor():
    from ml.predictor import Predictor

    return Predictor.untrained(input_size=(64, 64))


@pytest.fixture
def worker_sent(monkeypatch):
    """Tasks the worker sends (SHAP after a prediction), recorded instead of published."""
    calls: list[tuple] = []
    monkeypatch.setattr("worker.explain.send", lambda name, *args, queue="explain": calls.append((name, args, queue)))
    return calls


@pytest.fixture
def tasks(app, monkeypatch, tiny_predictor, worker_sent):
    settings = dataclasses.replace(app.extensions["settings"], SHAP_TOP_K=2, SHAP_MAX_EVALS=32, SHAP_BATCH_SIZE=32)
    monkeypatch.setitem(app.extensions, "settings", settings)  # tasks read the settings of their app
    return worker_serving(app, monkeypatch, tiny_predictor)


@pytest.fixture
def headers(app):
    make_user(app, "w@example.org")
    return {"Authorization": f"Bearer {make_token(app, 'w@example.org')}"}


@pytest.fixture
def job_id(app, client, web_sent, headers):
    response = client.post("/api/v1/cases", data={"image": (io.BytesIO(image_bytes()), "x.jpg")}, headers=headers)
    assert response.status_code == 202
    return web_sent[0][1][0]


def rows(app):
    from webapp.db import db
    from webapp.models import Explanation

    with app.app_context():
        return [
            {
                c: getattr(e, c)
                for c in (
                    "id",
                    "analysis_id",
                    "method",
                    "class_name",
                    "status",
                    "raw_key",
                    "overlay_key",
                    "error",
                    "params",
                    "attempts",
                )
            }
            for e in db.session.scalars(db.select(Explanation).order_by(Explanation.id))
        ]


def stored(app, key):
    from webapp.storage import storage_from_settings

    with storage_from_settings(app.extensions["settings"]).open(key) as f:
        return f.read()


def check_files(app, row, size=(64, 64)):
    """The model's input size, not the image's: maps never grow with the upload."""
    raw = np.load(io.BytesIO(stored(app, row["raw_key"])), allow_pickle=False)
    dtype = np.float32 if row["method"] == "shap" else np.float16  # SHAP values sit below float16's range
    assert raw.shape == size and raw.dtype == dtype and np.all(np.isfinite(raw))
    overlay = PILImage.open(io.BytesIO(stored(app, row["overlay_key"])))
    assert overlay.format == "PNG" and overlay.size == (size[1], size[0])
    if row["method"] == "shap":
        assert overlay.mode == "RGBA"
    else:
        from ml.explain.overlay import GRADCAM_CMAP, colorize

        assert overlay.mode == "P"
        rgba = np.asarray(overlay.convert("RGBA")).astype(int)
        assert np.array_equal(rgba[..., :3], colorize(raw, GRADCAM_CMAP, 0.0, 1.0))
        # the layer's opacity follows the map: transparent at 0, opaque at 1
        assert np.abs(rgba[..., 3] - np.rint(np.clip(raw.astype(np.float32), 0, 1) * 255)).max() <= 2
    return raw


def test_prediction_stores_gradcam_then_shap_for_the_top_classes(app, tasks, job_id, worker_sent):
    from webapp.db import db
    from webapp.models import Job

    assert tasks.analyse(job_id) == "succeeded"
    with app.app_context():
        analysis = db.session.get(Job, job_id).analysis
        analysis_id, top = analysis.id, analysis.top_class
        ranked = sorted(analysis.probabilities, key=analysis.probabilities.get, reverse=True)
        assert sum(analysis.probabilities.values()) == pytest.approx(1.0, abs=1e-5)

    gradcam, *shap = rows(app)
    assert (gradcam["method"], gradcam["class_name"], gradcam["status"]) == ("gradcam", top, "done")
    assert gradcam["params"]["in_prediction_pass"] is True
    heat = check_files(app, gradcam)
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    # SHAP is only queued by the prediction: its own task, on the explain queue.
    assert [(r["method"], r["class_name"], r["status"]) for r in shap] == [("shap", c, "queued") for c in ranked[:2]]
    assert worker_sent == [(SHAP_TASK, (analysis_id,), "explain")]

    assert tasks.explain_shap(analysis_id) == "done"
    shap = rows(app)[1:]
    assert [r["status"] for r in shap] == ["done", "done"]
    for r in shap:
        values = check_files(app, r)
        assert r["params"]["max_evals"] == 32 and r["params"]["vmax"] >= np.abs(values).max() - 1e-6
        assert r["attempts"] == 1 and r["error"] is None


def test_the_pass_gets_the_images_at_the_models_input_size(app, tasks, job_id, monkeypatch):
    """Resized once, as they are loaded, by the model's own resize: the pass's preprocessing, the
    OOD statistics and the stored maps have nothing left to resample."""
    import worker.batching as batching

    shapes = []
    predict_batch = batching.predict_batch

    def recording(model, images, *args, **kwargs):
        shapes.extend(image.shape for image in images)
        return predict_batch(model, images, *args, **kwargs)

    monkeypatch.setattr(batching, "predict_batch", recording)
    assert tasks.analyse(job_id) == "succeeded"
    assert shapes == [(64, 64, 3)]  # the upload is 200x150
    check_files(app, rows(app)[0])


def test_running_twice_duplicates_nothing(app, tasks, job_id, worker_sent):
    from webapp.db import db
    from webapp.models import Job

    tasks.analyse(job_id)
    analysis_id = rows(app)[0]["analysis_id"]
    tasks.explain_shap(analysis_id)
    before = rows(app)
    assert tasks.explain_shap(analysis_id) == "nothing to do"  # a redelivered message
    with app.app_context():  # a second analyse job for the same image reuses everything
        second = Job(image_id=db.session.get(Job, job_id).image_id, kind="analyse")
        db.session.add(second)
        db.session.commit()
        second_id = second.id
    assert tasks.analyse(second_id) == "succeeded"
    after = rows(app)
    assert after == before and len(after) == 3
    assert [c[0] for c in worker_sent] == [SHAP_TASK]  # nothing left to queue the second time


def analysed_together(app, client, tasks, headers, web_sent, worker_sent) -> tuple[int, int]:
    """Two uploads analysed in one micro-batch; the analyses its one SHAP message lists."""
    for name in SMALL_IMAGES[:2]:
        response = client.post("/api/v1/cases", data={"image": (io.BytesIO(image_bytes(name)), name)}, headers=headers)
        assert response.status_code == 202
    assert tasks.analyse(*(args[0] for _, args, _ in web_sent)) == "succeeded"
    (message,) = [args for name, args, _ in worker_sent if name == SHAP_TASK]  # the probe: one per analysis
    worker_sent.clear()
    return message


def shap_statuses(app) -> dict[int, set[str]]:
    statuses: dict[int, set[str]] = {}
    for row in rows(app):
        if row["method"] == "shap":
            statuses.setdefault(row["analysis_id"], set()).add(row["status"])
    return statuses


def test_a_micro_batch_sends_one_shap_message_and_each_delivery_explains_one_analysis(
    app, client, tasks, headers, web_sent, worker_sent
):
    first, second = analysed_together(app, client, tasks, headers, web_sent, worker_sent)

    assert tasks.explain_shap(first, second) == "done"
    assert worker_sent == [(SHAP_TASK, (second,), "explain")]  # the rest goes on as one message
    assert shap_statuses(app) == {first: {"done"}, second: {"queued"}}
    assert tasks.explain_shap(second) == "done"
    assert shap_statuses(app) == {first: {"done"}, second: {"done"}}


def test_a_micro_batch_inserts_its_explanation_rows_with_one_statement_per_kind(
    app, client, tasks, headers, web_sent, worker_sent
):
    """SQLite cannot return the ids of a multi-row INSERT in order, so rows added to the session
    would go in one INSERT each; the prediction pass needs none of their ids."""
    from sqlalchemy import event

    from webapp.db import db

    inserts: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO explanations"):
            inserts.append(statement)

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        analysed_together(app, client, tasks, headers, web_sent, worker_sent)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert [(r["method"], r["status"]) for r in rows(app)].count(("gradcam", "done")) == 2
    assert len(rows(app)) == 6 and len(inserts) == 2  # the Grad-CAM rows, then the queued SHAP rows


def test_a_shap_message_deferred_for_waiting_predictions_is_sent_again_whole(
    app, client, tasks, headers, web_sent, worker_sent
):
    from worker import explain

    first, second = analysed_together(app, client, tasks, headers, web_sent, worker_sent)
    upload = {"image": (io.BytesIO(image_bytes(SMALL_IMAGES[2])), "w.jpg")}
    waiting = client.post("/api/v1/cases", data=upload, headers=headers)
    assert waiting.status_code == 202  # a prediction job waits: SHAP gives way

    class Delivery:  # a delivery from the broker (not called directly)
        request = types.SimpleNamespace(called_directly=False)
        resent: list[list[int]] = []

        def apply_async(self, args, **options):
            self.resent.append(args)

    with app.app_context():
        assert explain.run_shap(Delivery(), first, (second,)) == "deferred"
    assert Delivery.resent == [[first, second]] and worker_sent == []
    assert shap_statuses(app) == {first: {"queued"}, second: {"queued"}}


def test_shap_failure_ends_failed_with_reason_and_can_be_requested_again(
    app, client, tasks, job_id, headers, web_sent, monkeypatch
):
    tasks.analyse(job_id)
    analysis_id = rows(app)[0]["analysis_id"]

    def broken(*args, **kwargs):
        raise RuntimeError("masker exploded")

    monkeypatch.setattr("ml.explain.shap_explainer.shap_values", broken)
    assert tasks.explain_shap(analysis_id) == "failed"
    failed = [r for r in rows(app) if r["method"] == "shap"]
    assert all(r["status"] == "failed" and r["error"] == "RuntimeError: masker exploded" for r in failed)
    body = client.get("/api/v1/cases/1", headers=headers).json
    shown = [e for e in body["analyses"][0]["explanations"] if e["method"] == "shap"]
    assert all(e["status"] == "failed" and "masker exploded" in e["error"] and e["url"] is None for e in shown)

    # Asking again re-queues the failed row (and sends the task once more).
    response = client.post(
        "/api/v1/cases/1/explanations", json={"method": "shap", "class": failed[0]["class_name"]}, headers=headers
    )
    assert response.status_code == 202 and response.json["status"] == "queued"
    assert web_sent[-1] == (SHAP_TASK, (analysis_id,), "explain")


def test_soft_time_limit_and_wrong_model_version_fail_the_rows(app, tasks, job_id, monkeypatch):
    from celery.exceptions import SoftTimeLimitExceeded

    from webapp.db import db
    from webapp.models import Explanation, ModelVersion

    tasks.analyse(job_id)
    analysis_id = rows(app)[0]["analysis_id"]

    def slow(*args, **kwargs):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr("ml.explain.shap_explainer.shap_values", slow)
    assert tasks.explain_shap(analysis_id) == "failed"
    assert all("Timed out" in r["error"] for r in rows(app) if r["method"] == "shap")

    with app.app_context():  # a row of a model version this worker does not serve
        other = ModelVersion(name="other", version="1", trained=True, class_names=["a"], manifest={})
        db.session.add(other)
        row = db.session.scalar(db.select(Explanation).where(Explanation.method == "gradcam"))
        extra = Explanation(
            analysis_id=row.analysis_id,
            image_id=row.image_id,
            model_version=other,
            method="gradcam++",
            class_name="mel",
            status="queued",
        )
        db.session.add(extra)
        db.session.commit()
        extra_id = extra.id
    assert tasks.explain_gradcam(extra_id) == "failed"
    (failed,) = [r for r in rows(app) if r["id"] == extra_id]
    # Another version is loaded from its artifact folder, as analyse does; this one has none here.
    assert failed["error"].startswith("RuntimeError: Model version other 1 has no artifact folder on this worker")


def test_gradcam_for_another_class_on_request(app, client, tasks, job_id, headers, web_sent):
    tasks.analyse(job_id)
    top = rows(app)[0]["class_name"]
    other = "df" if top != "df" else "nv"
    # Plain Grad-CAM reuses the traced pass (Grad-CAM++ would trace a second graph: ~20 s here;
    # the ml tests cover it, and the task maps "gradcam++" to plus_plus=True).
    response = client.post("/api/v1/cases/1/explanations", json={"method": "gradcam", "class": other}, headers=headers)
    assert response.status_code == 202, response.json
    body = response.json
    assert (body["method"], body["class"], body["status"], body["url"]) == ("gradcam", other, "queued", None)
    assert web_sent[-1] == (GRADCAM_TASK, (body["id"],), "predict")  # never behind SHAP (worker.priority)

    assert tasks.explain_gradcam(body["id"]) == "done"
    (row,) = [r for r in rows(app) if r["id"] == body["id"]]
    heat = check_files(app, row)
    assert heat.min() >= 0.0 and heat.max() <= 1.0 and row["params"]["in_prediction_pass"] is False

    again = client.post("/api/v1/cases/1/explanations", json={"method": "gradcam", "class": other}, headers=headers)
    assert again.status_code == 200 and again.json["status"] == "done" and again.json["id"] == body["id"]
    png = client.get(again.json["url"], headers=headers)
    assert png.status_code == 200 and png.mimetype == "image/png"
    assert tasks.explain_gradcam(body["id"]) == "done"  # redelivered: left alone
