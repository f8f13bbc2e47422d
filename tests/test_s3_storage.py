"""The portal on S3 storage (a moto server process): settings, what the server guarantees, and one
case's files through upload, the worker, the file routes, deletion, and backup's refusal."""

from __future__ import annotations

import http.client
import io
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
from portal_helpers import FAKE_CLASSES, FAKE_MANIFEST, image_bytes, make_token, make_user, worker_serving
from s3_support import bucket_names
from sqlalchemy import select

from webapp.config import ConfigError, Settings
from webapp.storage import S3Storage, StorageError, image_key, storage_from_settings

ADMIN = "admin@example.org"


# --- settings -------------------------------------------------------------------------------------------


def test_local_folder_is_the_default_and_s3_is_chosen_by_setting(tmp_path):
    local = Settings.load(environ={"INSTANCE_DIR": str(tmp_path)})
    assert local.STORAGE_BACKEND == "local" and type(storage_from_settings(local)).__name__ == "LocalStorage"
    env = {
        "INSTANCE_DIR": str(tmp_path),
        "STORAGE_BACKEND": "s3",
        "S3_BUCKET": "scans",
        "S3_ENDPOINT_URL": "http://127.0.0.1:1",
        "S3_REGION": "eu-west-1",
        "S3_PREFIX": "/dermportal/",
    }
    storage = storage_from_settings(Settings.load(environ=env))
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.name("images/a.png")) == ("scans", "dermportal/images/a.png")
    assert storage.client.meta.region_name == "eu-west-1"
    assert storage_from_settings(Settings.load(environ=env)).client is storage.client  # one client per process


@pytest.mark.parametrize(
    "env, message",
    [
        ({"STORAGE_BACKEND": "s3"}, "STORAGE_BACKEND=s3 needs S3_BUCKET"),
        ({"STORAGE_BACKEND": "ftp"}, r"STORAGE_BACKEND must be one of \('local', 's3'\), got 'ftp'"),
    ],
)
def test_storage_settings_that_cannot_work_are_refused(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.load(environ={"INSTANCE_DIR": str(tmp_path), **env})


def test_a_bad_prefix_is_refused():
    with pytest.raises(StorageError, match="Invalid storage key"):
        S3Storage("scans", prefix="../other", client=object())


# --- what the server guarantees ---------------------------------------------------------------------------


def raw_put(endpoint: str, bucket: str, name: str, body: bytes, announced: int) -> int | None:
    """A PUT that announces `announced` bytes, sends `body`, then hangs up: the status, or None if none came."""
    url = urlsplit(endpoint)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    connection.putrequest("PUT", f"/{bucket}/{name}")
    connection.putheader("Content-Length", str(announced))
    connection.endheaders()
    connection.send(body)
    if len(body) < announced:
        connection.sock.shutdown(2)  # the client's machine died mid-upload
        connection.close()
        return None
    status = connection.getresponse().status
    connection.close()
    return status


def test_an_upload_cut_off_midway_stores_no_object(s3_bucket):
    """Why S3Storage.save needs no temporary key: the server keeps nothing of a PUT that breaks off."""
    endpoint, bucket = s3_bucket
    assert raw_put(endpoint, bucket, "images/cut.png", b"x" * 200_000, announced=1_000_000) is None
    time.sleep(0.5)  # the server has seen the connection close
    assert bucket_names(endpoint, bucket) == []
    assert raw_put(endpoint, bucket, "images/whole.png", b"x" * 1000, announced=1000) == 200  # the same PUT, whole
    assert bucket_names(endpoint, bucket) == ["images/whole.png"]


def test_a_fault_of_the_service_is_not_taken_for_a_missing_object(s3_bucket):
    endpoint, _ = s3_bucket
    storage = S3Storage("no-such-bucket", endpoint_url=endpoint, region="us-east-1")
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="NoSuchBucket"):
        storage.open("images/a.png")
    with pytest.raises(ClientError, match="NoSuchBucket"):
        storage.save("images/a.png", b"x")  # an upload fails loudly, before its row is committed


