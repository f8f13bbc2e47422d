import io
import time

import pytest
from PIL import Image
from portal_helpers import FULLRES_IMAGE, SMALL_IMAGES, image_bytes, make_token, make_user

from webapp.config import DISCLAIMER
from webapp.db import db
from webapp.models import Case, Job

pytestmark = pytest.mark.usefixtures("sent_tasks")


def upload(client, headers, data=None, name=SMALL_IMAGES[0], **fields):
    body = {"image": (io.BytesIO(image_bytes(name) if data is None else data), name), **fields}
    return client.post("/api/v1/cases", data=body, headers=headers, content_type="multipart/form-data")


def test_upload_commits_case_image_job_and_sends_the_task(app, client, auth_headers, sent_tasks):
    response = upload(
        client, auth_headers, age="45", sex="female", site="lower extremity", patient_ref="P-001", lesion_ref="L-7"
    )
    assert response.status_code == 202, response.json
    body = response.json
    assert body["url"] == f"/api/v1/cases/{body['id']}" and response.headers["Location"] == body["url"]
    with app.app_context():
        case = db.session.get(Case, body["id"])
        assert (case.age, case.sex, case.site, case.patient_ref, case.lesion_ref) == (
            45,
            "female",
            "lower extremity",
            "P-001",
            "L-7",
        )
        image = case.images[0]
        assert (image.width, image.height, image.original_filename) == (200, 150, SMALL_IMAGES[0])
        job = image.jobs[0]
        assert job.status == "queued" and job.kind == "analyse"
        assert (app.config["STORAGE_DIR"] / image.storage_key).is_file()
    assert sent_tasks == [("worker.tasks.analyse", (job.id,), "predict")]


def test_case_json_before_analysis(client, auth_headers):
    case_id = upload(client, auth_headers).json["id"]
    body = client.get(f"/api/v1/cases/{case_id}", headers=auth_headers).json
    assert body["id"] == case_id and body["status"] == "queued"
    assert body["analyses"] == [] and body["disclaimer"] == DISCLAIMER
    assert body["jobs"][0]["status"] == "queued"


def test_fullres_upload(client, auth_headers):
    assert upload(client, auth_headers, name=FULLRES_IMAGE).status_code == 202


def test_duplicate_image_points_to_the_existing_case(client, auth_headers):
    first = upload(client, auth_headers).json["id"]
    response = upload(client, auth_headers)
    assert response.status_code == 409 and response.json["id"] == first and "already uploaded" in response.json["error"]


def png(size=(10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (120, 80, 60)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    "fields, data, status, message",
    [
        ({"age": "abc"}, None, 400, "age must be a whole number"),
        ({"age": "121"}, None, 400, "between 0 and 120"),
        ({"age": "-3"}, None, 400, "between 0 and 120"),
        ({"sex": "other"}, None, 400, "sex must be one of"),
        ({"site": "elbow"}, None, 400, "site must be one of"),
        ({"patient_ref": "x" * 65}, None, 400, "at most 64"),
        ({}, b"not an image at all", 415, "not a JPEG or PNG"),
        ({}, b"", 400, "empty"),
        ({}, image_bytes(SMALL_IMAGES[1])[:500], 400, "could not be decoded"),
    ],
)
def test_bad_uploads_get_a_json_4xx(app, client, auth_headers, fields, data, status, message):
    response = upload(client, auth_headers, data=data, **fields)
    assert response.status_code == status and message in response.json["error"]
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Case.id))) == 0


def test_no_file(client, auth_headers):
    response = client.post("/api/v1/cases", data={"age": "3"}, headers=auth_headers)
    assert response.status_code == 400 and "No file" in response.json["error"]
    response = client.post("/api/v1/cases", json={"image": "x"}, headers=auth_headers)
    assert response.status_code == 400


def test_too_large(app, client, auth_headers):
    app.config["MAX_UPLOAD_MB"] = 0.1  # the exact check in webapp.imaging
    response = upload(client, auth_headers, name=FULLRES_IMAGE)
    assert response.status_code == 413 and "larger than the limit" in response.json["error"]
    app.config["MAX_CONTENT_LENGTH"] = 50_000  # the request itself is refused by Flask
    response = upload(client, auth_headers, name=FULLRES_IMAGE)
    assert response.status_code == 413 and response.is_json


def test_too_many_pixels(app, client, auth_headers):
    app.config["MAX_IMAGE_PIXELS"] = 1000
    response = upload(client, auth_headers, data=png((100, 100)))
    assert response.status_code == 413 and "more than the limit" in response.json["error"]


def test_site_and_sex_are_normalised(client, auth_headers):
    response = upload(client, auth_headers, data=png(), sex="Male", site="Upper_Extremity", age=" 7 ")
    assert response.status_code == 202
    body = client.get(response.json["url"], headers=auth_headers).json
    assert (body["sex"], body["site"], body["age"]) == ("male", "upper extremity", 7)


def test_unknown_case_and_bad_routes(client, auth_headers):
    response = client.get("/api/v1/cases/424242", headers=auth_headers)
    assert response.status_code == 404 and "No case" in response.json["error"]
    assert client.get("/api/v1/cases/abc", headers=auth_headers).status_code == 404
    assert client.get("/api/v1/nothing", headers=auth_headers).is_json
    assert client.put("/api/v1/cases/1", headers=auth_headers).status_code == 405  # DELETE: tests/test_deletion.py


def test_missing_or_wrong_token(client):
    assert upload(client, {}).status_code == 401
    assert upload(client, {"Authorization": "Bearer nope"}).json["error"].startswith("Invalid")


def test_reviewers_cannot_upload(app, client):
    make_user(app, "rev@example.org", role="reviewer")
    headers = {"Authorization": f"Bearer {make_token(app, 'rev@example.org')}"}
    response = upload(client, headers)
    assert response.status_code == 403 and "may not upload" in response.json["error"]


def test_broker_down_keeps_the_job_queued(app, client, auth_headers, monkeypatch):
    """With the real send() and no Redis listening, the upload still succeeds, quickly."""
    monkeypatch.undo()  # drop the sent_tasks fake: publish for real, to a closed port
    started = time.monotonic()
    response = upload(client, auth_headers)
    assert response.status_code == 202
    assert time.monotonic() - started < 10
    with app.app_context():
        assert db.session.scalars(db.select(Job)).one().status == "queued"


def test_health_reports_the_broker_down_without_hanging(client):
    started = time.monotonic()
    response = client.get("/api/v1/health")
    assert time.monotonic() - started < 10
    body = response.json
    assert response.status_code == 503 and body["status"] == "degraded"
    assert body["web"]["ok"] and body["database"]["ok"]
    assert not body["broker"]["ok"] and not body["worker"]["ok"]
