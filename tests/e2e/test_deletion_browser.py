"""Deleting a case from its page in Chromium (Playwright): the form's own checks, the confirmation,
and the case gone from the list, its page and the stored files. Real redis-server, migrated SQLite."""

from __future__ import annotations

import io

import pytest
from portal_helpers import PASSWORD, SMALL_IMAGES, image_bytes, make_token, make_user
from test_browser import CHROMIUM_ARGS, _chromium, server  # noqa: F401  (server: a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def test_admin_deletes_a_case_from_its_page_in_chromium(web_app, server):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    from webapp.storage import storage_from_settings

    chromium = _chromium()
    make_user(web_app, "lead@example.org", role="admin")
    headers = {"Authorization": f"Bearer {make_token(web_app, 'lead@example.org')}"}
    upload = {"image": (io.BytesIO(image_bytes(SMALL_IMAGES[0])), "withdrawn.jpg"), "lesion_ref": "LES-77"}
    case = web_app.test_client().post("/api/v1/cases", data=upload, headers=headers).json
    url = web_app.test_client().get(case["url"], headers=headers).json["images"][0]["url"]
    key = url.removeprefix("/files/")
    storage = storage_from_settings(web_app.extensions["settings"])
    assert storage.exists(key)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{server}/cases/{case['id']}")
            page.fill("input[name=email]", "lead@example.org")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"**/cases/{case['id']}")

            page.click("#delete summary")
            page.fill("#delete-form input[name=reason]", "consent withdrawn")
            page.click("#delete-button")  # the box is not ticked: the browser does not send the form
            assert page.url.endswith(f"/cases/{case['id']}")
            page.check("#delete-form input[name=confirm]")
            page.click("#delete-button")
            page.wait_for_url("**/cases")
            expect(page.locator("body")).to_contain_text(f"Case #{case['id']} was deleted")
            expect(page.locator("body")).not_to_contain_text("LES-77")
            assert page.goto(f"{server}/cases/{case['id']}").status == 404
        finally:
            browser.close()
    assert not storage.exists(key)