# --- one case through the portal ---------------------------------------------------------------------------


class FakePredictor:
    """The worker's predictor without TensorFlow; records the shapes of the images it was given."""

    manifest = FAKE_MANIFEST
    class_names = FAKE_CLASSES

    def __init__(self):
        self.seen = []

    def predict(self, images):
        self.seen.extend(im.shape for im in images)
        p = np.arange(1, 8, dtype=np.float32)
        return (p / p.sum())[None, :]


def make_app(tmp_path, database_url, name, **storage):
    from webapp import create_app
    from webapp.db import db

    app = create_app(
        {
            "TESTING": True,
            "INSTANCE_DIR": tmp_path / f"{name}-instance",
            "DATABASE_URL": database_url,
            "STORAGE_DIR": tmp_path / f"{name}-storage",
            "MODEL_DIR": tmp_path / "no-model",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "BROKER_TIMEOUT": 0.5,
            **storage,
        }
    )
    with app.app_context():
        db.create_all()
    return app


@pytest.fixture
def s3_app(tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    app = make_app(
        tmp_path,
        f"sqlite:///{tmp_path / 's3.db'}",
        "s3",
        STORAGE_BACKEND="s3",
        S3_BUCKET=bucket,
        S3_ENDPOINT_URL=endpoint,
        S3_REGION="us-east-1",
        S3_PREFIX="portal",
    )
    yield app
    from webapp.db import db

    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def worker(s3_app, monkeypatch):
    """worker.tasks running in `s3_app`, with the fake predictor."""
    predictor = FakePredictor()
    return worker_serving(s3_app, monkeypatch, predictor), predictor


def upload(app, sent_tasks) -> tuple[dict, int, dict]:
    """A case uploaded through the API by a new researcher: (its JSON, its job id, the auth headers)."""
    make_user(app, "r@example.org")
    headers = {"Authorization": f"Bearer {make_token(app, 'r@example.org')}"}
    response = app.test_client().post(
        "/api/v1/cases", data={"image": (io.BytesIO(image_bytes()), "x.jpg")}, headers=headers
    )
    assert response.status_code == 202, response.json
    return response.json, sent_tasks[-1][1][0], headers


def stored_image_key(app, case_id: int) -> str:
    from webapp.db import db
    from webapp.models import Image

    with app.app_context():
        return db.session.scalars(select(Image.storage_key).where(Image.case_id == case_id)).one()


def store_a_map(app, job_id: int) -> tuple[int, list[str]]:
    """A Grad-CAM map of the job's analysis, stored by the worker's one storing function: (row id, keys)."""
    from webapp.db import db
    from webapp.models import Explanation, Job
    from worker.explain import gradcam_layer_png, store_explanation

    with app.app_context():
        analysis = db.session.get(Job, job_id).analysis
        row = Explanation(
            analysis=analysis,
            image=analysis.image,
            model_version=analysis.model_version,
            method="gradcam",
            class_name=analysis.top_class,
        )
        db.session.add(row)
        db.session.flush()
        values = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
        store_explanation(row, analysis.image, values, gradcam_layer_png, size=(64, 64))
        db.session.commit()
        return row.id, [row.raw_key, row.overlay_key]


def test_a_case_on_s3_upload_worker_file_routes_and_deletion(s3_app, s3_bucket, worker, sent_tasks, tmp_path):
    endpoint, bucket = s3_bucket
    tasks, predictor = worker
    case, job_id, headers = upload(s3_app, sent_tasks)
    key = stored_image_key(s3_app, case["id"])
    assert bucket_names(endpoint, bucket) == [f"portal/{key}"]
    assert not (tmp_path / "s3-storage").exists() or not any((tmp_path / "s3-storage").rglob("*"))

    assert tasks.analyse(job_id) == "succeeded"
    assert predictor.seen == [(150, 200, 3)]  # the worker decoded the image it read from the bucket
    explanation_id, map_keys = store_a_map(s3_app, job_id)
    assert bucket_names(endpoint, bucket) == sorted(f"portal/{k}" for k in [key, *map_keys])

    client = s3_app.test_client()
    served = client.get(f"/files/{key}", headers=headers)
    assert served.status_code == 200 and served.mimetype == "image/jpeg"  # a JPEG upload keeps its own data
    with storage_from_settings(s3_app.extensions["settings"]).open(key) as f:
        assert served.data == f.read()
    overlay = client.get(f"/cases/{case['id']}/explanations/{explanation_id}/overlay.png", headers=headers)
    assert overlay.status_code == 200 and overlay.data.startswith(b"\x89PNG")
    raw = client.get(f"/cases/{case['id']}/explanations/{explanation_id}/raw.npy", headers=headers)
    assert np.load(io.BytesIO(raw.data)).shape == (64, 64)
    assert client.get(f"/files/{image_key('0' * 64, 'png')}", headers=headers).status_code == 404
    assert client.get("/files/../secret", headers=headers).status_code == 404

    time.sleep(2)  # S3 keeps write times to the second: the deletion must see these files as older than itself
    make_user(s3_app, ADMIN, role="admin")
    from webapp.auth.sessions import find_user
    from webapp.cases.deletion import delete_case

    with s3_app.app_context():
        result = delete_case(case["id"], find_user(ADMIN), "Uploaded by mistake.")
    assert (result.files_removed, result.files_kept) == (3, 0)
    assert bucket_names(endpoint, bucket) == []
    assert client.get(f"/files/{key}", headers=headers).status_code == 404


def test_the_file_route_sends_the_same_headers_from_s3_as_from_the_folder(s3_app, sent_tasks, tmp_path):
    local_app = make_app(tmp_path, f"sqlite:///{tmp_path / 'local.db'}", "local")
    answers = []
    for app in (local_app, s3_app):
        case, _, headers = upload(app, sent_tasks)
        answers.append(app.test_client().get(f"/files/{stored_image_key(app, case['id'])}", headers=headers))
    local, s3 = answers
    assert local.data == s3.data
    headers = [{k: v for k, v in answer.headers.items() if k != "Date"} for answer in answers]
    assert headers[1] == headers[0]
    assert s3.headers["Cache-Control"] == "private, no-store" and s3.headers["X-Content-Type-Options"] == "nosniff"


def test_backup_refuses_s3_storage_and_writes_nothing(s3_app, tmp_path):
    archive = tmp_path / "backup.tar"
    result = s3_app.test_cli_runner().invoke(args=["backup", "create", str(archive)])
    assert result.exit_code != 0
    assert "Backups cover the local storage folder; back up object storage with its own tools." in result.output
    assert not archive.exists()


def test_an_image_uploaded_again_while_its_case_is_deleted_stays_in_the_bucket(
    s3_app, s3_bucket, sent_tasks, monkeypatch
):
    """The same image arriving for a new case right after the deletion's commit is written before its
    row exists: the bucket's write time tells the deletion to keep it."""
    import webapp.cases.deletion as deletion

    endpoint, bucket = s3_bucket
    case, _, _ = upload(s3_app, sent_tasks)
    key = stored_image_key(s3_app, case["id"])
    time.sleep(2)  # older than the deletion by more than the second S3 rounds its write times to
    original = deletion._remove_unreferenced

    def upload_lands_first(keys, started):
        storage_from_settings(s3_app.extensions["settings"]).save(key, image_bytes())
        return original(keys, started)

    monkeypatch.setattr(deletion, "_remove_unreferenced", upload_lands_first)
    make_user(s3_app, ADMIN, role="admin")
    from webapp.auth.sessions import find_user

    with s3_app.app_context():
        result = deletion.delete_case(case["id"], find_user(ADMIN), "Uploaded by mistake.")
    assert (result.files_removed, result.files_kept) == (0, 1)
    assert bucket_names(endpoint, bucket) == [f"portal/{key}"]
