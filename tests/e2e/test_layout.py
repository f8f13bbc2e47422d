"""Every page at a phone's width (375 px) and a laptop's (1280 px), as each role sees it: no sideways
scrolling of the page (tables scroll inside their own box) and no serious or critical finding of
axe-core (vendored in tests/e2e/vendor/, MPL-2.0), run in Debian's Chromium through Playwright.

The portal runs for real (redis-server, the web app in an HTTP server thread); the cases are
uploaded through the app and their results written as the worker would, so no worker is needed.
One case carries the shipped model's real Grad-CAM and SHAP maps (tests/fixtures/maps), so the
side-by-side view and the colour bars are checked at both widths too.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
from e2e_support import ROOT, signed_in_page
from portal_helpers import IMAGES, PASSWORD, SMALL_IMAGES, csrf_from, image_bytes, login, make_user
from research_helpers import CLASSES, model_version
from test_browser import CHROMIUM_ARGS, _chromium, server  # noqa: F401  (the server fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]
AXE = Path(__file__).parent / "vendor" / "axe.min.js"
WIDTHS = (375, 1280)
BLOCKING = ("serious", "critical")
ROLES = ("admin", "researcher", "reviewer")
SHOTS = os.environ.get("LAYOUT_SCREENSHOTS")
MAPS = ROOT / "tests" / "fixtures" / "maps"


def seed_maps(app, case_id: int, mv_id: int) -> None:
    """The shipped model's real maps of ISIC_0025964 (tests/fixtures/maps, made by its make_maps.py)
    stored for the case's analysis by `mv_id` as worker.explain.store_explanation leaves them: the
    raw map and its colour layer under the row's keys, status done. The version gets the shipped
    manifest and the analysis that model's probabilities, so page and maps tell one story."""
    from webapp.cases.explanations import explanation_keys
    from webapp.db import db
    from webapp.models import Analysis, Explanation, Image, ModelVersion, utcnow
    from webapp.storage import storage_from_settings

    summary = json.loads((MAPS / "summary.json").read_text())
    storage = storage_from_settings(app.extensions["settings"])
    with app.app_context():
        image = db.session.scalar(db.select(Image).where(Image.case_id == case_id))
        assert image.original_filename == summary["image"], "the maps belong to another image"
        mv = db.session.get(ModelVersion, mv_id)
        mv.manifest = json.loads((ROOT / "models" / "default" / "manifest.json").read_text())
        mv.trained_on = mv.manifest["trained_on"]
        analysis = db.session.scalar(
            db.select(Analysis).where(Analysis.image_id == image.id, Analysis.model_version_id == mv_id)
        )
        analysis.probabilities, analysis.top_class = summary["probabilities"], summary["top_class"]
        for method in ("gradcam", "shap"):
            raw_key, overlay_key = explanation_keys(image.content_hash, mv_id, method, summary["top_class"])
            storage.save(raw_key, (MAPS / f"{method}.npy").read_bytes())
            storage.save(overlay_key, (MAPS / f"{method}.png").read_bytes())
            db.session.add(
                Explanation(
                    analysis=analysis,
                    image=image,
                    model_version_id=mv_id,
                    method=method,
                    class_name=summary["top_class"],
                    status="done",
                    raw_key=raw_key,
                    overlay_key=overlay_key,
                    params=summary[method],
                    attempts=1,
                    finished_at=utcnow(),
                )
            )
        db.session.commit()


def _seed(app) -> dict[str, int]:
    """Three uploaded cases (one with results of two model versions and two reviews), a batch."""
    from webapp.db import db
    from webapp.models import Analysis, Batch, Image, ModelVersion, Review, User, utcnow

    for role in ROLES:
        make_user(app, f"{role}@example.org", role=role)
    client = app.test_client()
    login(client, "admin@example.org")
    ids = []
    for name in SMALL_IMAGES[:3]:
        form = client.get("/cases/new").get_data(as_text=True)
        body = {"csrf_token": csrf_from(form), "image": (io.BytesIO(image_bytes(name)), name), "age": "55"}
        response = client.post("/cases/new", data=body, content_type="multipart/form-data")
        assert response.status_code == 302, response.get_data(as_text=True)[:500]
        ids.append(int(response.headers["Location"].rsplit("/", 1)[1]))
    old = model_version(app, version="2026.11.0", trained=True)
    new = model_version(app, version="2026.12.01", trained=True)
    with app.app_context():
        # The shipped model's card (wide tables, long lines) is rendered on /models.
        db.session.get(ModelVersion, new).artifact_path = str(ROOT / "models" / "default")
        for case_id in ids:
            image = db.session.scalar(db.select(Image).where(Image.case_id == case_id))
            for mv, top in ((old, "nv"), (new, "mel")):
                probs = {c: (0.64 if c == top else 0.06) for c in CLASSES}
                db.session.add(
                    Analysis(
                        image_id=image.id,
                        model_version_id=mv,
                        status="succeeded",
                        top_class=top,
                        probabilities=probs,
                        finished_at=utcnow(),
                    )
                )
            image.case.reference_dx = "mel"
            image.jobs[0].status = "succeeded"
        users = {u.email: u.id for u in db.session.scalars(db.select(User))}
        for email, dx in (("admin@example.org", "mel"), ("reviewer@example.org", "nv")):
            db.session.add(
                Review(case_id=ids[0], reviewer_id=users[email], diagnosis=dx, confidence=3, notes="it's atypical")
            )
        batch = Batch(name="layout batch", source="browser", created_by_id=users["admin@example.org"])
        db.session.add(batch)
        db.session.commit()
        batch_id = batch.id
    seed_maps(app, ids[0], new)
    return {"case": ids[0], "batch": batch_id, "card": new}


