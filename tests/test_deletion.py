"""Deleting a case or a batch on request (webapp.cases.deletion): pages, API, CLI, the audit entry,
stored files, cancelled work, exports and batch progress, and a worker analysing the case meanwhile."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from portal_helpers import (
    FAKE_MANIFEST,
    SMALL_IMAGES,
    csrf_from,
    image_bytes,
    login,
    make_token,
    make_user,
    worker_serving,
)
from research_helpers import HAM_CSV
from sqlalchemy import func, select

from webapp.db import db
from webapp.models import (
    Analysis,
    AuditEntry,
    Batch,
    BatchItem,
    Case,
    Explanation,
    Image,
    Job,
    Review,
)

ADMIN = "admin@example.org"
BACKENDS = pytest.mark.parametrize(
    "app",
    # The PostgreSQL pass (--database=postgresql) runs the "postgresql" case; "sqlite" is this file's own.
    [pytest.param("sqlite", marks=pytest.mark.sqlite_only), pytest.param("postgresql", marks=pytest.mark.db_backends)],
    indirect=True,
)
REASON = "consent withdrawn"
SECRETS = {"patient_ref": "PAT-SECRET-7", "lesion_ref": "LES-SECRET-9", "age": "47", "sex": "female", "site": "scalp"}
NOTE = "NOTE-SECRET the patient mentioned a family history"


@pytest.fixture
def app(app, request, tmp_path):
    """The SQLite app of conftest, or, for tests parametrized with "postgresql", a PostgreSQL
    database built by the migrations (their ON DELETE rules are what a deletion relies on)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield app
        return
    from flask_migrate import upgrade

    from webapp import create_app

    pg = create_app(
        {
            "TESTING": True,
            "INSTANCE_DIR": tmp_path / "pg-instance",
            # A database of its own: under --database=postgresql conftest's app already holds one.
            "DATABASE_URL": request.getfixturevalue("new_postgres_database")(),
            "STORAGE_DIR": tmp_path / "pg-storage",
            "MODEL_DIR": tmp_path / "no-model",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "BROKER_TIMEOUT": 0.5,
        }
    )
    with pg.app_context():
        upgrade()
    yield pg
    with pg.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def admin_headers(app):
    make_user(app, ADMIN, role="admin")
    return {"Authorization": f"Bearer {make_token(app, ADMIN)}"}


def upload(client, headers, name=SMALL_IMAGES[0], filename="secret-name.jpg", **fields) -> int:
    data = {"image": (io.BytesIO(image_bytes(name)), filename), **fields}
    response = client.post("/api/v1/cases", data=data, headers=headers)
    assert response.status_code == 202, response.json
    return response.json["id"]


def storage_of(app):
    from webapp.storage import storage_from_settings

    return storage_from_settings(app.extensions["settings"])


def add_results(app, case_id: int, mv_name="efficientnetb3-cbam") -> list[str]:
    """A succeeded analysis, a done Grad-CAM map with its two files, a queued SHAP row, a review
    with notes and its audit entry; returns the map's storage keys."""
    from webapp import audit
    from webapp.cases.explanations import explanation_keys
    from webapp.models import ModelVersion, User

    with app.app_context():
        reviewer = db.session.scalar(select(User).where(User.email == ADMIN))
        image = db.session.scalars(select(Image).where(Image.case_id == case_id)).one()
        mv = db.session.scalar(select(ModelVersion).where(ModelVersion.name == mv_name))
        if mv is None:
            mv = ModelVersion(
                name=mv_name, version="1", trained=False, class_names=["mel", "nv"], manifest={"class_long_names": {}}
            )
            db.session.add(mv)
            db.session.flush()
        analysis = Analysis(image=image, model_version=mv, status="succeeded", probabilities={"mel": 0.3, "nv": 0.7})
        analysis.top_class = "nv"
        raw, overlay = explanation_keys(image.content_hash, mv.id, "gradcam", "nv")
        storage_of(app).save(raw, b"raw map")
        storage_of(app).save(overlay, b"overlay png")
        gradcam = Explanation(
            analysis=analysis, image=image, model_version=mv, method="gradcam", class_name="nv", status="done"
        )
        gradcam.raw_key, gradcam.overlay_key = raw, overlay
        shap = Explanation(
            analysis=analysis, image=image, model_version=mv, method="shap", class_name="nv", status="queued"
        )
        review = Review(case_id=case_id, reviewer=reviewer, diagnosis="nv", confidence=3, notes=NOTE)
        db.session.add_all([analysis, gradcam, shap, review])
        audit.record("review.create", "review", None, user=reviewer, case_id=case_id, new={"notes": NOTE})
        db.session.commit()
        return [raw, overlay]


