"""Reviews with their audit log, the review queue, kappa and the dashboard, re-runs with another model version."""

from __future__ import annotations

import pytest
from portal_helpers import csrf_from, login, make_token, make_user
from research_helpers import model_version, seed_case


def test_cohen_kappa_matches_a_hand_computation():
    from webapp.dashboard.figures import balanced_accuracy, cohen_kappa, confusion_matrix, sensitivity

    a = ["mel", "mel", "nv", "nv", "bcc", "mel"]
    b = ["mel", "nv", "nv", "nv", "bcc", "bcc"]
    # p_o = 4/6; p_e = (3*1 + 2*3 + 1*2) / 36 = 11/36; kappa = (24/36 - 11/36) / (25/36) = 13/25
    assert cohen_kappa(a, b) == pytest.approx(0.52)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa(["nv", "nv"], ["nv", "nv"]) is None and cohen_kappa([], []) is None
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa(["nv"], [])
    classes = ["bcc", "mel", "nv"]
    matrix = confusion_matrix(list(zip(a, b)), classes)  # a as reference, b as prediction
    assert matrix == [[1, 0, 0], [1, 1, 1], [0, 0, 2]]
    assert sensitivity(matrix, classes) == {"bcc": 1.0, "mel": pytest.approx(1 / 3), "nv": 1.0}
    assert balanced_accuracy(matrix, classes) == pytest.approx((1 + 1 / 3 + 1) / 3)


@pytest.fixture
def reviewed(app):
    mv = model_version(app)
    cases = [
        seed_case(app, top=top, mv_id=mv, reference_dx=ref)
        for top, ref in [("mel", "mel"), ("nv", "mel"), ("nv", None), ("bcc", None), ("nv", None)]
    ]
    make_user(app, "rev1@example.org", role="reviewer")
    make_user(app, "rev2@example.org", role="reviewer")
    return {"mv": mv, "cases": cases}


def _review(client, case_id, **values):
    page = client.get(f"/cases/{case_id}/review")
    assert page.status_code == 200
    return client.post(
        f"/cases/{case_id}/review", data={"csrf_token": csrf_from(page.get_data(as_text=True)), **values}
    )


def test_review_is_created_updated_and_audited(app, client, reviewed):
    case_id = reviewed["cases"][2]
    login(client, "rev1@example.org")
    assert (
        _review(client, case_id, diagnosis="nv", agrees_with_model="agree", confidence="4", notes="typical").status_code
        == 302
    )
    assert _review(client, case_id, diagnosis="mel", agrees_with_model="disagree", confidence="high").status_code == 302
    assert _review(client, case_id, diagnosis="nonsense", confidence="3").status_code == 400
    headers = {"Authorization": f"Bearer {make_token(app, 'rev1@example.org')}"}
    (review,) = client.get(f"/api/v1/cases/{case_id}/reviews", headers=headers).json["reviews"]
    assert (review["diagnosis"], review["agrees_with_model"], review["confidence"], review["notes"]) == (
        "mel",
        False,
        4,
        None,
    )  # the form sends every field
    assert review["analysis_id"] is not None
    page = client.get(f"/cases/{case_id}").get_data(as_text=True)
    assert "review.create" in page and "review.update" in page and "Review history (2)" in page

    from webapp.db import db
    from webapp.models import AuditEntry

    with app.app_context():
        entries = db.session.scalars(db.select(AuditEntry).order_by(AuditEntry.id)).all()
        assert [e.action for e in entries] == ["review.create", "review.update"]
        assert entries[1].old["diagnosis"] == "nv" and entries[1].new["diagnosis"] == "mel"
        assert entries[1].user.email == "rev1@example.org" and entries[1].case_id == case_id

    # Through the API: a second reviewer, and a researcher who may not review.
    headers2 = {"Authorization": f"Bearer {make_token(app, 'rev2@example.org')}"}
    assert (
        client.put(
            f"/api/v1/cases/{case_id}/reviews", json={"diagnosis": "mel", "confidence": 2}, headers=headers2
        ).status_code
        == 201
    )
    assert (
        client.put(
            f"/api/v1/cases/{case_id}/reviews", json={"diagnosis": "mel", "confidence": 9}, headers=headers2
        ).status_code
        == 400
    )
    make_user(app, "res@example.org", role="researcher")
    researcher = {"Authorization": f"Bearer {make_token(app, 'res@example.org')}"}
    assert (
        client.put(
            f"/api/v1/cases/{case_id}/reviews", json={"diagnosis": "mel", "confidence": 2}, headers=researcher
        ).status_code
        == 403
    )


