"""One case end to end: real redis-server, a real Celery worker process, the real untrained model.

The web side runs in-process (Flask test client) against the same migrated SQLite file, storage
folder and Redis as the worker subprocess; tasks travel through Redis exactly as in production.
"""

from __future__ import annotations

import io

import pytest
from e2e_support import celery_worker_argv, wait_for
from portal_helpers import FULLRES_IMAGE, SMALL_IMAGES, image_bytes, login, make_token, make_user

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]
WORKER_WAIT = 300  # seconds for TensorFlow import + model build + first prediction on a busy 2-core box
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def test_upload_through_the_api_is_analysed_by_the_worker(web_app, start_worker):
    app = web_app
    worker = start_worker(celery_worker_argv("e2e"))
    make_user(app, "e2e@example.org", role="researcher")
    headers = {"Authorization": f"Bearer {make_token(app, 'e2e@example.org')}"}
    client = app.test_client()

    # Two cases: a 200x150 image with metadata and a 600x450 original.
    response = client.post(
        "/api/v1/cases",
        data={
            "image": (io.BytesIO(image_bytes(SMALL_IMAGES[0])), SMALL_IMAGES[0]),
            "age": "40",
            "sex": "female",
            "site": "chest",
            "lesion_ref": "HAM_0000871",
        },
        headers=headers,
    )
    assert response.status_code == 202, response.json
    url = response.json["url"]
    second = client.post(
        "/api/v1/cases", data={"image": (io.BytesIO(image_bytes(FULLRES_IMAGE)), FULLRES_IMAGE)}, headers=headers
    )
    assert second.status_code == 202

    def finished(case_url):
        body = client.get(case_url, headers=headers).json
        return body if body["status"] in ("succeeded", "failed") else None

    body = wait_for(lambda: finished(url), WORKER_WAIT, worker, "the first prediction")
    assert body["status"] == "succeeded", (body["jobs"], worker.tail())
    (analysis,) = body["analyses"]
    assert analysis["status"] == "succeeded"
    assert analysis["model"] == {
        "name": "efficientnetb3-cbam",
        "version": "untrained",
        "trained": False,
        "trained_on": None,
        "top_class_rule": "The top class is the class with the highest probability.",
        "inputs": "the image alone",
    }
    assert "Untrained model" in analysis["warning"] and "not a diagnosis" in analysis["warning"]
    probs = analysis["probabilities"]
    assert list(probs) == CLASSES
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert analysis["top_class"] == max(probs, key=probs.get)
    assert analysis["malignant_probability"] == pytest.approx(probs["akiec"] + probs["bcc"] + probs["mel"], abs=1e-6)
    assert body["disclaimer"] == "Research use only — not a diagnostic device."

    body2 = wait_for(lambda: finished(second.json["url"]), 120, worker, "the second prediction")
    assert body2["status"] == "succeeded" and body2["analyses"][0]["model"]["version"] == "untrained"

    health = client.get("/api/v1/health")
    assert health.status_code == 200, health.json
    assert health.json["broker"]["ok"] and health.json["worker"]["ok"] and health.json["database"]["ok"]

    login(client, "e2e@example.org")
    page = client.get(f"/cases/{body['id']}").get_data(as_text=True)
    for text in [
        "melanoma",
        "melanocytic nevus",
        "actinic keratosis / intraepithelial carcinoma",
        "Untrained model — not a diagnosis",
        "efficientnetb3-cbam",
        "Research use only — not a diagnostic device.",
    ]:
        assert text in page, text
    assert page.count('class="bar"') == 7