def count(app, model, *where) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(model).where(*where))


def deletion_entries(app) -> list[dict]:
    from webapp.audit import entry_dict

    with app.app_context():
        rows = db.session.scalars(select(AuditEntry).where(AuditEntry.action.like("%.delete"))).all()
        return [entry_dict(row) for row in rows]


def delete_as_admin(app, kind: str, entity_id: int, reason: str = REASON):
    from webapp.auth.sessions import find_user
    from webapp.cases.deletion import delete_batch, delete_case

    with app.app_context():
        return (delete_case if kind == "case" else delete_batch)(entity_id, find_user(ADMIN), reason)


# --- the service ----------------------------------------------------------------------------------------


@BACKENDS
def test_deleting_a_case_removes_its_rows_and_files_and_audits_without_patient_data(
    app, client, auth_headers, admin_headers, sent_tasks
):
    case_id = upload(client, auth_headers, **SECRETS)
    other_id = upload(client, auth_headers, name=SMALL_IMAGES[1], filename="other.jpg")
    maps = add_results(app, case_id)
    with app.app_context():
        image = db.session.scalars(select(Image).where(Image.case_id == case_id)).one()
        image_key, content_hash = image.storage_key, image.content_hash
    for key in [image_key, *maps]:
        assert storage_of(app).exists(key)

    result = delete_as_admin(app, "case", case_id)

    assert result.case_ids == [case_id] and result.files_removed == 3 and result.files_kept == 0
    assert result.counts == {
        "cases": 1,
        "images": 1,
        "jobs": 1,
        "jobs_cancelled": 1,
        "explanations": 2,
        "explanations_cancelled": 1,
        "reviews": 1,
        "batch_items": 0,
    }
    for model in (Case, Image, Job, Analysis, Explanation, Review):
        assert count(app, model) == (1 if model in (Case, Image, Job) else 0), model
    assert count(app, Case, Case.id == other_id) == 1
    assert count(app, AuditEntry, AuditEntry.case_id == case_id) == 0  # the review's history went with it
    for key in [image_key, *maps]:
        assert not storage_of(app).exists(key)
    [entry] = deletion_entries(app)
    assert entry["user"] == ADMIN and entry["action"] == "case.delete" and entry["entity_id"] == case_id
    assert entry["new"]["reason"] == REASON and entry["new"]["content_hashes"] == [content_hash]
    assert entry["at"] and entry["case_id"] is None
    every_entry = json.dumps(deletion_entries(app) + [e for e in _all_audit(app)])
    for secret in [*SECRETS.values(), "secret-name", NOTE, "NOTE-SECRET"]:
        if secret not in ("47", "female"):  # short values that a count or a word could match
            assert secret not in every_entry, secret


def _all_audit(app) -> list[dict]:
    from webapp.audit import entry_dict

    with app.app_context():
        return [entry_dict(e) for e in db.session.scalars(select(AuditEntry))]


def test_a_stored_file_that_another_case_holds_stays(app, client, auth_headers, admin_headers, sent_tasks):
    first = upload(client, auth_headers)
    second = upload(client, auth_headers, name=SMALL_IMAGES[1])
    with app.app_context():
        shared = db.session.scalars(select(Image).where(Image.case_id == first)).one().storage_key
        own = db.session.scalars(select(Image).where(Image.case_id == second)).one()
        own_key, own.storage_key = own.storage_key, shared  # a second row holding the same stored object
        db.session.commit()

    result = delete_as_admin(app, "case", first)
    assert (result.files_removed, result.files_kept) == (0, 1)
    assert storage_of(app).exists(shared)

    result = delete_as_admin(app, "case", second)
    assert (result.files_removed, result.files_kept) == (1, 0)
    assert not storage_of(app).exists(shared)
    assert storage_of(app).exists(own_key)  # no row named it: not the deletion's to remove


