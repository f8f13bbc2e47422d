import io

import pytest
from portal_helpers import csrf_from, image_bytes, login, make_user

from webapp.db import db
from webapp.models import Analysis, Case, Image, ModelVersion, utcnow

pytestmark = pytest.mark.usefixtures("sent_tasks")
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
LONG = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}


def upload_page(client, data=None, **fields):
    page = client.get("/cases/new").get_data(as_text=True)
    body = {"csrf_token": csrf_from(page), "image": (io.BytesIO(data or image_bytes()), "lesion.jpg"), **fields}
    return client.post("/cases/new", data=body, content_type="multipart/form-data")


def finish(app, case_id, trained, failed=False, decision=None, fusion=None, metadata_used=False):
    """Stores what the worker would: a model version and an analysis (or a failure)."""
    manifest = {
        **({"decision": decision} if decision else {}),
        **({"fusion": fusion} if fusion else {}),
        "name": "efficientnetb3-cbam",
        "version": "2026.11.0" if trained else "untrained",
        "trained": trained,
        "trained_on": "HAM10000 200x150, lesion-grouped split" if trained else None,
        "class_names": CLASSES,
        "class_long_names": LONG,
        "malignant_classes": ["akiec", "bcc", "mel"],
    }
    with app.app_context():
        job = db.session.get(Case, case_id).images[0].jobs[0]
        if failed:
            job.status, job.error, job.attempts = "failed", "ValueError: the model exploded", 1
        else:
            mv = ModelVersion(
                name=manifest["name"],
                version=manifest["version"],
                trained=trained,
                trained_on=manifest["trained_on"],
                class_names=CLASSES,
                manifest=manifest,
            )
            probs = dict(zip(CLASSES, [0.05, 0.10, 0.05, 0.05, 0.60, 0.10, 0.05]))
            analysis = Analysis(
                image=job.image,
                model_version=mv,
                status="succeeded",
                probabilities=probs,
                top_class="mel",
                metadata_used=metadata_used,
                finished_at=utcnow(),
            )
            job.status, job.analysis, job.model_version = "succeeded", analysis, mv
        db.session.commit()


def test_upload_form_creates_a_case_and_shows_it_pending(app, logged_in, sent_tasks):
    response = upload_page(logged_in, age="60", sex="male", site="back", patient_ref="P1")
    assert response.status_code == 302
    page = logged_in.get(response.headers["Location"]).get_data(as_text=True)
    assert "queued" in page and 'data-status-url="/cases/1/status.json"' in page and "case.js" in page
    assert "Research use only — not a diagnostic device." in page
    assert "P1" in page and "back" in page
    assert len(sent_tasks) == 1
    with app.app_context():
        key = db.session.scalars(db.select(Image)).one().storage_key
    image = logged_in.get(f"/files/{key}")
    assert image.status_code == 200 and image.mimetype == "image/jpeg"  # a JPEG upload keeps its own data


def test_upload_form_errors_are_shown(logged_in):
    response = upload_page(logged_in, data=b"GIF89a....", age="12")
    assert response.status_code == 415 and "not a JPEG or PNG" in response.get_data(as_text=True)
    response = upload_page(logged_in, age="200")
    assert response.status_code == 400 and "between 0 and 120" in response.get_data(as_text=True)


def test_status_json_and_finished_untrained_result(app, logged_in):
    upload_page(logged_in)
    status = logged_in.get("/cases/1/status.json").json
    assert status["status"] == "queued" and status["done"] is False and "html" in status
    finish(app, 1, trained=False)
    status = logged_in.get("/cases/1/status.json").json
    assert status["done"] is True and status["status"] == "succeeded"
    page = logged_in.get("/cases/1").get_data(as_text=True)
    for text in [
        *LONG.values(),
        "Untrained model — not a diagnosis",
        "efficientnetb3-cbam",
        "untrained",
        "Top class: <strong>melanoma</strong>",
        "60.0%",
        "malignant",
        "Research use only",
    ]:
        assert text in page, text
    assert page.count('class="bar"') == 7
    assert "Untrained model" in status["html"] and "melanoma" in status["html"]


def test_trained_model_names_its_data(app, logged_in):
    upload_page(logged_in)
    finish(app, 1, trained=True)
    page = logged_in.get("/cases/1").get_data(as_text=True)
    assert "Untrained model" not in page
    assert "2026.11.0" in page and "trained on HAM10000 200x150, lesion-grouped split" in page
    assert "malignant classes (akiec, bcc, mel) together 75.0%" in page
    assert "The top class is the class with the highest probability." in page


def test_the_case_page_and_the_api_say_how_the_top_class_is_chosen(app, logged_in, auth_headers):
    rule = "The top class is the class with the highest probability after each probability is divided by ..."
    upload_page(logged_in)
    finish(app, 1, trained=True, decision={"rule": "logit_adjusted_argmax", "tau": 0.5, "description": rule})
    assert rule in logged_in.get("/cases/1").get_data(as_text=True)
    analysis = logged_in.get("/api/v1/cases/1", headers=auth_headers).json["analyses"][0]
    assert analysis["model"]["top_class_rule"] == rule
    export = logged_in.get("/cases/export.csv").get_data(as_text=True)
    assert "top_class_rule" in export.splitlines()[0] and rule in export
    assert analysis["metadata_used"] is False and analysis["model"]["inputs"] == "the image alone"


def test_an_answer_made_with_the_metadata_head_says_so_and_names_the_heads_own_rule(app, logged_in, auth_headers):
    network_rule, head_rule = "Rule of the network, tau 0.55.", "Rule of the metadata head, tau 1.15."
    upload_page(logged_in, age="60", sex="male", site="back")
    finish(
        app,
        1,
        trained=True,
        decision={"rule": "logit_adjusted_argmax", "description": network_rule},
        fusion={"decision": {"rule": "logit_adjusted_argmax", "description": head_rule}},
        metadata_used=True,
    )
    page = logged_in.get("/cases/1").get_data(as_text=True)
    assert head_rule in page and network_rule not in page
    assert "the image with the case&#39;s age, sex and anatomical site" in page
    analysis = logged_in.get("/api/v1/cases/1", headers=auth_headers).json["analyses"][0]
    assert analysis["metadata_used"] is True and analysis["model"]["top_class_rule"] == head_rule
    export = logged_in.get("/cases/export.csv").get_data(as_text=True)
    assert "model_inputs" in export.splitlines()[0] and "age, sex and anatomical site" in export


def test_failed_job_shows_its_reason(app, logged_in):
    upload_page(logged_in)
    finish(app, 1, trained=False, failed=True)
    page = logged_in.get("/cases/1").get_data(as_text=True)
    assert "Analysis failed" in page and "the model exploded" in page


def test_case_list_and_missing_case(logged_in):
    upload_page(logged_in)
    assert "#1" in logged_in.get("/cases").get_data(as_text=True)
    response = logged_in.get("/cases/99")
    assert response.status_code == 404 and "No case" in response.get_data(as_text=True)
    assert logged_in.get("/files/../../etc/passwd").status_code == 404
    assert logged_in.get("/files/images/aa/bb/none.png").status_code == 404


def test_reviewer_cannot_open_the_upload_form(app, client):
    make_user(app, "rev@example.org", role="reviewer")
    login(client, "rev@example.org")
    assert client.get("/cases/new").status_code == 403
    assert "Upload</a>" not in client.get("/cases").get_data(as_text=True)
