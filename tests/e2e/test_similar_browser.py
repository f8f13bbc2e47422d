"""The case page's similar cases and out-of-distribution warning in Debian's Chromium, at a phone's
width (375 px) and a laptop's (1280 px): every thumbnail loaded and within the window, each
neighbour's label and where it comes from, the same-lesion mark, the warning with the top class
marked unreliable; no sideways scrolling and no serious or critical axe finding.

The portal runs for real (redis-server, the web app in an HTTP server thread); the images are
uploaded through the app, and their analyses (embedding and verdict included) written as the
worker stores them, so no model runs.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from e2e_support import signed_in_page
from portal_helpers import SMALL_IMAGES, csrf_from, image_bytes, login, make_user
from research_helpers import CLASSES, model_version
from test_browser import CHROMIUM_ARGS, _chromium, server  # noqa: F401  (the server fixture)
from test_layout import WIDTHS, _check

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]
THRESHOLD = 0.55


def _upload(app, client) -> list[int]:
    ids = []
    for name in SMALL_IMAGES:
        form = client.get("/cases/new").get_data(as_text=True)
        body = {"csrf_token": csrf_from(form), "image": (io.BytesIO(image_bytes(name)), name)}
        response = client.post("/cases/new", data=body, content_type="multipart/form-data")
        assert response.status_code == 302, response.get_data(as_text=True)[:500]
        ids.append(int(response.headers["Location"].rsplit("/", 1)[1]))
    return ids


def _seed(app) -> dict[str, int]:
    """Four uploaded cases with the analyses the worker would store: a flagged query and three
    neighbours labelled by review consensus, by the reference diagnosis (the query's lesion) and
    not at all; returns their ids by role."""
    from webapp.db import db
    from webapp.models import Analysis, Case, Image, ModelVersion, Review, User, utcnow

    make_user(app, "lead@example.org", role="admin")
    make_user(app, "second@example.org", role="reviewer")
    client = app.test_client()
    login(client, "lead@example.org")
    ids = dict(zip(("query", "twin", "reviewed", "unlabelled"), _upload(app, client)))
    mv = model_version(app, version="2026.12.01", trained=True)
    angles = {"query": 0.0, "twin": 0.2, "reviewed": 0.6, "unlabelled": 1.2}
    with app.app_context():
        version = db.session.get(ModelVersion, mv)
        version.manifest = {**version.manifest, "ood": {"threshold": THRESHOLD}}
        for role, case_id in ids.items():
            image = db.session.scalar(db.select(Image).where(Image.case_id == case_id))
            vector = np.zeros(8, np.float32)
            vector[:2] = np.cos(angles[role]), np.sin(angles[role])
            flagged = role == "query"
            db.session.add(
                Analysis(
                    image_id=image.id,
                    model_version_id=mv,
                    status="succeeded",
                    top_class="bcc",
                    probabilities={c: (0.63 if c == "bcc" else 0.37 / 6) for c in CLASSES},
                    embedding=vector.astype("<f2").tobytes(),
                    ood_score=0.93 if flagged else 0.12,
                    ood_flagged=flagged,
                    finished_at=utcnow(),
                )
            )
            image.jobs[0].status = "succeeded"
        db.session.get(Case, ids["query"]).lesion_ref = "HAM_0000118"
        twin = db.session.get(Case, ids["twin"])
        twin.lesion_ref, twin.reference_dx = "HAM_0000118", "nv"
        users = {u.email: u.id for u in db.session.scalars(db.select(User))}
        for email in users:  # two reviewers agree: their consensus is the label
            db.session.add(Review(case_id=ids["reviewed"], reviewer_id=users[email], diagnosis="mel", confidence=3))
        db.session.commit()
    return ids


def _similar_section(page) -> dict:
    return page.evaluate(
        """() => { const fits = e => e.getBoundingClientRect().right <= window.innerWidth + 1;
             const items = [...document.querySelectorAll('.similar-cases li')];
             const top = document.querySelector('p.top');
             const warning = document.querySelector('#ood-warning');
             return {items: items.map(li => ({text: li.innerText.replace(/\\s+/g, ' ').trim(),
                                               href: li.querySelector('a').getAttribute('href'),
                                               image: (i => i.complete && i.naturalWidth > 0 && fits(i))(li.querySelector('img'))})),
                     warning: warning ? warning.innerText : null,
                     warningShown: !!warning && warning.getBoundingClientRect().height > 0 && fits(warning),
                     top: top ? top.innerText : null}; }"""
    )


def test_the_case_page_shows_similar_cases_and_the_warning_at_both_widths(web_app, server):  # noqa: F811
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    ids = _seed(web_app)
    url = f"/cases/{ids['query']}"
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        try:
            for width in WIDTHS:
                # bypass_csp: axe is added as a script the page's policy (scripts from files only) would refuse.
                page = signed_in_page(browser, server, "lead@example.org", width, bypass_csp=True)
                page.goto(f"{server}{url}")
                page.wait_for_load_state("load")
                page.locator(".similar-cases img").last.scroll_into_view_if_needed()  # lazy thumbnails load
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.similar-cases img')].every(i => i.complete && i.naturalWidth > 0)"
                )
                shown = _similar_section(page)
                items = shown["items"]
                # Nearest first, the query's own case never listed.
                expected = [f"/cases/{ids[r]}" for r in ("twin", "reviewed", "unlabelled")]
                assert [i["href"] for i in items] == expected, (width, items)
                assert all(i["image"] for i in items), (width, items)
                twin, reviewed, unlabelled = (i["text"] for i in items)
                assert "nv (reference diagnosis)" in twin and "same lesion" in twin, twin
                assert "mel (review consensus)" in reviewed and "same lesion" not in reviewed, reviewed
                assert "no diagnosis" in unlabelled and "same lesion" not in unlabelled, unlabelled
                assert shown["warningShown"] and "does not look like dermoscopy" in shown["warning"], shown
                assert "bcc" in shown["top"] and "unreliable" in shown["top"], shown["top"]
                problems += _check(page, url, width)
                page.context.close()
        finally:
            browser.close()
    assert not problems, "\n".join(problems)
