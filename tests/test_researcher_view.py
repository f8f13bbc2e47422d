"""Issue 17, what a researcher meets on the pages: each finding with the test that guards it
(page tests with the Flask test client; layout, overflow and accessibility in tests/e2e/test_layout.py)."""

from __future__ import annotations

import io

import pytest
from portal_helpers import csrf_from, image_bytes, login, make_user
from research_helpers import model_version, seed_case

pytestmark = pytest.mark.usefixtures("sent_tasks")


def _upload(client, data=None, **fields):
    page = client.get("/cases/new").get_data(as_text=True)
    body = {"csrf_token": csrf_from(page), "image": (io.BytesIO(data or image_bytes()), "lesion.jpg"), **fields}
    return client.post("/cases/new", data=body, content_type="multipart/form-data")


# --- search and filters ---------------------------------------------------------------------------


def test_search_finds_text_anywhere_in_any_letter_case(app, logged_in):
    mv = model_version(app)
    wanted = seed_case(app, top="mel", mv_id=mv, lesion_ref="HAM_0024306")
    seed_case(app, top="nv", mv_id=mv, lesion_ref="HAM_0099999")
    for q in ("0024306", "ham_00243", "24306"):
        body = logged_in.get(f"/cases/export.json?q={q}").json
        assert [c["id"] for c in body["cases"]] == [wanted], q
    # A LIKE wildcard typed by the user is a literal character, not "anything".
    assert logged_in.get("/cases/export.json?q=%25").json["total"] == 0


def test_reversed_range_and_oversized_page_are_refused_not_adjusted(app, logged_in, auth_headers, client):
    page = logged_in.get("/cases?date_from=2026-05-01&date_to=2026-01-01")
    assert page.status_code == 400 and "date_to (2026-01-01) is before date_from (2026-05-01)" in page.get_data(
        as_text=True
    )
    api = client.get("/api/v1/cases?date_from=2026-05-01&date_to=2026-01-01", headers=auth_headers)
    assert api.status_code == 400 and api.json["field"] == "date_to"
    assert client.get("/api/v1/cases?age_min=70&age_max=20", headers=auth_headers).status_code == 400
    big = logged_in.get("/cases?per_page=1000")
    assert big.status_code == 400 and "per_page must be a whole number between 1 and 200" in big.get_data(as_text=True)
    assert client.get("/api/v1/cases?per_page=1000", headers=auth_headers).status_code == 400


def test_case_list_shows_thumbnails_a_mismatch_cue_and_filters_behind_a_toggle(app, logged_in):
    mv = model_version(app, version="2026.12.01", trained=True)
    differs = seed_case(app, top="nv", mv_id=mv, reference_dx="mel", lesion_ref="L1")
    seed_case(app, top="mel", mv_id=mv, reference_dx="mel", lesion_ref="L2")
    html = logged_in.get("/cases").get_data(as_text=True)
    assert html.count('class="thumb"') == 2 and 'src="/files/images/' in html
    assert html.count("≠ reference") == 1
    row = html.split(f'href="/cases/{differs}"', 1)[1].split("</tr>", 1)[0]
    assert "≠ reference" in row
    assert '<span class="hint model-name">efficientnetb3-cbam 2026.12.01</span>' in html  # kept on one line (CSS)
    assert '<details class="filter-toggle"' in html and 'data-active="false"' in html
    assert 'class="table-scroll"' in html


# --- exports --------------------------------------------------------------------------------------


def test_json_export_link_works_for_a_signed_in_user(app, logged_in, client):
    mv = model_version(app)
    case_id = seed_case(app, top="mel", mv_id=mv, lesion_ref="L1")
    html = logged_in.get("/cases").get_data(as_text=True)
    assert 'id="export-json" href="/cases/export.json"' in html
    body = logged_in.get("/cases/export.json")
    assert body.status_code == 200 and [c["id"] for c in body.json["cases"]] == [case_id]
    assert body.json["disclaimer"].startswith("Research use only")
    assert logged_in.get("/cases/export.json?sex=robot").status_code == 400
    anonymous = client.application.test_client().get("/cases/export.json")
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]


# --- upload ---------------------------------------------------------------------------------------


def test_upload_form_takes_a_reference_diagnosis(app, logged_in):
    from webapp.db import db
    from webapp.models import Case

    assert 'name="reference_dx"' in logged_in.get("/cases/new").get_data(as_text=True)
    assert _upload(logged_in, reference_dx="bcc", reference_dx_type="histo").status_code == 302
    refused = _upload(logged_in, data=image_bytes("ISIC_0024698.jpg"), reference_dx="cancer")
    assert refused.status_code == 400 and "reference_dx must be one of" in refused.get_data(as_text=True)
    with app.app_context():
        cases = db.session.scalars(db.select(Case)).all()
        assert [(c.reference_dx, c.reference_dx_type) for c in cases] == [("bcc", "histo")]