def test_review_queue_gives_the_next_unreviewed_case_and_skips(app, client, reviewed):
    first, second = reviewed["cases"][:2]
    login(client, "rev1@example.org")
    response = client.get("/review/next")
    assert response.status_code == 302 and f"/cases/{first}/review?queue=1" in response.location
    page = client.get(response.location).get_data(as_text=True)
    assert 'data-key="1"' in page and "review.js" in page and 'id="skip-form"' in page
    response = client.post(
        f"/cases/{first}/review?queue=1", data={"csrf_token": csrf_from(page), "diagnosis": "mel", "confidence": "3"}
    )
    assert response.status_code == 302 and response.location.endswith("/review/next")
    assert f"/cases/{second}/review" in client.get("/review/next").location
    client.post(f"/review/skip/{second}", data={"csrf_token": csrf_from(page)})
    assert f"/cases/{reviewed['cases'][2]}/review" in client.get("/review/next").location


def test_dashboard_uses_dataset_dx_then_consensus_and_kappa(app, client, reviewed):
    from webapp.db import db
    from webapp.models import Review, User

    cases = reviewed["cases"]
    with app.app_context():
        r1, r2 = (
            db.session.scalar(db.select(User).where(User.email == e)).id
            for e in ("rev1@example.org", "rev2@example.org")
        )
        for case_id, d1, d2 in [(cases[2], "nv", "nv"), (cases[3], "bcc", "mel"), (cases[4], "mel", "mel")]:
            db.session.add_all(
                [
                    Review(case_id=case_id, reviewer_id=r1, diagnosis=d1, confidence=3),
                    Review(case_id=case_id, reviewer_id=r2, diagnosis=d2, confidence=3),
                ]
            )
        db.session.commit()
    headers = {"Authorization": f"Bearer {make_token(app, 'rev1@example.org')}"}
    data = client.get("/api/v1/dashboard", headers=headers).json
    model = data["model"]
    # Apart: the data set's dx (mel->mel, mel->nv) and the consensus of two reviewers (case 3 nv/nv -> nv,
    # predicted nv; case 4 a tie -> none; case 5 mel/mel -> mel, predicted nv).
    dataset, agreed = model["dataset"], model["consensus"]
    assert dataset["n"] == 2 and agreed["n"] == 2 and model["consensus_min_reviewers"] == 2
    assert dataset["sensitivity"]["mel"]["value"] == pytest.approx(0.5) and dataset["sensitivity"]["mel"]["n"] == 2
    assert agreed["sensitivity"]["mel"]["value"] == 0.0 and agreed["sensitivity"]["nv"]["value"] == 1.0
    assert agreed["balanced_accuracy"]["value"] == pytest.approx(0.5)
    # Every figure carries n and a 95 % interval: Wilson for 1 of 2 is 0.095-0.905.
    mel = dataset["sensitivity"]["mel"]
    assert (mel["k"], mel["n"]) == (1, 2) and mel["low"] == pytest.approx(0.0945, abs=1e-3)
    assert mel["high"] == pytest.approx(0.9055, abs=1e-3)
    (pair,) = data["reviewer_agreement"]
    # rev1 (nv, bcc, mel) vs rev2 (nv, mel, mel): p_o = 2/3, p_e = (1*1 + 1*2 + 0) / 9 = 1/3 -> kappa 0.5
    assert pair["shared_cases"] == 3 and pair["kappa"] == pytest.approx(0.5)
    assert pair["kappa_ci"][0] < 0.5 < pair["kappa_ci"][1]
    login(client, "rev1@example.org")
    html = client.get("/dashboard").get_data(as_text=True)
    assert 'id="dataset-matrix"' in html and 'id="consensus-matrix"' in html and "0.500" in html
    assert "untrained" in html and "1/2; 95 % CI 0.09–0.91" in html


