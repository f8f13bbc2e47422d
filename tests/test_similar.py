"""Similar prior cases (webapp.similar) and the out-of-distribution verdict in the case API: the
index finds the nearest other cases, labels them, leaves out the query's own case, keeps up with
new and deleted rows, rebuilds from the database with one command, and searches an IVF index the
same way. Runs on SQLite and, with --database=postgresql, on PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest
from portal_helpers import login, make_user
from research_helpers import model_version, seed_case
from sqlalchemy import delete, select

from webapp.db import db
from webapp.models import Analysis, Case, Image, ModelVersion, Review, User
from webapp.similar import index as vector_index
from webapp.similar import service

DIMS = 8


@pytest.fixture(autouse=True)
def fresh_indexes():
    vector_index.forget()
    yield
    vector_index.forget()


def unit(*values: float) -> np.ndarray:
    v = np.zeros(DIMS, np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


def store(app, case_id: int, vector: np.ndarray, ood: float | None = None, flagged: bool | None = None) -> int:
    """Gives the case's analysis an embedding (and an OOD verdict); returns the analysis id."""
    with app.app_context():
        analysis = db.session.scalars(select(Analysis).join(Image).where(Image.case_id == case_id)).one()
        analysis.embedding = np.asarray(vector, "<f2").tobytes()
        analysis.ood_score, analysis.ood_flagged = ood, flagged
        analysis.finished_at = analysis.created_at
        db.session.commit()
        return analysis.id


def add_image(app, case_id: int, mv_id: int, vector: np.ndarray) -> None:
    """A second image of the case, with an analysis and an embedding."""
    with app.app_context():
        image = Image(
            case_id=case_id, content_hash=f"second-{case_id}", storage_key=f"k/second-{case_id}.png", width=4, height=4
        )
        db.session.add(image)
        db.session.flush()
        db.session.add(
            Analysis(
                image_id=image.id,
                model_version_id=mv_id,
                status="succeeded",
                top_class="nv",
                probabilities={"nv": 1.0},
                embedding=np.asarray(vector, "<f2").tobytes(),
            )
        )
        db.session.commit()


def review(app, case_id: int, diagnosis: str, email: str) -> None:
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == email))
        if user is None:
            user = User(email=email, role="reviewer")
            user.set_password("correct horse battery staple 9")
            db.session.add(user)
            db.session.flush()
        db.session.add(Review(case_id=case_id, reviewer_id=user.id, diagnosis=diagnosis, confidence=3))
        db.session.commit()


