"""The screenshots of the README's five-minute tour and docs/, made by the browser.

Debian's Chromium (Playwright) walks the tour against the real portal (redis-server, the web app in
an HTTP server thread): the login page, the upload form, the case list, a case page with the
shipped model's real Grad-CAM and SHAP maps side by side and their colour bars, the review form,
a batch's progress, the dashboard, the model card and the API documentation; at 1280 px, the case
list and the case page's explanations also at 375 px. Every page is checked for the elements its picture shows.

The results shown are the shipped model's own (models/default): the maps and probabilities of
ISIC_0025964 from tests/fixtures/maps, and for the batch's five test-split images their rows of
models/default/eval_test/predictions.csv, written as the worker writes them, so no worker runs.

    UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest -q tests/e2e/test_screenshots.py

writes the pictures to docs/screenshots/ (palette PNGs, about 1 MB in all); without it they go to
the test's temporary folder, so a test run never rewrites the committed files.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pytest
from e2e_support import ROOT, signed_in_page
from portal_helpers import csrf_from, image_bytes, login, make_token, make_user
from test_browser import CHROMIUM_ARGS, _chromium, server  # noqa: F401  (the server fixture)
from test_layout import MAPS, seed_maps

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]
DOCS = ROOT / "docs" / "screenshots"
CARD_IMAGES = ROOT / "tests" / "fixtures" / "card"
PREDICTIONS = ROOT / "models" / "default" / "eval_test" / "predictions.csv"
CASE_IMAGE = "ISIC_0025964.jpg"  # the melanoma of tests/fixtures/maps
TALLEST = 1700  # px of page kept in a picture: the case page down to its maps and colour bars


def _analyse(app, case_id: int, mv_id: int, probabilities: dict[str, float], top: str) -> None:
    """The case's analysis as the worker stores it: a succeeded analysis and its job."""
    from webapp.db import db
    from webapp.models import Analysis, Image, utcnow

    with app.app_context():
        image = db.session.scalar(db.select(Image).where(Image.case_id == case_id))
        analysis = Analysis(
            image_id=image.id,
            model_version_id=mv_id,
            status="succeeded",
            top_class=top,
            probabilities=probabilities,
            finished_at=utcnow(),
        )
        db.session.add(analysis)
        db.session.flush()
        job = image.jobs[0]
        job.status, job.analysis_id, job.model_version_id, job.finished_at = "succeeded", analysis.id, mv_id, utcnow()
        db.session.commit()


def _seed(app) -> dict[str, int]:
    """The shipped version; one uploaded case with its real result, maps and two reviews; a batch of
    the five test-split images, four analysed (their rows of predictions.csv), one still queued."""
    import json

    from webapp.db import db
    from webapp.models import Case, ModelVersion, Review, User

    for role in ("admin", "researcher", "reviewer"):
        make_user(app, f"{role}@example.org", role=role)
    manifest = json.loads((ROOT / "models" / "default" / "manifest.json").read_text())
    with app.app_context():
        mv = ModelVersion(
            name=manifest["name"],
            version=manifest["version"],
            trained=True,
            trained_on=manifest["trained_on"],
            class_names=manifest["class_names"],
            manifest=manifest,
            artifact_path=str(ROOT / "models" / "default"),
        )
        db.session.add(mv)
        db.session.commit()
        mv_id = mv.id

    client = app.test_client()
    login(client, "researcher@example.org")
    fields = {"age": "40", "sex": "female", "site": "chest", "lesion_ref": "HAM_0000871", "patient_ref": "P-0871"}
    fields |= {"reference_dx": "mel", "reference_dx_type": "histo"}
    form = client.get("/cases/new").get_data(as_text=True)
    body = {"csrf_token": csrf_from(form), "image": (io.BytesIO(image_bytes(CASE_IMAGE)), CASE_IMAGE), **fields}
    response = client.post("/cases/new", data=body, content_type="multipart/form-data")
    assert response.status_code == 302, response.get_data(as_text=True)[:500]
    case_id = int(response.headers["Location"].rsplit("/", 1)[1])
    summary = json.loads((MAPS / "summary.json").read_text())
    _analyse(app, case_id, mv_id, summary["probabilities"], summary["top_class"])
    seed_maps(app, case_id, mv_id)

    names = sorted(p.name for p in CARD_IMAGES.glob("*.jpg"))
    headers = {"Authorization": f"Bearer {make_token(app, 'researcher@example.org')}"}
    files = [(io.BytesIO((CARD_IMAGES / n).read_bytes()), n) for n in names]
    created = client.post("/api/v1/batches", data={"images": files, "name": "test split sample"}, headers=headers)
    assert created.status_code == 202, created.json
    batch_id = created.json["id"]
    rows = {r["image_id"]: r for r in csv.DictReader(PREDICTIONS.open()) if f"{r['image_id']}.jpg" in names}
    with app.app_context():
        cases = {
            c.images[0].original_filename: c.id
            for c in db.session.scalars(db.select(Case).where(Case.batch_id == batch_id))
        }
        for name in names:
            db.session.get(Case, cases[name]).reference_dx = rows[name[:-4]]["dx"]
        users = {u.email: u.id for u in db.session.scalars(db.select(User))}
        for email, confidence in (("reviewer@example.org", 4), ("admin@example.org", 3)):
            db.session.add(
                Review(
                    case_id=case_id,
                    reviewer_id=users[email],
                    diagnosis="mel",
                    confidence=confidence,
                    notes="atypical network, regression at the edge",
                )
            )
        db.session.commit()
    for name in names[:-1]:  # the last one is still queued: the batch page shows work in progress
        row = rows[name[:-4]]
        probabilities = {c: float(row[f"p_{c}"]) for c in manifest["class_names"]}
        _analyse(app, cases[name], mv_id, probabilities, row["predicted"])
    return {"case": case_id, "batch": batch_id, "version": mv_id}


