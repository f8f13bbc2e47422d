"""Explanations on the web side (no TensorFlow): rows and files as the worker stores them, the API
JSON, requests for more maps, access control on the files, the case page and its polling JSON."""

from __future__ import annotations

import io

import numpy as np
import pytest
from e2e.e2e_support import redis_url  # noqa: F401  (fixture: a real redis-server)
from PIL import Image as PILImage
from portal_helpers import SMALL_IMAGES, csrf_from, image_bytes, login, make_token, make_user

from webapp.db import db
from webapp.models import Analysis, Case, Explanation, ModelVersion, utcnow

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
MANIFEST = {
    "name": "efficientnetb3-cbam",
    "version": "untrained",
    "trained": False,
    "trained_on": None,
    "class_names": CLASSES,
    "class_long_names": {c: c.upper() for c in CLASSES},
    "malignant_classes": ["akiec", "bcc", "mel"],
}


@pytest.fixture
def sent(web_sent):
    return web_sent


@pytest.fixture
def token(app, researcher):
    return make_token(app, researcher)


def png(width, height, mode="RGBA") -> bytes:
    buffer = io.BytesIO()
    PILImage.new(mode, (width, height), (255, 0, 0, 128) if mode == "RGBA" else (255, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.fixture
def case_id(app, client, sent, token):
    """A case analysed as the worker leaves it: Grad-CAM done, SHAP for two classes queued."""
    from webapp.cases.explanations import explanation_keys
    from webapp.storage import storage_from_settings

    response = client.post(
        "/api/v1/cases",
        data={"image": (io.BytesIO(image_bytes()), "x.jpg")},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 202
    with app.app_context():
        case = db.session.get(Case, response.json["id"])
        image, job = case.images[0], case.images[0].jobs[0]
        mv = ModelVersion(
            name=MANIFEST["name"], version="untrained", trained=False, class_names=CLASSES, manifest=MANIFEST
        )
        probs = dict(zip(CLASSES, [0.05, 0.10, 0.05, 0.05, 0.60, 0.10, 0.05]))
        analysis = Analysis(
            image=image,
            model_version=mv,
            status="succeeded",
            probabilities=probs,
            top_class="mel",
            finished_at=utcnow(),
        )
        job.status, job.analysis, job.model_version = "succeeded", analysis, mv
        db.session.add_all([mv, analysis])
        db.session.flush()
        raw_key, overlay_key = explanation_keys(image.content_hash, mv.id, "gradcam", "mel")
        storage = storage_from_settings(app.extensions["settings"])
        storage.save(
            raw_key,
            npy(np.linspace(0, 1, image.height * image.width, dtype=np.float32).reshape(image.height, image.width)),
        )
        storage.save(overlay_key, png(image.width, image.height))
        db.session.add_all(
            [
                Explanation(
                    analysis=analysis,
                    image=image,
                    model_version=mv,
                    method="gradcam",
                    class_name="mel",
                    status="done",
                    raw_key=raw_key,
                    overlay_key=overlay_key,
                    attempts=1,
                    finished_at=utcnow(),
                ),
                Explanation(
                    analysis=analysis, image=image, model_version=mv, method="shap", class_name="mel", status="queued"
                ),
                Explanation(
                    analysis=analysis, image=image, model_version=mv, method="shap", class_name="bcc", status="queued"
                ),
            ]
        )
        db.session.commit()
        return case.id


def test_explanation_keys_are_valid_storage_keys():
    from webapp.cases.explanations import explanation_keys

    raw, overlay = explanation_keys("ab" * 32, 3, "gradcam++", "mel")
    assert raw == f"explanations/ab/ab/{'ab' * 32}/m3-gradcampp-mel.npy" and overlay.endswith("m3-gradcampp-mel.png")


def test_unique_per_image_model_version_method_and_class(app, case_id):
    from sqlalchemy.exc import IntegrityError

    with app.app_context():
        first = db.session.scalars(db.select(Explanation)).first()
        db.session.add(
            Explanation(
                analysis_id=first.analysis_id,
                image_id=first.image_id,
                model_version_id=first.model_version_id,
                method="gradcam",
                class_name="mel",
            )
        )
        with pytest.raises(IntegrityError):
            db.session.commit()
        db.session.rollback()
        db.session.add(
            Explanation(
                analysis_id=first.analysis_id,
                image_id=first.image_id,
                model_version_id=first.model_version_id,
                method="lime",
                class_name="mel",
            )
        )
        with pytest.raises(IntegrityError):
            db.session.commit()


def test_api_lists_explanations_with_method_class_status_and_urls(client, case_id, token):
    body = client.get(f"/api/v1/cases/{case_id}", headers={"Authorization": f"Bearer {token}"}).json
    (analysis,) = body["analyses"]
    assert analysis["model"]["version"] == "untrained" and "Untrained model" in analysis["warning"]
    assert body["disclaimer"] == "Research use only — not a diagnostic device." and body["explanations_pending"]
    gradcam, shap_mel, shap_bcc = analysis["explanations"]
    assert {k: gradcam[k] for k in ("method", "class", "status")} == {
        "method": "gradcam",
        "class": "mel",
        "status": "done",
    }
    assert gradcam["url"] == f"/cases/{case_id}/explanations/{gradcam['id']}/overlay.png"
    assert gradcam["raw_url"] == f"/cases/{case_id}/explanations/{gradcam['id']}/raw.npy"
    assert gradcam["model"] == {"name": "efficientnetb3-cbam", "version": "untrained", "trained": False}
    assert gradcam["class_name"] == "MEL" and gradcam["method_label"] == "Grad-CAM"
    assert [(e["method"], e["class"], e["status"], e["url"], e["raw_url"]) for e in (shap_mel, shap_bcc)] == [
        ("shap", "mel", "queued", None, None),
        ("shap", "bcc", "queued", None, None),
    ]


def test_explanation_files_need_a_login_or_a_token(app, client, case_id, token):
    body = client.get(f"/api/v1/cases/{case_id}", headers={"Authorization": f"Bearer {token}"}).json
    gradcam = body["analyses"][0]["explanations"][0]
    url, raw_url = gradcam["url"], gradcam["raw_url"]

    anonymous = client.get(url)
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]
    assert client.get(raw_url).status_code == 302
    bad = client.get(url, headers={"Authorization": "Bearer dp_nope"})
    assert bad.status_code == 401 and bad.json["status"] == 401

    ok = client.get(url, headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and ok.mimetype == "image/png"
    assert "private" in ok.headers["Cache-Control"]
    assert PILImage.open(io.BytesIO(ok.data)).size == (200, 150)
    raw = client.get(raw_url, headers={"Authorization": f"Bearer {token}"})
    assert raw.status_code == 200 and raw.mimetype == "application/octet-stream"
    values = np.load(io.BytesIO(raw.data), allow_pickle=False)
    assert values.shape == (150, 200) and 0.0 <= values.min() and values.max() <= 1.0

    login(client, "researcher@example.org")
    assert client.get(url).status_code == 200
    pending = body["analyses"][0]["explanations"][1]["id"]
    assert client.get(f"/cases/{case_id}/explanations/{pending}/overlay.png").status_code == 404  # not stored yet
    assert client.get(f"/cases/{case_id + 1}/explanations/{gradcam['id']}/overlay.png").status_code == 404  # other case
    assert client.get(f"/cases/{case_id}/explanations/9999/raw.npy").status_code == 404


@pytest.mark.parametrize(
    "body, status, match",
    [
        ({"method": "lime", "class": "mel"}, 400, "method must be one of"),
        ({"method": "gradcam", "class": "melanoma"}, 400, "class must be one of"),
        ({"method": "gradcam", "class": "mel", "analysis_id": "x"}, 400, "analysis_id must be a whole number"),
        ({"method": "gradcam", "class": "mel", "analysis_id": 99}, 404, "no finished analysis with id 99"),
    ],
)
def test_bad_explanation_requests(client, case_id, token, sent, body, status, match):
    response = client.post(
        f"/api/v1/cases/{case_id}/explanations", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == status and match in response.json["error"]
    assert not [c for c in sent if c[0].startswith("worker.tasks.explain")]


def test_explanation_requests_need_a_token_and_a_finished_analysis(app, client, sent, token):
    assert client.post("/api/v1/cases/1/explanations", json={"method": "gradcam"}).status_code == 401
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/api/v1/cases/1/explanations", json={"method": "gradcam"}, headers=headers).status_code == 404
    client.post("/api/v1/cases", data={"image": (io.BytesIO(image_bytes()), "x.jpg")}, headers=headers)
    response = client.post("/api/v1/cases/1/explanations", json={"method": "gradcam", "class": "mel"}, headers=headers)
    assert response.status_code == 409 and "no finished analysis" in response.json["error"]


def test_requesting_a_map_queues_it_once(app, client, case_id, token, sent):
    headers = {"Authorization": f"Bearer {token}"}
    first = client.post(
        f"/api/v1/cases/{case_id}/explanations", json={"method": "gradcam++", "class": "nv"}, headers=headers
    )
    assert first.status_code == 202
    assert (first.json["method"], first.json["class"], first.json["status"]) == ("gradcam++", "nv", "queued")
    # on the predict queue, which SHAP never fills: a requested map does not wait behind a SHAP backlog
    assert sent[-1] == ("worker.tasks.explain_gradcam", (first.json["id"],), "predict")
    done = client.post(
        f"/api/v1/cases/{case_id}/explanations", json={"method": "gradcam", "class": "mel"}, headers=headers
    )
    assert done.status_code == 200 and done.json["status"] == "done" and done.json["url"]
    shap = client.post(f"/api/v1/cases/{case_id}/explanations", json={"method": "shap", "class": "df"}, headers=headers)
    assert shap.status_code == 202 and sent[-1][0] == "worker.tasks.explain_shap"
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Explanation.id))) == 5


def test_case_page_shows_original_gradcam_and_shap_with_controls(app, client, case_id, researcher, sent):
    login(client, researcher)
    page = client.get(f"/cases/{case_id}").get_data(as_text=True)
    assert 'id="explanations"' in page and "explanations.js" in page
    assert 'class="explanation-class"' in page and 'type="range" class="explanation-opacity"' in page
    assert page.count('class="explanation-row"') == 2  # mel (Grad-CAM + SHAP queued) and bcc (SHAP queued)
    assert f'src="/cases/{case_id}/explanations/1/overlay.png"' in page and "raw map (.npy)" in page
    assert "Untrained model — not a diagnosis" in page and "efficientnetb3-cbam" in page
    assert "Research use only — not a diagnostic device." in page
    assert "<script>" not in page and "onclick" not in page  # no inline scripts (CSP)
    assert 'data-done="false"' in page  # SHAP pending: keep polling

    status = client.get(f"/cases/{case_id}/status.json").json
    assert status["done"] is False and status["explanations_pending"] is True
    assert "explanation-row" in status["explanations_html"]
    with app.app_context():
        for row in db.session.scalars(db.select(Explanation).where(Explanation.method == "shap")):
            row.status, row.error = "failed", "RuntimeError: boom"
        db.session.commit()
    status = client.get(f"/cases/{case_id}/status.json").json
    assert status["done"] is True and "RuntimeError: boom" in status["explanations_html"]


def test_page_form_requests_a_map(app, client, case_id, researcher, sent):
    login(client, researcher)
    page = client.get(f"/cases/{case_id}").get_data(as_text=True)
    response = client.post(
        f"/cases/{case_id}/explanations",
        data={"csrf_token": csrf_from(page), "method": "gradcam", "class": "bkl", "analysis_id": "1"},
    )
    assert response.status_code == 302 and response.headers["Location"].endswith(
        f"/cases/{case_id}?show_analysis=1&show_class=bkl#explanations"
    )
    assert sent[-1][0] == "worker.tasks.explain_gradcam"
    assert (
        client.post(f"/cases/{case_id}/explanations", data={"method": "gradcam", "class": "bkl"}).status_code == 400
    )  # no CSRF


def test_reviewers_see_maps_too(app, client, case_id, sent):
    make_user(app, "rev@example.org", role="reviewer")
    token = make_token(app, "rev@example.org")
    body = client.get(f"/api/v1/cases/{case_id}", headers={"Authorization": f"Bearer {token}"}).json
    url = body["analyses"][0]["explanations"][0]["url"]
    assert client.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_sweep_fails_stale_running_rows_and_resends_old_queued_ones(app, case_id):
    from datetime import timedelta

    from worker.recovery import sweep_explanations

    sent = []
    with app.app_context():
        shap_mel, shap_bcc = db.session.scalars(db.select(Explanation).where(Explanation.method == "shap")).all()
        shap_mel.status, shap_mel.started_at = "running", utcnow() - timedelta(hours=1)
        db.session.commit()
    later = utcnow() + timedelta(minutes=10)
    counts = sweep_explanations(app, now=later, send_fn=lambda name, *args: sent.append((name, args)))
    assert counts == {"failed": 1, "resent": 1}
    assert sent == [("worker.tasks.explain_shap", (1,))]
    assert sweep_explanations(app, now=later + timedelta(minutes=1), send_fn=lambda *a: sent.append(a)) == {
        "failed": 0,
        "resent": 0,
    }
    with app.app_context():
        failed = db.session.scalar(db.select(Explanation).where(Explanation.status == "failed"))
        assert failed.class_name == "mel" and "its worker stopped" in failed.error


def test_the_periodic_sweeper_also_sweeps_explanations(app, case_id, monkeypatch):
    """The worker's timer thread (worker.sweep.Sweeper) runs the explanation sweep on every pass."""
    from datetime import timedelta
    from types import SimpleNamespace

    from worker import recovery
    from worker.sweep import Sweeper

    with app.app_context():
        row = db.session.scalars(db.select(Explanation).where(Explanation.method == "shap")).first()
        row.status, row.started_at = "running", utcnow() - timedelta(hours=1)
        db.session.commit()
        row_id = row.id
    settings = app.extensions["settings"]
    sweeper = Sweeper(SimpleNamespace(send_task=lambda *a, **k: SimpleNamespace(id="x")), settings, interval=0)
    sweeper._flask_app = app
    monkeypatch.setattr(recovery, "send", lambda *a, **k: "sent")
    assert sweeper._sweep_explanations()["failed"] == 1
    with app.app_context():
        assert db.session.get(Explanation, row_id).status == "failed"


# --- readable maps and visible work (issue 17) ----------------------------------------------------


def test_case_page_draws_colour_scales_their_meaning_and_full_size_links(client, case_id, researcher, sent):
    login(client, researcher)
    page = client.get(f"/cases/{case_id}").get_data(as_text=True)
    assert 'src="/static/colorbar-gradcam.svg"' in page and 'src="/static/colorbar-shap.svg"' in page
    assert "where the map is weak the lesion itself shows through" in page
    assert "red regions raise, blue regions lower the probability of the shown class" in page
    assert page.count("full size (200×150 px)") == 2 and "Full-size image" in page  # explanations and image column
    assert 'value="80" aria-label="Overlay opacity"' in page  # the layer's own alpha already follows the map
    # image, Grad-CAM and SHAP side by side in one row for the shown class
    row = page.split('data-class="mel"')[1].split('class="explanation-row"')[0]
    assert 'class="explanation original"' in row and 'class="explanation gradcam"' in row
    assert 'class="explanation shap"' in row
    assert client.get("/static/colorbar-gradcam.svg").status_code == 200


def test_a_requested_class_stays_on_show_while_its_map_is_computed(app, client, case_id, researcher, sent):
    login(client, researcher)
    page = client.get(f"/cases/{case_id}").get_data(as_text=True)
    response = client.post(
        f"/cases/{case_id}/explanations",
        data={"csrf_token": csrf_from(page), "method": "gradcam", "class": "bkl", "analysis_id": "1"},
        follow_redirects=True,
    )
    page = response.get_data(as_text=True)
    assert '<option value="bkl" selected>' in page and '<option value="mel" selected>' not in page
    assert '<div class="explanation-row" data-class="bkl">' in page  # shown
    assert '<div class="explanation-row" data-class="mel" hidden>' in page
    assert "Grad-CAM for bkl is queued" in page
    # a class the panel does not have (a forged address) falls back to the predicted one
    page = client.get(f"/cases/{case_id}?show_analysis=1&show_class=nope").get_data(as_text=True)
    assert '<option value="mel" selected>' in page


def _upload(client, token, n: int = 1) -> int:
    response = client.post(
        "/api/v1/cases",
        data={"image": (io.BytesIO(image_bytes(SMALL_IMAGES[n])), "x.jpg")},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 202
    return response.json["id"]


def test_a_waiting_case_says_its_place_in_the_queue_and_the_version_it_waits_for(
    app, client, case_id, token, researcher, sent
):
    from webapp.models import Job

    login(client, researcher)
    second, third = _upload(client, token, 1), _upload(client, token, 2)  # the broker is down: both stay queued
    assert 'queue-place">2 of 2<' in client.get(f"/cases/{third}/status.json").json["html"]
    page = client.get(f"/cases/{second}").get_data(as_text=True)
    assert 'class="queue-place">1 of 2</span> analyses waiting' in page
    with app.app_context():  # a re-run of the first case with another version
        case = db.session.get(Case, case_id)
        mv = ModelVersion(
            name="efficientnetb3-cbam", version="v2", trained=True, class_names=CLASSES, manifest=MANIFEST
        )
        db.session.add_all([mv, Job(image=case.images[0], model_version=mv, status="queued")])
        db.session.commit()
    html = client.get(f"/cases/{case_id}/status.json").json["html"]
    assert "Analysis with <strong>efficientnetb3-cbam v2</strong>" in html and "3 of 3<" in html
    # its queued SHAP maps say where they stand as well
    assert 'SHAP maps: queued, <span class="queue-place">1 of 2</span>' in html
    with app.app_context():
        for job in db.session.scalars(db.select(Job).where(Job.status == "queued")):
            job.status = "running"
        db.session.commit()
    assert "running now" in client.get(f"/cases/{second}/status.json").json["html"]


def test_the_case_page_says_when_the_worker_is_warming_up(
    app,
    client,
    token,
    researcher,
    sent,
    redis_url,  # noqa: F811  (the fixture imported above)
):
    from webapp.queue import forget_warm_workers, mark_worker_warm

    login(client, researcher)
    case = _upload(client, token)
    # Redis unreachable (the app's default here): the page does not guess
    assert "warming up" not in client.get(f"/cases/{case}").get_data(as_text=True)
    app.config["REDIS_URL"] = redis_url
    forget_warm_workers(redis_url)  # a worker just started: no process has warmed its model yet
    assert "The worker is warming up its model" in client.get(f"/cases/{case}/status.json").json["html"]
    mark_worker_warm(redis_url, "host:123")  # as worker.process reports after its warm-up
    assert "warming up" not in client.get(f"/cases/{case}/status.json").json["html"]


def test_requested_gradcam_maps_never_wait_behind_shap(app, case_id):
    """On the predict queue (which SHAP never fills), and a queued Grad-CAM makes SHAP give way."""
    from datetime import timedelta

    from webapp.cases.explanations import GRADCAM_TASK
    from webapp.models import Job
    from worker.celery_app import app as celery_app
    from worker.priority import queued_predictions

    assert celery_app.conf.task_routes[GRADCAM_TASK]["queue"] == "predict"  # the worker's own re-sends too
    with app.app_context():
        for job in db.session.scalars(db.select(Job)):  # no upload arriving: SHAP may run
            job.created_at = utcnow() - timedelta(minutes=5)
        db.session.commit()
        assert queued_predictions() == 0
        row = db.session.scalars(db.select(Explanation).where(Explanation.method == "gradcam")).first()
        db.session.add(
            Explanation(
                analysis_id=row.analysis_id,
                image_id=row.image_id,
                model_version_id=row.model_version_id,
                method="gradcam++",
                class_name="nv",
                status="queued",
            )
        )
        db.session.commit()
        assert queued_predictions() == 1


def test_a_batch_is_finished_only_when_its_explanation_maps_are_too(app, client, token, researcher, sent):
    """Predictions done but SHAP still queued: the batch page counts the maps and does not say Finished."""
    from webapp.models import Batch, Job

    headers = {"Authorization": f"Bearer {token}"}
    response = client.post(
        "/api/v1/batches",
        headers=headers,
        data={"images": [(io.BytesIO(image_bytes(n)), f"folder/{n}") for n in SMALL_IMAGES[:2]]},
    )
    assert response.status_code == 202, response.json
    batch_id = response.json["id"]
    login(client, researcher)
    with app.app_context():  # both analysed, as the worker leaves them: Grad-CAM done, SHAP queued
        mv = ModelVersion(name="m", version="1", trained=True, class_names=CLASSES, manifest=MANIFEST)
        db.session.add(mv)
        for job in db.session.scalars(db.select(Job)):
            analysis = Analysis(image=job.image, model_version=mv, status="succeeded", top_class="mel")
            job.status, job.analysis = "succeeded", analysis
            db.session.add_all(
                [
                    analysis,
                    Explanation(
                        analysis=analysis,
                        image=job.image,
                        model_version=mv,
                        method="gradcam",
                        class_name="mel",
                        status="done",
                    ),
                    Explanation(
                        analysis=analysis,
                        image=job.image,
                        model_version=mv,
                        method="shap",
                        class_name="mel",
                        status="queued",
                    ),
                ]
            )
        db.session.commit()
    progress = client.get(f"/api/v1/batches/{batch_id}", headers=headers).json
    assert progress["counts"]["done"] == 2 and progress["predictions_finished"] is True
    assert progress["explanations"] == {"queued": 2, "running": 0, "done": 2, "failed": 0}
    assert progress["finished"] is False
    page = client.get(f"/batches/{batch_id}").get_data(as_text=True)
    assert "Predictions finished; explanation maps still being computed" in page
    assert '<span id="maps-queued">2</span> queued' in page and ">Finished<" not in page
    with app.app_context():
        for row in db.session.scalars(db.select(Explanation).where(Explanation.method == "shap")):
            row.status = "done"
        db.session.commit()
        assert db.session.get(Batch, batch_id) is not None
    progress = client.get(f"/batches/{batch_id}/progress.json").json
    assert progress["finished"] is True and progress["explanations"]["done"] == 4
    assert ">Finished<" in client.get(f"/batches/{batch_id}").get_data(as_text=True)