def case_json(client, headers, case_id: int) -> dict:
    response = client.get(f"/api/v1/cases/{case_id}", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


@pytest.fixture
def portal(app):
    """A query case and its neighbours at known angles; returns their ids by name."""
    mv = model_version(app, trained=True)
    ids = {
        "query": seed_case(app, top="mel", mv_id=mv, lesion_ref="L1"),
        "twin": seed_case(app, top="mel", mv_id=mv, lesion_ref="L1"),  # the same lesion, photographed again
        "near": seed_case(app, top="nv", mv_id=mv, reference_dx="bkl"),
        "middle": seed_case(app, top="nv", mv_id=mv, reference_dx="nv"),
        "far": seed_case(app, top="nv", mv_id=mv),
        "opposite": seed_case(app, top="nv", mv_id=mv, reference_dx="df"),
    }
    store(app, ids["query"], unit(1, 0), ood=0.91, flagged=True)
    store(app, ids["twin"], unit(1, 0.05))
    store(app, ids["near"], unit(1, 0.3))
    store(app, ids["middle"], unit(1, 1))
    store(app, ids["far"], unit(0, 1))
    store(app, ids["opposite"], unit(-1, 0))
    add_image(app, ids["query"], mv, unit(1, 0.01))  # the query case's own second image: never listed
    with app.app_context():
        version = db.session.get(ModelVersion, mv)
        version.manifest = {**version.manifest, "ood": {"threshold": 0.8}}
        db.session.commit()
    return ids


def test_similar_cases_nearest_first_without_the_own_case(app, client, auth_headers, portal):
    analysis = case_json(client, auth_headers, portal["query"])["analyses"][0]
    listed = analysis["similar_cases"]
    assert [s["case_id"] for s in listed] == [portal[n] for n in ("twin", "near", "middle", "far", "opposite")]
    scores = [s["score"] for s in listed]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert scores[-1] == pytest.approx(0.0, abs=1e-3)  # the opposite direction: cosine -1
    assert [s["same_lesion"] for s in listed] == [True, False, False, False, False]
    assert all(s["thumbnail_url"].startswith("/files/") for s in listed)


def test_labels_come_from_review_consensus_then_the_reference_then_none(app, client, auth_headers, portal):
    review(app, portal["near"], "mel", "r1@example.org")
    review(app, portal["near"], "mel", "r2@example.org")  # two reviewers agree: their consensus wins
    review(app, portal["middle"], "vasc", "r1@example.org")  # one reviewer is no consensus
    listed = {s["case_id"]: s for s in case_json(client, auth_headers, portal["query"])["analyses"][0]["similar_cases"]}
    assert (listed[portal["near"]]["label"], listed[portal["near"]]["label_source"]) == ("mel", "review_consensus")
    assert (listed[portal["middle"]]["label"], listed[portal["middle"]]["label_source"]) == ("nv", "reference")
    assert (listed[portal["far"]]["label"], listed[portal["far"]]["label_source"]) == (None, None)


def test_out_of_distribution_verdict_in_the_api(app, client, auth_headers, portal):
    analysis = case_json(client, auth_headers, portal["query"])["analyses"][0]
    assert analysis["out_of_distribution"] == {"flagged": True, "score": 0.91, "threshold": 0.8}
    other = case_json(client, auth_headers, portal["near"])["analyses"][0]
    assert other["out_of_distribution"] is None  # stored before the verdict existed


def test_at_most_ten_and_none_without_an_embedding(app, client, auth_headers, portal):
    with app.app_context():
        mv = db.session.scalar(select(ModelVersion.id))
    for k in range(12):
        store(app, seed_case(app, top="nv", mv_id=mv), unit(1, 0.5, 0.01 * k))
    assert len(case_json(client, auth_headers, portal["query"])["analyses"][0]["similar_cases"]) == 10
    bare = seed_case(app, top="nv", mv_id=mv)
    assert case_json(client, auth_headers, bare)["analyses"][0]["similar_cases"] == []


def test_the_index_keeps_up_with_new_and_deleted_cases(app, client, auth_headers, portal):
    first = case_json(client, auth_headers, portal["query"])["analyses"][0]["similar_cases"]
    assert first[0]["case_id"] == portal["twin"]
    with app.app_context():
        mv = db.session.scalar(select(ModelVersion.id))
    newcomer = seed_case(app, top="mel", mv_id=mv)
    store(app, newcomer, unit(1, 0.001))  # after the index was built: found by the catch-up query
    with app.app_context():
        db.session.execute(delete(Case).where(Case.id == portal["twin"]))  # ON DELETE CASCADE to its analysis
        db.session.commit()
    listed = [s["case_id"] for s in case_json(client, auth_headers, portal["query"])["analyses"][0]["similar_cases"]]
    assert listed[0] == newcomer and portal["twin"] not in listed


def test_rebuild_index_writes_the_index_that_a_new_process_loads(app, client, auth_headers, portal):
    result = app.test_cli_runner().invoke(args=["similar", "rebuild-index"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        mv = db.session.scalar(select(ModelVersion.id))
    assert f'"{mv}": 7' in result.output  # six cases, the query case with two images
    saved = service_folder(app) / f"model-version-{mv}.faiss"
    assert saved.is_file()
    vector_index.forget()  # as a new process: the index comes from the file
    with app.app_context():
        loaded = vector_index._load(service_folder(app), mv)
    assert loaded is not None and len(loaded.ids) == 7
    listed = case_json(client, auth_headers, portal["query"])["analyses"][0]["similar_cases"]
    assert listed[0]["case_id"] == portal["twin"]


def service_folder(app):
    with app.test_request_context():
        return service.index_folder()


def test_an_ivf_index_finds_the_same_nearest_cases(app, monkeypatch):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    monkeypatch.setattr(vector_index, "IVF_MIN", 100)
    monkeypatch.setattr(vector_index, "NPROBE", 80)  # every list: exact, so the answer is known
    ivf = vector_index.VectorIndex.build(np.arange(1, 401), vectors, 16)
    ivf.index.nprobe = 80
    assert type(ivf.index).__name__ == "IndexIVFFlat"
    query = vectors[7]
    expected = np.argsort(-(vectors @ query))[:5] + 1
    assert [i for i, _ in ivf.search(query, 5)] == list(expected)


def test_score_maps_cosine_to_zero_one():
    assert service.score(1.0) == 1.0 and service.score(-1.0) == 0.0 and service.score(0.0) == 0.5


def test_the_case_page_shows_similar_cases_and_the_warning(app, client, portal):
    make_user(app, email="page@example.org")
    assert login(client, "page@example.org").status_code == 302
    store(app, portal["far"], unit(0, 1), ood=0.95, flagged=True)
    html = client.get(f"/cases/{portal['far']}").get_data(as_text=True)
    assert 'id="ood-warning"' in html and "unreliable" in html
    assert f"Case #{portal['middle']}" in html and "reference diagnosis" in html
    quiet = client.get(f"/cases/{portal['near']}").get_data(as_text=True)
    assert 'id="ood-warning"' not in quiet and f"Case #{portal['twin']}" in quiet


def test_flagged_cases_are_marked_in_the_list_and_the_export(app, client, portal):
    make_user(app, email="list@example.org")
    assert login(client, "list@example.org").status_code == 302
    store(app, portal["far"], unit(0, 1), ood=0.95, flagged=True)
    # Each row shows its case's latest prediction: the far case's (flagged); the query case's second
    # image's, which has no verdict, hides its first image's flag.
    listed = client.get("/cases").get_data(as_text=True)
    assert listed.count("not dermoscopy?") == 1
    export = client.get("/cases/export.csv").get_data(as_text=True).splitlines()
    header = export[0].split(",")
    column = header.index("out_of_distribution")
    flags = [line.split(",")[column] for line in export[1:] if line]
    assert flags.count("flagged") == 1


def test_batch_progress_counts_flagged_images(app, client, auth_headers, portal):
    from webapp.batches.service import batch_progress
    from webapp.models import Batch, BatchItem, Job

    with app.app_context():
        batch = Batch(name="folder", source="api")
        db.session.add(batch)
        db.session.flush()
        for name in ("query", "near"):
            job = db.session.scalars(select(Job).join(Image).where(Image.case_id == portal[name])).first()
            db.session.add(BatchItem(batch_id=batch.id, filename=f"{name}.jpg", case_id=portal[name], job_id=job.id))
        db.session.commit()
        assert batch_progress(batch)["out_of_distribution"] == 1
        batch_id = batch.id
    assert client.get(f"/api/v1/batches/{batch_id}", headers=auth_headers).get_json()["out_of_distribution"] == 1