def test_too_large_upload_keeps_the_user_on_the_form_with_the_limit(app, logged_in):
    from webapp.db import db
    from webapp.models import Case

    app.config["MAX_CONTENT_LENGTH"] = 200_000  # the settings' MAX_UPLOAD_MB + 1 MB, smaller here
    response = _upload(logged_in, data=b"\xff\xd8" + b"x" * 400_000)
    html = response.get_data(as_text=True)
    assert response.status_code == 413
    assert f"larger than the upload limit of {app.config['MAX_UPLOAD_MB']:g} MB" in html
    assert '<form method="post" enctype="multipart/form-data"' in html and 'name="image"' in html
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count()).select_from(Case)) == 0


# --- audit text -----------------------------------------------------------------------------------


def test_apostrophes_in_review_notes_read_as_written(app, client):
    make_user(app, "lead@example.org", role="admin")
    mv = model_version(app)
    case_id = seed_case(app, top="mel", mv_id=mv)
    login(client, "lead@example.org")
    form = client.get(f"/cases/{case_id}/review").get_data(as_text=True)
    notes = "the lesion's border isn't regular"
    saved = client.post(
        f"/cases/{case_id}/review",
        data={"csrf_token": csrf_from(form), "diagnosis": "mel", "confidence": "3", "notes": notes},
    )
    assert saved.status_code == 302
    for page in (client.get(f"/cases/{case_id}"), client.get("/admin/audit")):
        html = page.get_data(as_text=True)
        assert "\\u0027" not in html
        assert "the lesion&#39;s border isn&#39;t regular" in html


# --- pages that keep their promises ---------------------------------------------------------------


def test_api_documentation_page_is_rendered_from_the_openapi_document(app, logged_in):
    from webapp.api.blueprint import spec

    html = logged_in.get("/docs/api").get_data(as_text=True)
    with app.app_context():
        paths = spec.spec["paths"]
    for path, item in paths.items():
        for method in item:
            assert f"<code>{method.upper()} {path}</code>" in html, (method, path)
    assert "<code>per_page</code>" in html and 'id="schema-CasePage"' in html
    assert "cdn" not in html.lower() and '<script src="http' not in html


def test_model_cards_are_shown_to_researchers_escaped_and_without_server_paths(app, logged_in, tmp_path):
    from webapp.db import db
    from webapp.models import ModelVersion

    artifact = tmp_path / "artifacts" / "v1"
    artifact.mkdir(parents=True)
    (artifact / "MODEL_CARD.md").write_text(
        "# Model card: demo 1\n\n| metric | value |\n|---|---|\n| balanced accuracy | 0.58 |\n\n"
        f"Exported with `python -m ml.export --out {artifact}` from /tmp/ship.\n\n<script>alert(1)</script>\n"
        "[click](javascript:alert(2))\n"
    )
    mv = model_version(app, version="1", trained=True)
    with app.app_context():
        db.session.get(ModelVersion, mv).artifact_path = str(artifact)
        db.session.commit()
    html = logged_in.get("/models").get_data(as_text=True)
    assert "<h1>Model card: demo 1</h1>" in html and "<td>0.58</td>" in html
    assert "<script>alert(1)" not in html and "&lt;script&gt;" in html
    assert 'href="javascript:' not in html
    assert str(tmp_path) not in html and "/tmp/ship" not in html
    assert 'href="/models"' in html  # in the navigation for every role


# --- the page frame -------------------------------------------------------------------------------


def test_every_page_has_a_skip_link_a_favicon_and_one_notice(app, logged_in):
    html = logged_in.get("/cases").get_data(as_text=True)
    assert '<a class="skip-link" href="#main">' in html and '<main id="main"' in html
    assert 'rel="icon" href="/static/favicon.svg"' in html
    assert logged_in.get("/static/favicon.svg").status_code == 200
    assert html.count("Research use only") == 1
    assert 'aria-expanded="false" aria-controls="site-nav"' in html


# --- the case page --------------------------------------------------------------------------------