def test_one_reviewer_is_not_a_consensus(app, reviewed):
    from webapp.dashboard.figures import consensus_pairs
    from webapp.db import db
    from webapp.models import Review, User

    with app.app_context():
        r1 = db.session.scalar(db.select(User).where(User.email == "rev1@example.org")).id
        db.session.add(Review(case_id=reviewed["cases"][2], reviewer_id=r1, diagnosis="nv", confidence=3))
        db.session.commit()
        assert consensus_pairs(reviewed["mv"]) == []
        assert consensus_pairs(reviewed["mv"], min_reviewers=1) == [("nv", "nv")]


def test_wilson_interval_matches_published_values():
    from webapp.dashboard.figures import proportion, wilson_interval

    # Newcombe (1998), table I: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775; 1/1 -> 0.2065-1.
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(1, 1) == pytest.approx((0.2065, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) is None and proportion(0, 0)["value"] is None


def test_intervals_never_shrink_to_a_point_at_zero_or_one():
    from webapp.dashboard.figures import kappa_interval, mean_of_proportions, proportion

    wrong = mean_of_proportions([proportion(0, 1), proportion(0, 2)])
    assert wrong["value"] == 0 and wrong["low"] == 0 and wrong["high"] > 0.5  # three cases say little
    low, high = kappa_interval(["mel", "nv", "nv"], ["mel", "nv", "nv"])  # perfect agreement on 3 cases
    assert high == pytest.approx(1.0) and low < 0.2


def test_model_versions_are_compared_on_the_same_images_only(app, logged_in):
    from webapp.dashboard.figures import dashboard
    from webapp.db import db
    from webapp.models import Analysis, Image

    old = model_version(app, version="1", trained=True)
    new = model_version(app, version="2", trained=True)
    cases = [seed_case(app, top=top, mv_id=old, reference_dx="mel") for top in ("mel", "nv", "nv", "mel")]
    seed_case(app, top="mel", mv_id=new, reference_dx="mel")  # only the new version: not paired
    with app.app_context():
        for case_id, top in zip(cases[:3], ("mel", "mel", "nv")):  # the new version re-ran three of the four
            image = db.session.scalar(db.select(Image).where(Image.case_id == case_id))
            db.session.add(
                Analysis(image_id=image.id, model_version_id=new, status="succeeded", top_class=top, probabilities={})
            )
        db.session.commit()
        (row,) = dashboard(new)["paired"]
    assert row["other"]["id"] == old and row["n"] == 3
    assert row["chosen"]["accuracy"]["k"] == 2 and row["compared"]["accuracy"]["k"] == 1
    assert (row["only_chosen_right"], row["only_compared_right"]) == (1, 0)
    html = logged_in.get(f"/dashboard?model_version={new}").get_data(as_text=True)
    assert '<td class="num paired-n">3</td>' in html


def test_blind_review_shows_the_model_only_after_the_reviewer_saved(app, client, reviewed):
    app.config["BLIND_REVIEW"] = True
    case_id = reviewed["cases"][0]
    login(client, "rev1@example.org")
    page = client.get(f"/cases/{case_id}/review").get_data(as_text=True)
    assert 'id="blind-notice"' in page and 'id="model-top"' not in page and "agrees_with_model" not in page
    saved = client.post(
        f"/cases/{case_id}/review", data={"csrf_token": csrf_from(page), "diagnosis": "bcc", "confidence": "3"}
    )
    assert saved.status_code == 302 and saved.location.endswith(f"/cases/{case_id}/review")
    after = client.get(saved.location).get_data(as_text=True)
    assert 'id="model-top"' in after and "agrees_with_model" in after and 'id="blind-notice"' not in after
    app.config["BLIND_REVIEW"] = False
    other = client.get(f"/cases/{reviewed['cases'][1]}/review").get_data(as_text=True)
    assert 'id="model-top"' in other and 'id="blind-notice"' not in other


@pytest.fixture
def blind(app, reviewed):
    """BLIND_REVIEW on; case 0 (predicted mel) has a stored Grad-CAM map and rev2's review, which
    agrees with the model; rev1 has reviewed nothing yet."""
    import io

    import numpy as np
    from PIL import Image as PILImage

    from webapp.cases.explanations import explanation_keys
    from webapp.db import db
    from webapp.models import Analysis, Explanation, Image, Review, User, utcnow
    from webapp.storage import storage_from_settings

    app.config["BLIND_REVIEW"] = True
    make_user(app, "lead@example.org", role="admin")
    make_user(app, "study@example.org", role="researcher")
    case_id = reviewed["cases"][0]
    with app.app_context():
        image = db.session.scalar(db.select(Image).where(Image.case_id == case_id))
        analysis = db.session.scalar(db.select(Analysis).where(Analysis.image_id == image.id))
        raw_key, overlay_key = explanation_keys(image.content_hash, reviewed["mv"], "gradcam", "mel")
        storage = storage_from_settings(app.extensions["settings"])
        raw, png = io.BytesIO(), io.BytesIO()
        np.save(raw, np.linspace(0, 1, 100, dtype=np.float16).reshape(10, 10))
        PILImage.new("RGBA", (10, 10), (200, 40, 0, 128)).save(png, "PNG")
        storage.save(raw_key, raw.getvalue())
        storage.save(overlay_key, png.getvalue())
        row = Explanation(
            analysis=analysis,
            image=image,
            model_version_id=reviewed["mv"],
            method="gradcam",
            class_name="mel",
            status="done",
            raw_key=raw_key,
            overlay_key=overlay_key,
            finished_at=utcnow(),
        )
        db.session.add(row)
        rev2 = db.session.scalar(db.select(User.id).where(User.email == "rev2@example.org"))
        db.session.add_all(
            [Review(case_id=case_id, reviewer_id=rev2, diagnosis="mel", agrees_with_model=True, confidence=4)]
        )
        db.session.commit()
        return {"case": case_id, "explanation": row.id, "overlay_key": overlay_key, "cases": reviewed["cases"]}


def _token_headers(app, email):
    return {"Authorization": f"Bearer {make_token(app, email)}"}


def test_blind_review_hides_the_answer_on_the_case_page_until_the_reviewer_saved(app, client, blind):
    login(client, "rev1@example.org")
    url = f"/cases/{blind['case']}"
    page = client.get(url).get_data(as_text=True)
    assert 'id="blind-notice"' in page and "hidden until you save your own review" in page
    assert f'href="/cases/{blind["case"]}/review"' in page  # what reveals it
    assert "Top class:" not in page and "Probabilities of the seven classes" not in page
    assert 'class="overlay"' not in page and "Explanations ·" not in page
    assert "rev2@example.org" not in page and 'id="reviews-hidden"' in page  # rev2 agreed: that names the answer
    status = client.get(f"{url}/status.json").json
    (analysis,) = status["analyses"]
    assert "probabilities" not in analysis and "top_class" not in analysis and analysis["explanations"] == []
    assert status["reviews"] == [] and status["blind_review"]["hidden"] is True
    assert 'id="blind-notice"' in status["html"] and 'class="overlay"' not in status["explanations_html"]

    assert _review(client, blind["case"], diagnosis="nv", confidence="3").status_code == 302
    after = client.get(url).get_data(as_text=True)
    assert 'id="blind-notice"' not in after and "Top class:" in after and 'class="overlay"' in after
    assert "rev2@example.org" in after
    assert client.get(f"{url}/status.json").json["analyses"][0]["top_class"] == "mel"


def test_blind_review_refuses_a_reviewer_the_maps_until_they_reviewed(app, client, blind):
    case_id, eid = blind["case"], blind["explanation"]
    overlay, raw = f"/cases/{case_id}/explanations/{eid}/overlay.png", f"/cases/{case_id}/explanations/{eid}/raw.npy"
    headers = _token_headers(app, "rev1@example.org")
    for answer in (client.get(overlay, headers=headers), client.get(raw, headers=headers)):
        assert answer.status_code == 403 and "Blind review" in answer.get_data(as_text=True)
    asked = client.post(f"/api/v1/cases/{case_id}/explanations", json={"method": "gradcam++"}, headers=headers)
    assert asked.status_code == 403 and "Blind review" in asked.json["error"]
    # The map's storage key is no way round: /files serves uploaded images only.
    assert client.get(f"/files/{blind['overlay_key']}", headers=headers).status_code == 404
    login(client, "rev1@example.org")
    form = client.get(f"/cases/{case_id}").get_data(as_text=True)
    page = client.post(
        f"/cases/{case_id}/explanations",
        data={"csrf_token": csrf_from(form), "method": "gradcam", "class": "nv"},
        follow_redirects=True,
    ).get_data(as_text=True)
    assert "Blind review: the model&#39;s answer" in page
    assert client.get(overlay).status_code == 403

    assert _review(client, case_id, diagnosis="mel", confidence="3").status_code == 302
    assert client.get(overlay).status_code == 200 and client.get(raw, headers=headers).status_code == 200
    for email in ("lead@example.org", "study@example.org"):
        assert app.test_client().get(overlay, headers=_token_headers(app, email)).status_code == 200


def test_blind_review_hides_the_answer_in_the_case_list_filters_and_exports(app, client, blind):
    import csv
    import io

    login(client, "rev1@example.org")
    listing = client.get("/cases").get_data(as_text=True)
    assert 'id="blind-list-notice"' in listing and listing.count("hidden until you") == len(blind["cases"])
    assert "<strong>mel</strong>" not in listing and "<strong>nv</strong>" not in listing
    assert "1✓" not in listing  # rev2's agreement with the model
    # Filtering on the model's answer would give it away: those filters match only reviewed cases.
    assert "0 cases match" in client.get("/cases?predicted=mel").get_data(as_text=True)
    assert "0 cases match" in client.get("/cases?agreement=agree").get_data(as_text=True)
    exported = client.get("/cases/export.json").json["cases"]
    row = next(r for r in exported if r["id"] == blind["case"])
    assert row["prediction"] is None and row["predictions"] == [] and row["reviews"] == []
    assert row["review_summary"]["agree"] is None and row["blind_review"]["hidden"] is True
    api = client.get("/api/v1/cases", headers=_token_headers(app, "rev1@example.org")).json["cases"]
    assert all(r["prediction"] is None and r["blind_review"]["hidden"] for r in api)
    rows = {
        int(r["case_id"]): r
        for r in csv.DictReader(io.StringIO(client.get("/cases/export.csv").get_data(as_text=True)))
    }
    assert rows[blind["case"]]["predicted_class"] == "hidden until you review this case (blind review)"
    assert rows[blind["case"]]["probability_mel"] == "" and rows[blind["case"]]["reviews"] == ""

    assert _review(client, blind["case"], diagnosis="mel", confidence="3").status_code == 302
    listing = client.get("/cases?predicted=mel").get_data(as_text=True)
    assert "1 case matches" in listing and "<strong>mel</strong>" in listing
    rows = {
        int(r["case_id"]): r
        for r in csv.DictReader(io.StringIO(client.get("/cases/export.csv").get_data(as_text=True)))
    }
    assert rows[blind["case"]]["predicted_class"] == "mel" and float(rows[blind["case"]]["probability_mel"]) == 0.6
    assert rows[blind["cases"][1]]["predicted_class"].startswith("hidden until")  # still unreviewed


def test_blind_review_hides_the_answer_in_the_api(app, client, blind):
    headers = _token_headers(app, "rev1@example.org")
    body = client.get(f"/api/v1/cases/{blind['case']}", headers=headers).json
    (analysis,) = body["analyses"]
    assert "probabilities" not in analysis and "top_class" not in analysis and "malignant_probability" not in analysis
    assert analysis["explanations"] == [] and body["reviews"] == []
    assert body["blind_review"]["note"].startswith("Blind review") and body["blind_review"]["review_url"].endswith(
        "/review"
    )
    reviews = client.get(f"/api/v1/cases/{blind['case']}/reviews", headers=headers).json
    assert reviews["reviews"] == [] and reviews["blind_review"]["hidden"] is True
    put = client.put(
        f"/api/v1/cases/{blind['case']}/reviews", json={"diagnosis": "bcc", "confidence": 3}, headers=headers
    )
    assert put.status_code == 201
    body = client.get(f"/api/v1/cases/{blind['case']}", headers=headers).json
    assert body["analyses"][0]["top_class"] == "mel" and "blind_review" not in body and len(body["reviews"]) == 2


def test_blind_review_leaves_admins_and_researchers_and_is_off_by_default(app, blind):
    for email in ("lead@example.org", "study@example.org"):
        client = app.test_client()
        body = client.get(f"/api/v1/cases/{blind['case']}", headers=_token_headers(app, email)).json
        assert body["analyses"][0]["top_class"] == "mel" and "blind_review" not in body
        assert body["analyses"][0]["explanations"][0]["url"] and len(body["reviews"]) == 1
        login(client, email)
        page = client.get(f"/cases/{blind['case']}").get_data(as_text=True)
        assert "Top class:" in page and 'class="overlay"' in page and 'id="blind-notice"' not in page
        listing = client.get("/cases?predicted=mel").get_data(as_text=True)
        assert "1 case matches" in listing and 'id="blind-list-notice"' not in listing
    app.config["BLIND_REVIEW"] = False
    client = app.test_client()
    login(client, "rev1@example.org")
    page = client.get(f"/cases/{blind['case']}").get_data(as_text=True)
    assert "Top class:" in page and 'class="overlay"' in page and "rev2@example.org" in page


def test_rerun_with_another_model_version_keeps_results_side_by_side(
    app, client, auth_headers, sent_tasks, monkeypatch
):
    from webapp.db import db
    from webapp.models import Analysis, AuditEntry, Job

    mv1 = model_version(app)
    mv2 = model_version(app, name="other", version="2")
    cases = [seed_case(app, top="nv", mv_id=mv1, age=a) for a in (20, 60, 61)]
    response = client.post(f"/api/v1/cases/{cases[0]}/rerun", json={"model_version_id": mv2}, headers=auth_headers)
    assert response.status_code == 202 and response.json["queued"] == 1
    again = client.post("/api/v1/cases/rerun?age_min=18", json={"model_version_id": mv2}, headers=auth_headers)
    assert again.json["queued"] == 2 and again.json["skipped"] == 1  # the first one is still waiting
    assert (
        client.post(f"/api/v1/cases/{cases[0]}/rerun", json={"model_version_id": 999}, headers=auth_headers).status_code
        == 400
    )
    with app.app_context():
        jobs = db.session.scalars(db.select(Job).where(Job.model_version_id == mv2)).all()
        assert len(jobs) == 3 and {j.status for j in jobs} == {"queued"}
        assert (
            db.session.scalar(db.select(db.func.count()).select_from(AuditEntry).where(AuditEntry.action == "rerun"))
            == 2
        )
        job_id = jobs[0].id
        all_ids = sorted(j.id for j in jobs)
    # Each re-run sends its jobs as analyse messages (several ids to a message: a worker's micro-batch).
    assert {name for name, *_ in sent_tasks} == {"worker.tasks.analyse"}
    assert sorted(i for _, ids, _ in sent_tasks for i in ids) == all_ids

    # The worker runs the job with the chosen version's predictor; the first result stays.
    import numpy as np

    import worker.celery_app as celery_app
    import worker.explain as explain
    import worker.predict as predict
    import worker.tasks as tasks

    class Fake:
        manifest = {"name": "other", "version": "2", "class_names": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]}

        def predict(self, images):
            return np.tile(np.array([0.1, 0.1, 0.1, 0.1, 0.4, 0.1, 0.1], dtype=np.float32), (len(images), 1))

    monkeypatch.setattr(celery_app, "_flask_app", app)
    monkeypatch.setattr(predict, "_versioned_predictors", {mv2: Fake()})
    monkeypatch.setattr(explain, "queue_followups", lambda *a, **k: None)
    monkeypatch.setattr(predict, "read_image", lambda key, storage=None: np.zeros((8, 8, 3), dtype=np.uint8))
    assert tasks.analyse(job_id) == "succeeded"
    with app.app_context():
        rows = db.session.scalars(
            db.select(Analysis).join(Job, Job.image_id == Analysis.image_id).where(Job.id == job_id)
        ).all()
        assert sorted((r.model_version_id, r.top_class) for r in rows) == [(mv1, "nv"), (mv2, "mel")]