def _picture(page, folder: Path, name: str, part: str | None = None) -> Path:
    """The page (down to TALLEST px), or only its element `part`, as folder/name.png; into docs/ as
    a compressed palette PNG."""
    from PIL import Image

    path = folder / f"{name}.png"
    if part:
        page.locator(part).screenshot(path=str(path))
    else:
        height = min(page.evaluate("document.documentElement.scrollHeight"), TALLEST)
        clip = {"x": 0, "y": 0, "width": page.viewport_size["width"], "height": height}
        page.screenshot(path=str(path), full_page=True, clip=clip)
    if folder == DOCS:  # 256 colours: the pages are flat colours, the lesions survive dithering
        with Image.open(path) as shot:
            shot.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        path.chmod(0o644)  # the app under test creates its files 0600
    with Image.open(path) as shot:
        assert shot.width <= page.viewport_size["width"] and shot.height <= TALLEST, shot.size
    return path


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_load_state("load")


def test_the_tour_pages_render_what_their_screenshots_show(web_app, server, tmp_path):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    chromium = _chromium()
    ids = _seed(web_app)
    folder = DOCS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    case_url = f"{server}/cases/{ids['case']}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        try:
            anonymous = browser.new_context(viewport={"width": 1280, "height": 760}).new_page()
            _open(anonymous, f"{server}/login")
            expect(anonymous.locator("input[name=email]")).to_be_visible()
            expect(anonymous.locator("input[name=password]")).to_be_visible()
            _picture(anonymous, folder, "login")

            page = signed_in_page(browser, server, "researcher@example.org", 1280, height=760)
            _open(page, f"{server}/cases/new")
            expect(page.locator("input[type=file][name=image]")).to_be_visible()
            expect(page.locator("select[name=reference_dx]")).to_be_visible()
            _picture(page, folder, "upload")

            _open(page, f"{server}/cases")
            expect(page.locator("#case-table tbody tr")).to_have_count(6)
            expect(page.locator("#case-table .mismatch")).not_to_have_count(
                0
            )  # a prediction differing from the reference
            assert page.eval_on_selector_all("#case-table img.thumb", "ts => ts.every(t => t.naturalWidth > 0)")
            _picture(page, folder, "case-list")

            _open(page, case_url)
            expect(page.locator("#results .top")).to_contain_text("melanoma")
            expect(page.locator("table.bars tr")).to_have_count(7)
            row = page.locator(".explanation-row:not([hidden])")
            expect(row.locator("figure")).to_have_count(3)  # original, Grad-CAM and SHAP side by side
            for overlay in (row.locator(".gradcam img.overlay"), row.locator(".shap img.overlay")):
                expect(overlay).to_be_visible()
                assert overlay.evaluate("i => i.complete && i.naturalWidth > 0")
            expect(page.locator(".colour-scale img")).to_have_count(2)
            expect(page.locator("#reviews")).to_contain_text("reviewer@example.org")
            _picture(page, folder, "case-page")

            _open(page, f"{server}/batches/{ids['batch']}")
            expect(page.locator("#count-done")).to_have_text("4")
            expect(page.locator("#count-total")).to_have_text("5")
            assert page.eval_on_selector("#batch-progress", "b => b.value < b.max && b.value > 0")
            _picture(page, folder, "batch-progress")

            _open(page, f"{server}/dashboard")
            expect(page.locator("#model-vs-reference")).to_be_visible()
            expect(page.locator("#dataset-n")).to_have_text("5")
            _picture(page, folder, "dashboard")

            _open(page, f"{server}/models?version={ids['version']}")
            expect(page.locator(f"#mv-{ids['version']}")).to_have_attribute("open", "")
            expect(page.locator(f"#mv-{ids['version']}")).to_contain_text("Intended use")
            _picture(page, folder, "model-card")

            _open(page, f"{server}/docs/api")
            expect(page.locator("#api-operations")).to_contain_text("POST /api/v1/cases")
            _picture(page, folder, "api-docs")

            reviewer = signed_in_page(browser, server, "reviewer@example.org", 1280, height=760)
            _open(reviewer, f"{server}/review/next")
            expect(reviewer.locator("#review-form")).to_be_visible()
            expect(reviewer.locator("#review-submit")).to_contain_text("Save review")
            _picture(reviewer, folder, "review")

            phone = signed_in_page(browser, server, "researcher@example.org", 375, height=760)
            _open(phone, f"{server}/cases")
            expect(phone.locator("#menu-toggle")).to_be_visible()
            _picture(phone, folder, "case-list-375")
            _open(phone, case_url)
            boxes = phone.locator(".explanation-row:not([hidden]) figure").evaluate_all(
                "fs => fs.map(f => f.getBoundingClientRect().right <= window.innerWidth)"
            )
            assert boxes == [True, True, True], boxes
            _picture(phone, folder, "case-page-375", part="#explanations")
        finally:
            browser.close()
    written = sorted(path.name for path in folder.glob("*.png"))
    assert len(written) == 11, written
