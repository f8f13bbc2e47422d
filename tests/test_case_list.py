"""The case list: filters, cursor pagination, a bounded number of queries, export (CSV, JSON)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest
from portal_helpers import make_token, make_user
from research_helpers import model_version, seed_case
from sqlalchemy import event

NOW = datetime.now(UTC)


@pytest.fixture
def seeded(app, researcher):
    from webapp.db import db
    from webapp.models import Review, User

    mv1 = model_version(app)
    mv2 = model_version(app, version="2026.11.0", trained=True)
    ids = {
        "mel_ref_mel": seed_case(
            app, top="mel", mv_id=mv1, reference_dx="mel", age=70, sex="male", site="back", lesion_ref="L1"
        ),
        "nv_ref_mel": seed_case(
            app,
            top="nv",
            mv_id=mv1,
            reference_dx="mel",
            age=30,
            sex="female",
            site="face",
            lesion_ref="L2",
            created=NOW - timedelta(days=10),
        ),
        "bcc_noref": seed_case(app, top="bcc", mv_id=mv1, age=50, sex="female", site="back", lesion_ref="=danger"),
        "queued": seed_case(app, job_status="queued", lesion_ref="L4"),
        "failed": seed_case(app, job_status="failed", lesion_ref="L5", age=5),
    }
    seed_case_id = ids["mel_ref_mel"]
    with app.app_context():
        from webapp.models import Analysis, Image

        image = db.session.scalar(db.select(Image).where(Image.case_id == seed_case_id))
        db.session.add(
            Analysis(
                image_id=image.id, model_version_id=mv2, status="succeeded", top_class="bkl", probabilities={"bkl": 0.9}
            )
        )
        me = db.session.scalar(db.select(User).where(User.email == researcher))
        db.session.add(
            Review(
                case_id=ids["bcc_noref"],
                reviewer_id=me.id,
                diagnosis="bcc",
                agrees_with_model=True,
                confidence=4,
                notes="+1 looks typical",
                updated_at=NOW,
            )
        )
        db.session.add(
            Review(
                case_id=ids["nv_ref_mel"],
                reviewer_id=me.id,
                diagnosis="mel",
                agrees_with_model=False,
                confidence=3,
                updated_at=NOW,
            )
        )
        db.session.commit()
    return {"ids": ids, "mv1": mv1, "mv2": mv2}


def _ids(client, headers, query):
    response = client.get(f"/api/v1/cases?{query}", headers=headers)
    assert response.status_code == 200, response.json
    return {c["id"] for c in response.json["cases"]}


def test_filters(app, client, auth_headers, seeded):
    ids, h = seeded["ids"], auth_headers
    assert _ids(client, h, "predicted=mel") == {ids["mel_ref_mel"]}
    assert _ids(client, h, f"predicted=bkl&model_version={seeded['mv2']}") == {ids["mel_ref_mel"]}
    assert _ids(client, h, f"predicted=mel&model_version={seeded['mv2']}") == set()
    assert _ids(client, h, "reference=mel") == {ids["mel_ref_mel"], ids["nv_ref_mel"]}
    assert _ids(client, h, "reference=none") == {ids["bcc_noref"], ids["queued"], ids["failed"]}
    assert _ids(client, h, "review=reviewed") == {ids["bcc_noref"], ids["nv_ref_mel"]}
    assert ids["queued"] in _ids(client, h, "review=not_reviewed_by_me")
    assert _ids(client, h, "agreement=agree") == {ids["bcc_noref"]}
    assert _ids(client, h, "agreement=disagree") == {ids["nv_ref_mel"]}
    assert _ids(client, h, f"agreement=matches_reference&model_version={seeded['mv1']}") == {ids["mel_ref_mel"]}
    assert _ids(client, h, f"agreement=differs_from_reference&model_version={seeded['mv1']}") == {ids["nv_ref_mel"]}
    assert _ids(client, h, "status=queued") == {ids["queued"]}
    assert _ids(client, h, "status=failed") == {ids["failed"]}
    day = (NOW - timedelta(days=10)).date().isoformat()
    assert _ids(client, h, f"date_from={day}&date_to={day}") == {ids["nv_ref_mel"]}
    assert _ids(client, h, "age_min=40&age_max=80") == {ids["mel_ref_mel"], ids["bcc_noref"]}
    assert _ids(client, h, "sex=female&site=back") == {ids["bcc_noref"]}
    assert _ids(client, h, "q=L2") == {ids["nv_ref_mel"]}
    assert _ids(client, h, f"q=%23{ids['failed']}") == {ids["failed"]}
    assert len(_ids(client, h, "uploader=1")) == 0
    for bad in ("sex=robot", "age_min=abc", "date_from=yesterday", "sort=random", "review=maybe", "cursor=zz"):
        response = client.get(f"/api/v1/cases?{bad}", headers=h)
        assert response.status_code == 400 and response.json["field"] == bad.split("=")[0], bad


def test_cursor_pagination_and_sorting(app, client, auth_headers, seeded):
    seen, url = [], "/api/v1/cases?per_page=2"
    while url:
        body = client.get(url, headers=auth_headers).json
        assert body["total"] == 5
        seen += [c["id"] for c in body["cases"]]
        url = body["next"]
    assert seen == sorted(seen, reverse=True) and len(seen) == 5
    ages = [c["age"] for c in client.get("/api/v1/cases?sort=-age&per_page=2", headers=auth_headers).json["cases"]]
    assert ages == [70, 50]
    second = client.get("/api/v1/cases?sort=age&per_page=2", headers=auth_headers).json
    rest = client.get(second["next"], headers=auth_headers).json
    assert [c["age"] for c in second["cases"] + rest["cases"]] == [None, 5, 30, 50]


def test_list_page_uses_a_fixed_number_of_queries(app, logged_in, seeded):
    from webapp.db import db

    counts = []
    for n_extra in (0, 20):
        mv = seeded["mv1"]
        for i in range(n_extra):
            seed_case(app, top="nv", mv_id=mv, lesion_ref=f"extra{i}")
        statements = []
        with app.app_context():
            engine = db.engine
        listener = lambda *args, seen=statements: seen.append(args[2])  # noqa: E731
        event.listen(engine, "before_cursor_execute", listener)
        try:
            page = logged_in.get("/cases?per_page=50")
        finally:
            event.remove(engine, "before_cursor_execute", listener)
        assert page.status_code == 200
        counts.append(len(statements))
    assert counts[0] == counts[1], counts  # 25 rows cost as many queries as 5


def test_pages_show_filters_and_export_neutralises(app, logged_in, seeded):
    html = logged_in.get("/cases?predicted=mel").get_data(as_text=True)
    assert "1 case matches" in html and "efficientnetb3-cbam" in html and "untrained, not a diagnosis" in html
    assert "Research use only" in html
    assert logged_in.get("/cases?age_min=x").status_code == 400
    response = logged_in.get("/cases/export.csv?reference=none")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert len(rows) == 3
    danger = next(r for r in rows if r["case_id"] == str(seeded["ids"]["bcc_noref"]))
    assert danger["lesion_ref"] == "'=danger"
    assert danger["review_consensus"] == "bcc" and "researcher@example.org: bcc, agrees" in danger["reviews"]
    assert danger["reviews"].endswith("notes: +1 looks typical")  # inside the cell, not at its start
    assert danger["model_name"] == "efficientnetb3-cbam" and danger["predicted_class"] == "bcc"


def test_api_csv_export_and_reviewer_access(app, client, seeded):
    make_user(app, "rev@example.org", role="reviewer")
    headers = {"Authorization": f"Bearer {make_token(app, 'rev@example.org')}"}
    response = client.get("/api/v1/cases.csv?predicted=nv", headers=headers)
    assert response.status_code == 200
    lines = response.get_data(as_text=True).strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("case_id,")
    body = client.get("/api/v1/cases?reference=mel", headers=headers).json
    row = next(c for c in body["cases"] if c["id"] == seeded["ids"]["mel_ref_mel"])
    assert {p["model"]["version"] for p in row["predictions"]} == {"untrained", "2026.11.0"}
    assert body["disclaimer"].startswith("Research use only")