def test_a_file_written_again_after_the_deletion_began_stays(app, client, auth_headers, admin_headers, monkeypatch):
    """The same image uploaded anew right after the commit is saved before its row exists: keep it."""
    import webapp.cases.deletion as deletion

    case_id = upload(client, auth_headers)
    with app.app_context():
        key = db.session.scalars(select(Image).where(Image.case_id == case_id)).one().storage_key
    original = deletion._remove_unreferenced

    def upload_lands_first(keys, started):
        time.sleep(0.01)
        storage_of(app).save(key, image_bytes())
        return original(keys, started)

    monkeypatch.setattr(deletion, "_remove_unreferenced", upload_lands_first)
    assert delete_as_admin(app, "case", case_id).files_kept == 1
    assert storage_of(app).exists(key)


def test_a_failed_commit_keeps_every_row_and_file(app, client, auth_headers, admin_headers, monkeypatch):
    import webapp.cases.deletion as deletion

    case_id = upload(client, auth_headers)
    maps = add_results(app, case_id)

    def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(deletion, "_audit", broken)
    with pytest.raises(RuntimeError):
        delete_as_admin(app, "case", case_id)
    assert count(app, Case) == 1 and count(app, Explanation) == 2 and not deletion_entries(app)
    assert all(storage_of(app).exists(key) for key in maps)


@pytest.mark.parametrize(
    "reason, message",
    [(None, "reason is required"), ("  ", "reason is required"), ("x" * 501, "at most 500"), ("a\x00bc", "printable")],
)
def test_a_deletion_needs_a_reason(app, client, auth_headers, admin_headers, reason, message):
    from webapp.cases.deletion import DeletionError

    case_id = upload(client, auth_headers)
    with pytest.raises(DeletionError, match=message) as caught:
        delete_as_admin(app, "case", case_id, reason)
    assert caught.value.status == 400 and count(app, Case) == 1


def test_only_an_admin_deletes(app, client, auth_headers):
    from webapp.auth.sessions import find_user
    from webapp.cases.deletion import DeletionError, delete_case

    case_id = upload(client, auth_headers)
    with app.app_context(), pytest.raises(DeletionError, match="Only an admin") as caught:
        delete_case(case_id, find_user("researcher@example.org"), REASON)
    assert caught.value.status == 403 and count(app, Case) == 1


# --- batches, progress, lists and exports ---------------------------------------------------------------


def batch_upload(client, headers, names, csv=HAM_CSV, expected=None) -> dict:
    data = {"images": [(io.BytesIO(image_bytes(n)), n) for n in names], "metadata": (io.BytesIO(csv.encode()), "m.csv")}
    if expected is not None:
        data["expected_files"] = str(expected)
    response = client.post("/api/v1/batches", data=data, headers=headers)
    assert response.status_code == 202, response.json
    return response.json


def progress(client, headers, batch_id) -> dict:
    return client.get(f"/api/v1/batches/{batch_id}", headers=headers).json


def test_deleting_a_case_of_a_batch_adjusts_its_progress_lists_and_exports(
    app, client, auth_headers, admin_headers, sent_tasks
):
    batch_id = batch_upload(client, auth_headers, SMALL_IMAGES[:2], expected=2)["id"]
    before = progress(client, auth_headers, batch_id)
    assert before["total"] == 2 and before["metadata_rows"] == 4 and len(before["case_ids"]) == 2
    gone, kept = before["case_ids"]
    with app.app_context():
        lesion = db.session.get(Case, gone).lesion_ref
        db.session.get(
            Job, db.session.scalars(select(Job.id).join(Image).where(Image.case_id == kept)).one()
        ).status = "succeeded"
        db.session.commit()

    result = delete_as_admin(app, "case", gone)

    assert result.counts["batch_items"] == 1
    after = progress(client, auth_headers, batch_id)
    assert after["total"] == 1 and after["expected"] == 1 and after["metadata_rows"] == 3
    assert after["case_ids"] == [kept] and after["counts"]["done"] == 1 and after["finished"]
    listing = client.get("/api/v1/cases", headers=auth_headers).json
    assert [c["id"] for c in listing["cases"]] == [kept] and listing["total"] == 1
    export = client.get("/api/v1/cases.csv", headers=auth_headers).get_data(as_text=True)
    assert lesion and lesion not in export and SMALL_IMAGES[0][:-4] not in export
    assert client.get(f"/api/v1/cases/{gone}", headers=auth_headers).status_code == 404
    with app.app_context():
        assert SMALL_IMAGES[0][:-4] not in json.dumps(db.session.get(Batch, batch_id).metadata_rows)