def _pages(role: str, ids: dict[str, int]) -> list[str]:
    common = [
        "/cases",
        f"/cases/{ids['case']}",
        "/batches",
        f"/batches/{ids['batch']}",
        "/dashboard",
        f"/models?version={ids['card']}",
        "/docs/api",
        "/account/password",
        "/cases/999999",
    ]
    if role == "admin":
        return common + ["/cases/new", "/batches/new", f"/cases/{ids['case']}/review", "/admin", "/admin/audit"]
    if role == "reviewer":
        return common + [f"/cases/{ids['case']}/review", f"/review/next?batch={ids['batch']}"]
    return common + ["/cases/new", "/batches/new"]


def _check(page, url: str, width: int) -> list[str]:
    """What is wrong with the page at this width: overflow, and axe's serious or critical findings."""
    problems = []
    scroll, inner = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    if scroll > inner:
        wide = page.evaluate(
            """() => [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 1
                 && !e.closest('.table-scroll')).slice(0, 3).map(e => e.tagName + '.' + e.className + '#' + e.id)"""
        )
        problems.append(f"{url} at {width} px: the page is {scroll} px wide ({', '.join(wide)})")
    page.add_script_tag(path=str(AXE))
    violations = page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ['violations']})).violations.map(v => ({
             id: v.id, impact: v.impact, nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))"""
    )
    for v in violations:
        if v["impact"] in BLOCKING:
            problems.append(f"{url} at {width} px: axe {v['impact']} {v['id']} on {v['nodes']}")
    return problems


def _maps_problems(page, url: str, width: int) -> list[str]:
    """The case page's side-by-side view (original, Grad-CAM, SHAP) and its two colour bars: every
    picture loaded and within the window."""
    shown = page.evaluate(
        """() => { const row = document.querySelector('.explanation-row:not([hidden])');
             const fits = e => e.getBoundingClientRect().right <= window.innerWidth + 1;
             const loaded = i => i.complete && i.naturalWidth > 0;
             return {figures: row ? [...row.querySelectorAll('figure')].map(fits) : [],
                     overlays: row ? [...row.querySelectorAll('img.overlay')].map(loaded) : [],
                     bars: [...document.querySelectorAll('.colour-scale img')].map(i => loaded(i) && fits(i))}; }"""
    )
    wanted = {"figures": 3, "overlays": 2, "bars": 2}
    return [
        f"{url} at {width} px: {name} {shown[name]} (want {n}, each shown and within the window)"
        for name, n in wanted.items()
        if shown[name] != [True] * n
    ]


def test_every_page_fits_both_widths_and_passes_axe(web_app, server):  # noqa: F811
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    ids = _seed(web_app)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        try:
            for width in WIDTHS:
                # bypass_csp: axe is added as a script the page's policy (scripts from files only) would refuse.
                anonymous = browser.new_context(viewport={"width": width, "height": 800}, bypass_csp=True).new_page()
                anonymous.goto(f"{server}/login")
                problems += _check(anonymous, "/login", width)
                for role in ROLES:
                    context = browser.new_context(viewport={"width": width, "height": 800}, bypass_csp=True)
                    page = context.new_page()
                    page.set_default_timeout(30_000)
                    page.goto(f"{server}/login")
                    page.fill("input[name=email]", f"{role}@example.org")
                    page.fill("input[name=password]", PASSWORD)
                    page.click("button[type=submit]")
                    page.wait_for_url("**/cases")
                    for url in _pages(role, ids):
                        page.goto(f"{server}{url}")
                        page.wait_for_load_state("load")
                        if SHOTS:  # LAYOUT_SCREENSHOTS=folder: every page as checked, to look at
                            slug = url.strip("/").replace("/", "-").replace("?", "-").replace("=", "-") or "home"
                            page.screenshot(path=str(Path(SHOTS) / f"{role}-{width}-{slug}.png"), full_page=True)
                        problems += [f"{role}: {p}" for p in _check(page, url, width)]
                        if url == f"/cases/{ids['case']}":
                            problems += [f"{role}: {p}" for p in _maps_problems(page, url, width)]
                    context.close()
        finally:
            browser.close()
    assert not problems, "\n".join(problems)


def test_narrow_menu_collapses_and_opens_with_its_button(web_app, server):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    chromium = _chromium()
    make_user(web_app, "lead@example.org", role="admin")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 375, "height": 800})
            page.goto(f"{server}/login")
            page.fill("input[name=email]", "lead@example.org")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url("**/cases")
            page.wait_for_load_state("load")
            toggle, logout = page.locator("#menu-toggle"), page.get_by_role("button", name="Log out")
            expect(toggle).to_be_visible()
            expect(toggle).to_have_attribute("aria-expanded", "false")
            expect(logout).to_be_hidden()
            expect(page.locator("#filter-toggle")).not_to_have_attribute("open", "")
            toggle.click()
            expect(toggle).to_have_attribute("aria-expanded", "true")
            expect(logout).to_be_visible()
            box = logout.bounding_box()
            assert box and box["x"] + box["width"] <= 375
            page.set_viewport_size({"width": 1280, "height": 800})
            expect(toggle).to_be_hidden()
            expect(page.get_by_role("link", name="Dashboard")).to_be_visible()
        finally:
            browser.close()


def test_folder_upload_lists_bad_rows_once_and_skipped_files(web_app, server, tmp_path):  # noqa: F811
    """batch.js: a bad CSV's rows in one table (not also in the message); a .txt beside the images
    is listed on the batch page as skipped, not dropped silently."""
    import shutil

    from playwright.sync_api import expect, sync_playwright

    chromium = _chromium()
    make_user(web_app, "lead@example.org", role="admin")
    folder = tmp_path / "lesions"
    folder.mkdir()
    shutil.copy(IMAGES / SMALL_IMAGES[0], folder / SMALL_IMAGES[0])
    (folder / "notes.txt").write_text("taken with the old dermatoscope")
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "image_id,lesion_id,dx,dx_type,age,sex,localization\nISIC_1,HAM_1,mel,histo,40,martian,back\n"
        "ISIC_2,HAM_2,mel,histo,40,male,moon\n"
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        try:
            page = signed_in_page(browser, server, "lead@example.org")
            page.goto(f"{server}/batches/new")
            page.wait_for_load_state("load")
            page.set_input_files("#folder-input", str(folder))
            page.set_input_files("#metadata-input", str(bad))
            page.click("#batch-submit")
            expect(page.locator("#csv-errors tbody tr")).to_have_count(2)
            expect(page.locator("#upload-text")).to_contain_text("2 invalid row(s)")
            assert "martian" not in page.locator("#upload-text").inner_text()
            assert page.locator("body").inner_text().count("martian") == 1

            page.goto(f"{server}/batches/new")
            page.wait_for_load_state("load")
            page.set_input_files("#folder-input", str(folder))
            page.click("#batch-submit")
            page.wait_for_url(re.compile(r"/batches/\d+$"), timeout=60_000)
            expect(page.locator("#batch-errors")).to_contain_text("notes.txt")
            expect(page.locator("#batch-errors")).to_contain_text("Skipped: not a .jpg, .jpeg or .png file.")
        finally:
            browser.close()


def test_key_hint_colours_and_the_model_name_on_one_line(web_app, server):  # noqa: F811
    """The "Enter" hint on the review button was white on a light grey key cap; the case list wrapped
    the model's name over three lines."""
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    ids = _seed(web_app)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        try:
            page = signed_in_page(browser, server, "reviewer@example.org")
            page.goto(f"{server}/cases/{ids['case']}/review")
            colours = page.eval_on_selector(
                "#review-submit kbd",
                """k => { const s = getComputedStyle(k), b = getComputedStyle(k.closest('button'));
                           return [s.color, s.backgroundColor, b.color, b.backgroundColor]; }""",
            )
            kbd_colour, kbd_background, button_colour, button_background = colours
            assert kbd_colour == button_colour and kbd_background == "rgba(0, 0, 0, 0)", colours
            assert button_background != button_colour
            for width in (1280, 375):
                page.set_viewport_size({"width": width, "height": 800})
                page.goto(f"{server}/cases")
                lines = page.eval_on_selector_all(".model-name", "spans => spans.map(s => s.getClientRects().length)")
                assert lines and set(lines) == {1}, (width, lines)
        finally:
            browser.close()


def test_skip_link_comes_first_and_focus_is_clearly_visible(web_app, server):  # noqa: F811
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    make_user(web_app, "lead@example.org", role="admin")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        try:
            page = signed_in_page(browser, server, "lead@example.org")
            page.keyboard.press("Tab")
            focused = page.evaluate(
                """() => { const e = document.activeElement, s = getComputedStyle(e), r = e.getBoundingClientRect();
                           return [e.className, e.textContent, s.outlineStyle, parseFloat(s.outlineWidth), r.top]; }"""
            )
            name, text, style, width, top = focused
            assert name == "skip-link" and text == "Skip to the content" and top >= 0, focused
            assert style == "solid" and width >= 2, focused  # the faint default ring was the finding
            page.keyboard.press("Enter")
            assert page.evaluate("document.activeElement.id") == "main"
            page.keyboard.press("Tab")
            ring = page.evaluate("() => getComputedStyle(document.activeElement).outlineWidth")
            assert float(ring.rstrip("px")) >= 2, ring
        finally:
            browser.close()
