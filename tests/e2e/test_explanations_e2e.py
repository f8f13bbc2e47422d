"""Explanations end to end: real redis-server, a real Celery worker on the predict and explain queues,
the real untrained model at 64x64. An upload ends with its prediction and Grad-CAM map stored
together, and shortly after with SHAP maps for the top two classes (SHAP_MAX_EVALS=64 for speed)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from e2e_support import celery_worker_argv, wait_for
from PIL import Image as PILImage
from portal_helpers import SMALL_IMAGES, image_bytes, login, make_token, make_user

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(480)]
WORKER_WAIT = 300  # TensorFlow import + model build + the first traced pass on a busy 2-core box
SHAP_WAIT = 180


def test_upload_gets_gradcam_with_the_prediction_and_shap_soon_after(web_app, start_worker):
    app = web_app
    worker = start_worker(
        celery_worker_argv("explain-e2e"), {"SHAP_MAX_EVALS": "64", "SHAP_BATCH_SIZE": "64", "SHAP_TOP_K": "2"}
    )
    make_user(app, "x@example.org", role="researcher")
    headers = {"Authorization": f"Bearer {make_token(app, 'x@example.org')}"}
    client = app.test_client()
    response = client.post(
        "/api/v1/cases", data={"image": (io.BytesIO(image_bytes(SMALL_IMAGES[1])), SMALL_IMAGES[1])}, headers=headers
    )
    assert response.status_code == 202, response.json
    url = response.json["url"]

    def analysed():
        body = client.get(url, headers=headers).json
        return body if body["status"] in ("succeeded", "failed") else None

    body = wait_for(analysed, WORKER_WAIT, worker, "the prediction")
    assert body["status"] == "succeeded", (body["jobs"], worker.tail())
    (analysis,) = body["analyses"]
    assert analysis["model"]["version"] == "untrained" and "not a diagnosis" in analysis["warning"]
    by_method = {}
    for e in analysis["explanations"]:
        by_method.setdefault(e["method"], []).append(e)
    # Grad-CAM is stored in the same commit as the prediction: present as soon as the prediction is.
    (gradcam,) = by_method["gradcam"]
    assert gradcam["class"] == analysis["top_class"] and gradcam["status"] == "done", gradcam
    ranked = sorted(analysis["probabilities"], key=analysis["probabilities"].get, reverse=True)
    assert [e["class"] for e in by_method["shap"]] == ranked[:2]

    def shap_finished():
        body = client.get(url, headers=headers).json
        rows = [e for e in body["analyses"][0]["explanations"] if e["method"] == "shap"]
        return rows if all(e["status"] in ("done", "failed") for e in rows) else None

    shap = wait_for(shap_finished, SHAP_WAIT, worker, "the SHAP explanations")
    assert [e["status"] for e in shap] == ["done", "done"], (shap, worker.tail())
    assert all(e["params"]["max_evals"] == 64 for e in shap)

    for e in (gradcam, *shap):
        png = client.get(e["url"], headers=headers)
        assert png.status_code == 200 and png.mimetype == "image/png"
        raw = np.load(io.BytesIO(client.get(e["raw_url"], headers=headers).data), allow_pickle=False)
        # stored at the model's input size, never the upload's (worker.explain.stored_map)
        assert raw.shape[0] <= 150 and raw.shape[1] <= 200
        assert PILImage.open(io.BytesIO(png.data)).size == (raw.shape[1], raw.shape[0])
        if e["method"] == "gradcam":
            assert raw.min() >= 0.0 and raw.max() <= 1.0
    assert client.get(gradcam["url"]).status_code == 302  # no login, no token

    login(client, "x@example.org")
    status = client.get(f"/cases/{body['id']}/status.json").json
    assert status["done"] is True and status["explanations_pending"] is False
    page = client.get(f"/cases/{body['id']}").get_data(as_text=True)
    assert page.count('class="overlay"') == 3 and "Research use only — not a diagnostic device." in page