def test_deleting_a_batch_keeps_the_cases_it_only_linked_as_duplicates(
    app, client, auth_headers, admin_headers, sent_tasks
):
    first = batch_upload(client, auth_headers, SMALL_IMAGES[:2])["id"]
    second = batch_upload(client, auth_headers, SMALL_IMAGES[::2])  # the first image again: linked, not stored
    assert second["duplicates"] == 1
    linked = progress(client, auth_headers, first)["case_ids"]
    own = [c for c in progress(client, auth_headers, second["id"])["case_ids"] if c not in linked]

    result = delete_as_admin(app, "batch", second["id"])

    assert result.case_ids == own and result.counts["batch_items_total"] == 2
    assert (
        count(app, Batch, Batch.id == second["id"]) == 0
        and count(app, BatchItem, BatchItem.batch_id == second["id"]) == 0
    )
    assert count(app, Case, Case.id == own[0]) == 0 and count(app, Case, Case.id.in_(linked)) == 2
    assert progress(client, auth_headers, first)["case_ids"] == linked
    [entry] = deletion_entries(app)
    assert entry["action"] == "batch.delete" and entry["entity"] == "batch" and entry["new"]["case_ids"] == own
    assert "m.csv" not in json.dumps(entry)


def test_deleting_a_case_drops_the_duplicate_links_to_it_from_other_batches(
    app, client, auth_headers, admin_headers, sent_tasks
):
    first = batch_upload(client, auth_headers, SMALL_IMAGES[:2])["id"]
    second = batch_upload(client, auth_headers, SMALL_IMAGES[::2])["id"]
    case_id = progress(client, auth_headers, first)["case_ids"][0]
    assert progress(client, auth_headers, second)["duplicates"] == 1

    assert delete_as_admin(app, "case", case_id).counts["batch_items"] == 2
    for batch_id in (first, second):
        after = progress(client, auth_headers, batch_id)
        assert after["total"] == 1 and case_id not in after["case_ids"]
    assert progress(client, auth_headers, second)["duplicates"] == 0


# --- the API ------------------------------------------------------------------------------------------------


def test_api_delete_case_needs_an_admin_and_a_reason(app, client, auth_headers, admin_headers, sent_tasks):
    case_id = upload(client, auth_headers)
    assert client.delete(f"/api/v1/cases/{case_id}?reason=x" * 1).status_code == 401
    response = client.delete(f"/api/v1/cases/{case_id}", query_string={"reason": REASON}, headers=auth_headers)
    assert response.status_code == 403 and "Only an admin" in response.json["error"]
    response = client.delete(f"/api/v1/cases/{case_id}", headers=admin_headers)
    assert response.status_code == 400 and response.json["field"] == "reason"
    assert count(app, Case) == 1
    response = client.delete("/api/v1/cases/9999", query_string={"reason": REASON}, headers=admin_headers)
    assert response.status_code == 404 and response.json == {"error": "No case with id 9999.", "status": 404}

    response = client.delete(f"/api/v1/cases/{case_id}", query_string={"reason": REASON}, headers=admin_headers)
    assert response.status_code == 200
    assert response.json["deleted"] == "case" and response.json["case_ids"] == [case_id]
    assert response.json["files_removed"] == 1 and count(app, Case) == 0


def test_api_delete_takes_the_reason_from_a_json_body_too(app, client, auth_headers, admin_headers, sent_tasks):
    batch_id = batch_upload(client, auth_headers, SMALL_IMAGES[:2])["id"]
    response = client.delete(f"/api/v1/batches/{batch_id}", json={"reason": 7}, headers=admin_headers)
    assert response.status_code == 400 and "reason" in response.json["error"]  # "7" is too short
    response = client.delete(f"/api/v1/batches/{batch_id}", json={"reason": REASON}, headers=auth_headers)
    assert response.status_code == 403
    response = client.delete(f"/api/v1/batches/{batch_id}", json={"reason": REASON}, headers=admin_headers)
    assert response.status_code == 200 and len(response.json["case_ids"]) == 2 and count(app, Case) == 0
    assert (
        client.delete(f"/api/v1/batches/{batch_id}", json={"reason": REASON}, headers=admin_headers).status_code == 404
    )
    [entry] = deletion_entries(app)
    assert entry["new"]["reason"] == REASON