def _case_with_two_versions(app, logged_in):
    from webapp.db import db
    from webapp.models import Analysis, Image

    assert _upload(logged_in).status_code == 302
    old = model_version(app, version="2026.11.0", trained=True)
    new = model_version(app, version="2026.12.01", trained=True)
    with app.app_context():
        image = db.session.scalars(db.select(Image)).one()
        for mv, top in ((old, "nv"), (new, "mel")):
            probs = {c: (0.64 if c == top else 0.06) for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")}
            db.session.add(
                Analysis(image=image, model_version_id=mv, status="succeeded", top_class=top, probabilities=probs)
            )
        image.jobs[0].status = "succeeded"
        db.session.commit()
        return image.case_id


def test_case_page_compares_versions_in_one_table_and_says_the_notice_once_beside_the_result(app, logged_in):
    case_id = _case_with_two_versions(app, logged_in)
    html = logged_in.get(f"/cases/{case_id}").get_data(as_text=True)
    table = html.split('id="version-comparison"', 1)[1].split("</table>", 1)[0]
    rows = table.split("<tbody>", 1)[1].split("</tr>")[:-1]
    assert len(rows) == 2
    assert "2026.11.0" in rows[0] and "<strong>nv</strong>" in rows[0] and "64.0%" in rows[0]
    assert "2026.12.01" in rows[1] and "<strong>mel</strong>" in rows[1] and "image alone" in rows[1].lower()
    assert html.count('<article class="analysis">') == 1  # the newest, described once; not stacked duplicates
    assert html.count("Research use only") == 2  # the banner, and once beside the result
    assert "stand side by side" not in html


def test_csv_export_has_one_probability_column_per_class_and_the_notice(app, logged_in):
    import csv

    _case_with_two_versions(app, logged_in)
    response = logged_in.get("/cases/export.csv")
    (row,) = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert row["predicted_class"] == "mel" and row["probability_mel"] == "0.64" and row["probability_nv"] == "0.06"
    assert [k for k in row if k.startswith("probability_")] == [
        f"probability_{c}" for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    ]
    assert row["notice"] == "Research use only — not a diagnostic device."


# --- folder uploads ---------------------------------------------------------------------------------


def test_bad_metadata_rows_are_listed_once_in_the_table(app, logged_in):
    from research_helpers import CSV_HEADER

    page = logged_in.get("/batches/new").get_data(as_text=True)
    text = CSV_HEADER + "ISIC_1,HAM_1,mel,histo,40,martian,back\nISIC_2,HAM_2,mel,histo,40,male,moon\n"
    response = logged_in.post(
        "/batches",
        data={"csrf_token": csrf_from(page), "metadata": (io.BytesIO(text.encode()), "m.csv")},
        content_type="multipart/form-data",
    )
    html = response.get_data(as_text=True)
    assert response.status_code == 400 and "2 invalid row(s); nothing was stored" in html
    assert html.count("martian") == 1 and html.count("moon") == 1  # in the table only, not in the message too
    assert '<table class="list" id="csv-errors">' in html


def test_a_file_that_is_not_an_image_is_listed_as_skipped(app, client, auth_headers):
    response = client.post(
        "/api/v1/batches",
        headers=auth_headers,
        data={"images": [(io.BytesIO(b""), "lesions/notes.txt"), (io.BytesIO(image_bytes()), "lesions/a.jpg")]},
    )
    assert response.status_code in (201, 202), response.json
    progress = client.get(response.json["url"], headers=auth_headers).json
    assert progress["errors"] == [{"file": "lesions/notes.txt", "error": "Skipped: not a .jpg, .jpeg or .png file."}]


def test_api_upload_takes_the_reference_diagnosis_as_documented(app, client, auth_headers):
    from webapp.api.blueprint import spec

    with app.app_context():
        documented = spec.spec["components"]["schemas"]["CaseUpload"]["properties"]
    assert {"reference_dx", "reference_dx_type"} <= set(documented)
    data = {"image": (io.BytesIO(image_bytes()), "a.jpg"), "reference_dx": "mel", "reference_dx_type": "histo"}
    created = client.post("/api/v1/cases", headers=auth_headers, data=data)
    assert created.status_code in (201, 202), created.json
    case = client.get(created.json["url"], headers=auth_headers).json
    assert (case["reference_dx"], case["reference_dx_type"]) == ("mel", "histo")
    bad = {"image": (io.BytesIO(image_bytes("ISIC_0024698.jpg")), "b.jpg"), "reference_dx": "nevus"}
    refused = client.post("/api/v1/cases", headers=auth_headers, data=bad)
    assert refused.status_code == 400 and refused.json.get("field") in ("reference_dx", None)
    assert "reference_dx must be one of" in refused.json["error"]