def test_the_openapi_document_names_the_reason(client, auth_headers):
    spec = client.get("/api/v1/openapi.json", headers=auth_headers).json
    for path in ("/api/v1/cases/{case_id}", "/api/v1/batches/{batch_id}"):
        op = spec["paths"][path]["delete"]
        assert "reason" in {p["name"] for p in op["parameters"]}
        assert {"200", "400", "403", "404"} <= set(op["responses"])


# --- the pages --------------------------------------------------------------------------------------------


def page_post(client, page: str, action: str, **form):
    token = csrf_from(client.get(page).get_data(as_text=True))
    return client.post(action, data={"csrf_token": token, **form})


def test_admin_deletes_a_case_from_its_page(app, client, auth_headers, admin_headers, sent_tasks):
    case_id = upload(client, auth_headers)
    login(client, ADMIN)
    page = client.get(f"/cases/{case_id}").get_data(as_text=True)
    assert f'action="/cases/{case_id}/delete"' in page and 'name="reason"' in page and 'name="confirm"' in page

    response = page_post(client, f"/cases/{case_id}", f"/cases/{case_id}/delete", reason=REASON)
    assert response.status_code == 400 and "Tick the box" in response.get_data(as_text=True)
    response = page_post(client, f"/cases/{case_id}", f"/cases/{case_id}/delete", confirm="yes")
    assert response.status_code == 400 and "reason is required" in response.get_data(as_text=True)
    response = client.post(f"/cases/{case_id}/delete", data={"reason": REASON, "confirm": "yes"})
    assert response.status_code == 400 and count(app, Case) == 1  # no CSRF token

    response = page_post(client, f"/cases/{case_id}", f"/cases/{case_id}/delete", reason=REASON, confirm="yes")
    assert response.status_code == 302 and response.headers["Location"].endswith("/cases")
    assert count(app, Case) == 0 and deletion_entries(app)[0]["user"] == ADMIN
    assert client.get(f"/cases/{case_id}").status_code == 404


@pytest.mark.parametrize("role", ["researcher", "reviewer"])
def test_other_roles_may_not_delete_from_the_pages(app, client, auth_headers, admin_headers, sent_tasks, role):
    case_id = upload(client, auth_headers)
    batch_id = batch_upload(client, auth_headers, SMALL_IMAGES[1:3])["id"]
    make_user(app, f"{role}2@example.org", role=role)
    login(client, f"{role}2@example.org")
    assert 'name="confirm"' not in client.get(f"/cases/{case_id}").get_data(as_text=True)
    form = {"reason": REASON, "confirm": "yes"}
    assert page_post(client, f"/cases/{case_id}", f"/cases/{case_id}/delete", **form).status_code == 403
    assert page_post(client, f"/batches/{batch_id}", f"/batches/{batch_id}/delete", **form).status_code == 403
    assert count(app, Case) == 3 and not deletion_entries(app)


def test_anonymous_is_sent_to_the_login(app, client, auth_headers, sent_tasks):
    case_id = upload(client, auth_headers)
    response = page_post(client, "/login", f"/cases/{case_id}/delete", reason=REASON, confirm="yes")
    assert response.status_code == 302 and "/login?next=" in response.headers["Location"]
    assert count(app, Case) == 1


def test_admin_deletes_a_batch_from_its_page(app, client, auth_headers, admin_headers, sent_tasks):
    batch_id = batch_upload(client, auth_headers, SMALL_IMAGES[:2])["id"]
    login(client, ADMIN)
    assert f'action="/batches/{batch_id}/delete"' in client.get(f"/batches/{batch_id}").get_data(as_text=True)
    response = page_post(client, f"/batches/{batch_id}", f"/batches/{batch_id}/delete", reason=REASON, confirm="on")
    assert response.status_code == 302 and response.headers["Location"].endswith("/batches")
    assert count(app, Batch) == 0 and count(app, Case) == 0
    assert client.get(f"/batches/{batch_id}").status_code == 404


# --- the CLI ------------------------------------------------------------------------------------------------


def test_cli_deletes_a_case_and_a_batch_as_a_named_admin(app, client, auth_headers, admin_headers, sent_tasks):
    case_id = upload(client, auth_headers)
    batch_id = batch_upload(client, auth_headers, SMALL_IMAGES[1:3])["id"]
    runner = app.test_cli_runner()
    args = ["cases", "delete", str(case_id), "--reason", REASON]

    result = runner.invoke(args=[*args, "--admin", "researcher@example.org", "--yes"])
    assert result.exit_code == 1 and "Only an admin" in result.output
    result = runner.invoke(args=["cases", "delete", str(case_id), "--reason", "", "--admin", ADMIN, "--yes"])
    assert result.exit_code == 2 and "reason is required" in result.output
    result = runner.invoke(args=[*args, "--admin", ADMIN], input="n\n")
    assert result.exit_code == 1 and count(app, Case) == 3  # not confirmed
    result = runner.invoke(args=[*args, "--admin", ADMIN], input="y\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{") :])["case_ids"] == [case_id]
    result = runner.invoke(args=[*args, "--admin", ADMIN, "--yes"])
    assert result.exit_code == 1 and f"No case with id {case_id}" in result.output

    result = runner.invoke(args=["batch", "delete", str(batch_id), "--reason", REASON, "--admin", ADMIN, "--yes"])
    assert result.exit_code == 0, result.output
    assert count(app, Case) == 0
    assert [e["user"] for e in deletion_entries(app)] == [ADMIN, ADMIN]


# --- the worker: cancelled work, and a deletion during an analysis --------------------------------------------


class FakePredictor:
    manifest = FAKE_MANIFEST
    class_names = FAKE_MANIFEST["class_names"]
    input_size = (64, 64)  # the resolution explanation maps are stored at

    def __init__(self, during_predict=None):
        self.during_predict = during_predict
        self.calls = 0

    def predict(self, images):
        self.calls += 1
        if self.during_predict is not None:
            self.during_predict()
        p = np.arange(1, 8, dtype=np.float32)
        return np.repeat((p / p.sum())[None, :], len(images), axis=0)


@pytest.fixture
def worker(app, monkeypatch):
    """worker.tasks running in `app`, with a fake predictor (no TensorFlow) and no broker."""
    import worker.explain as explain

    tasks = worker_serving(app, monkeypatch, FakePredictor())
    monkeypatch.setattr(explain, "send", lambda *args: None)
    return tasks


def delete_elsewhere(app, case_id: int) -> tuple[threading.Thread, dict]:
    """Deletes the case from another thread (its own app context and database connection), as the
    web process would while the worker runs."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = delete_as_admin(app, "case", case_id)
        except Exception as exc:  # reported to the test, not swallowed
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_queued_work_of_a_deleted_case_finds_nothing_to_do(
    app, client, auth_headers, admin_headers, worker, sent_tasks
):
    case_id = upload(client, auth_headers)
    add_results(app, case_id)
    job_id = sent_tasks[0][1][0]
    with app.app_context():
        analysis_id = db.session.scalar(select(Analysis.id))
        gradcam_id = db.session.scalar(select(Explanation.id).where(Explanation.method == "gradcam"))
    assert delete_as_admin(app, "case", case_id).counts["jobs_cancelled"] == 1

    assert worker.analyse(job_id) == "missing"  # the message still in the broker
    assert worker.explain_shap(analysis_id) == "missing"
    assert worker.explain_gradcam(gradcam_id) == "missing"
    assert count(app, Analysis) == 0 and count(app, Job) == 0


def test_a_claimed_job_whose_case_is_deleted_ends_without_a_trace(
    app, client, auth_headers, admin_headers, worker, sent_tasks
):
    from webapp.models import utcnow
    from worker import recovery

    case_id = upload(client, auth_headers)
    job_id = sent_tasks[0][1][0]
    with app.app_context():
        assert recovery.take(job_id, "queued", 0, utcnow())  # another delivery claimed it
        db.session.commit()
    delete_as_admin(app, "case", case_id)
    assert worker.analyse(job_id) == "missing" and count(app, Analysis) == 0


@BACKENDS
@pytest.mark.parametrize("moment", ["after the claim", "during the forward pass"])
def test_a_case_deleted_while_analysed_is_not_brought_back_and_its_batch_mates_are_stored(
    app, client, auth_headers, admin_headers, worker, sent_tasks, monkeypatch, moment
):
    import worker.batching as batching
    import worker.predict as predict

    doomed = upload(client, auth_headers)
    survivor = upload(client, auth_headers, name=SMALL_IMAGES[1])
    lead_job, mate_job = (call[1][0] for call in sent_tasks)
    threads = []

    def delete_now():
        thread, outcome = delete_elsewhere(app, doomed)
        thread.join(30)
        threads.append(outcome)

    if moment == "after the claim":
        original = batching.gather
        monkeypatch.setattr(batching, "gather", lambda *args: (original(*args), delete_now())[0])
    else:
        monkeypatch.setitem(predict._state, "predictor", FakePredictor(during_predict=delete_now))

    assert worker.analyse(lead_job) == "deleted"  # no exception, no failure

    assert "error" not in threads[0] and threads[0]["result"].case_ids == [doomed]
    assert count(app, Case, Case.id == doomed) == 0 and count(app, Job, Job.id == lead_job) == 0
    with app.app_context():
        mate = db.session.get(Job, mate_job)
        assert mate.status == "succeeded" and mate.analysis.status == "succeeded", mate.error
        assert db.session.scalar(select(func.count()).select_from(Analysis)) == 1
        assert mate.analysis.image.case_id == survivor


@BACKENDS
def test_a_deletion_waits_for_a_worker_storing_maps_and_removes_them_too(
    app, client, auth_headers, admin_headers, worker, sent_tasks, monkeypatch
):
    """The worker locked the image and is writing its Grad-CAM files: the deletion waits for its
    commit, then deletes the new rows and files as well. Nothing is left behind."""
    import worker.batching as batching
    import worker.explain as explain

    case_id = upload(client, auth_headers)
    job_id = sent_tasks[0][1][0]
    probs = np.full((1, 7), 1 / 7, dtype=np.float32)
    monkeypatch.setattr(
        batching, "predict_batch", lambda model, images, **kw: (probs, [(4, np.ones((150, 200)), None)], None)
    )
    monkeypatch.setattr(explain, "gradcam_layer_png", lambda heatmap: b"layer")
    original_store = explain.store_explanation
    started = {}

    def store_while_a_deletion_comes(*args, **kwargs):
        started["thread"], started["outcome"] = delete_elsewhere(app, case_id)
        time.sleep(0.5)  # the deletion is now waiting for this transaction
        assert started["thread"].is_alive()
        return original_store(*args, **kwargs)

    monkeypatch.setattr(explain, "store_explanation", store_while_a_deletion_comes)
    assert worker.analyse(job_id) == "succeeded"
    started["thread"].join(30)

    result = started["outcome"]["result"]
    assert result.counts["explanations"] >= 2  # the Grad-CAM row and a queued SHAP row, committed by the worker
    assert result.files_removed == 3  # the image, and the map's two files written while the deletion waited
    assert count(app, Explanation) == 0 and count(app, Analysis) == 0
    leftovers = [p for p in (app.extensions["settings"].STORAGE_DIR).rglob("*") if p.is_file()]
    assert leftovers == []


class ExplainableFake(FakePredictor):
    """Passes worker.predict.explainable(); the Grad-CAM itself is `fake_gradcam` below."""

    model = object()

    def preprocess(self, pixels):
        return pixels


def test_a_requested_map_of_a_case_deleted_while_computed_is_not_stored(
    app, client, auth_headers, admin_headers, worker, sent_tasks, monkeypatch
):
    import sys
    import types

    import worker.explain as explain
    import worker.predict as predict
    from webapp.models import ModelVersion

    case_id = upload(client, auth_headers)
    with app.app_context():
        image = db.session.scalars(select(Image).where(Image.case_id == case_id)).one()
        mv = ModelVersion(
            name=FAKE_MANIFEST["name"],
            version=FAKE_MANIFEST["version"],
            trained=False,
            class_names=FAKE_MANIFEST["class_names"],
            manifest=FAKE_MANIFEST,
        )
        analysis = Analysis(image=image, model_version=mv, status="succeeded", top_class="nv")
        row = Explanation(analysis=analysis, image=image, model_version=mv, method="gradcam", class_name="mel")
        db.session.add_all([mv, analysis, row])
        db.session.commit()
        row_id = row.id

    def fake_gradcam(model, images, class_name, plus_plus=False):
        thread, outcome = delete_elsewhere(app, case_id)  # the deletion lands while the map is computed
        thread.join(30)
        assert outcome["result"].counts["explanations"] == 1
        h, w = images[0].shape[:2]
        return types.SimpleNamespace(maps=[np.ones((h, w))], probs=np.full((1, 7), 1 / 7), class_indices=[4])

    monkeypatch.setitem(sys.modules, "ml.explain", types.SimpleNamespace(explain_gradcam=fake_gradcam))
    monkeypatch.setitem(predict._state, "predictor", ExplainableFake())
    monkeypatch.setattr(explain, "gradcam_layer_png", lambda heatmap: b"layer")

    assert worker.explain_gradcam(row_id) == "deleted"
    assert count(app, Explanation) == 0 and count(app, Case) == 0
    assert [p for p in app.extensions["settings"].STORAGE_DIR.rglob("*") if p.is_file()] == []


# --- size: no query per case, and the figures of a large batch ------------------------------------------


def seed_batch(app, n: int) -> int:
    """A batch of `n` cases, each with an image, a finished job, an analysis and a Grad-CAM map, and
    their three stored files (rows inserted directly: no image decoding)."""
    import hashlib

    from webapp.cases.explanations import explanation_keys
    from webapp.models import ModelVersion, User

    storage = storage_of(app)
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == ADMIN))
        mv = ModelVersion(name="m", version=str(n), trained=False, class_names=["nv"], manifest={})
        batch = Batch(name="big", source="api", created_by=user, expected_files=n, metadata_rows={})
        db.session.add_all([mv, batch])
        db.session.flush()
        for i in range(n):
            h = hashlib.sha256(f"{batch.id}-{i}".encode()).hexdigest()
            case = Case(batch_id=batch.id, patient_ref=f"P{i}")
            image = Image(case=case, content_hash=h, storage_key=f"images/{h[:2]}/{h[2:4]}/{h}.png", width=1, height=1)
            analysis = Analysis(image=image, model_version=mv, status="succeeded", top_class="nv")
            raw, overlay = explanation_keys(h, mv.id, "gradcam", "nv")
            row = Explanation(analysis=analysis, image=image, model_version=mv, method="gradcam", class_name="nv")
            row.status, row.raw_key, row.overlay_key = "done", raw, overlay
            job = Job(image=image, status="succeeded", analysis=analysis)
            db.session.add_all([case, image, analysis, row, job])
            for key in (image.storage_key, raw, overlay):
                storage.save(key, b"x")
        db.session.flush()
        db.session.add_all(
            BatchItem(batch_id=batch.id, filename=f"f{i}.jpg", case_id=c.id)
            for i, c in enumerate(db.session.scalars(select(Case).where(Case.batch_id == batch.id)))
        )
        db.session.commit()
        return batch.id


def statements_of(app, fn) -> int:
    from sqlalchemy import event

    with app.app_context():
        engine = db.engine
    seen = []
    listener = lambda *args: seen.append(1)  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        fn()
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    return len(seen)


def test_a_batch_deletion_costs_the_same_few_statements_whatever_its_size(app, admin_headers):
    small, large = seed_batch(app, 5), seed_batch(app, 60)
    counts = [statements_of(app, lambda b=b: delete_as_admin(app, "batch", b)) for b in (small, large)]
    assert counts[0] == counts[1] < 30, counts
    assert count(app, Case) == 0 and [p for p in storage_of(app).root.rglob("*") if p.is_file()] == []


@pytest.mark.slow
@BACKENDS
def test_figures_of_deleting_a_large_batch(app, admin_headers):
    """Prints the figures: `.venv/bin/python -m pytest tests/test_deletion.py -s -q -k figures`."""
    n = 2000
    batch_id = seed_batch(app, n)
    t0 = time.perf_counter()
    result = delete_as_admin(app, "batch", batch_id)
    seconds = time.perf_counter() - t0
    assert result.counts["cases"] == n and result.files_removed == 3 * n and count(app, Case) == 0
    size = len(json.dumps(deletion_entries(app)[0]))
    backend = app.config["SQLALCHEMY_DATABASE_URI"].split(":")[0]
    print(
        f"\n{backend}: deleted a batch of {n} cases ({result.counts['explanations']} maps, "
        f"{result.files_removed} files) in {seconds:.2f} s; audit entry {size / 1024:.0f} KiB"
    )
