"""The browser workflow: Chromium (Playwright) against the real portal pieces.

A real redis-server, a real Celery worker (untrained model, 64x64 input) and the web app served by a
real HTTP server thread. The browser logs in, uploads a folder of images with a HAM10000 metadata
CSV through the folder picker (sent in chunks by static/batch.js), waits for the batch's progress bar
to finish, opens a case and records a review with the keyboard shortcuts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from e2e_support import ROOT, celery_worker_argv, free_port
from portal_helpers import IMAGES, PASSWORD, SMALL_IMAGES, make_user, missing_part

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
CSV = (
    "image_id,lesion_id,dx,dx_type,age,sex,localization\n"
    f"{SMALL_IMAGES[0][:-4]},HAM_0000001,mel,histo,55,male,back\n"
    f"{SMALL_IMAGES[1][:-4]},HAM_0000002,nv,follow_up,35,female,face\n"
)


def _chromium() -> Path:
    if not CHROMIUM.exists():
        script = ROOT / "scripts" / "install_system_deps.sh"
        subprocess.run(["bash", str(script)], capture_output=True, timeout=900)
    if not CHROMIUM.exists():
        missing_part(
            "/usr/bin/chromium is missing and scripts/install_system_deps.sh could not install it "
            "(needs root and the Debian package mirror)"
        )
    return CHROMIUM


@pytest.fixture
def server(web_app):
    from werkzeug.serving import make_server

    port = free_port()
    httpd = make_server("127.0.0.1", port, web_app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    httpd.shutdown()
    thread.join(10)


def test_folder_upload_progress_and_review_in_chromium(web_app, server, start_worker, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    chromium = _chromium()
    worker = start_worker(celery_worker_argv("browser"))
    make_user(web_app, "lead@example.org", role="admin")
    folder = tmp_path / "lesions"
    folder.mkdir()
    for name in SMALL_IMAGES:
        shutil.copy(IMAGES / name, folder / name)
    metadata = tmp_path / "HAM10000_metadata.csv"
    metadata.write_text(CSV)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{server}/batches/new")
            page.fill("input[name=email]", "lead@example.org")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url("**/batches/new")

            page.set_input_files("#folder-input", str(folder))
            page.set_input_files("#metadata-input", str(metadata))
            page.click("#batch-submit")
            page.wait_for_url("**/batches/*", timeout=60_000)
            try:
                expect(page.locator("#batch-finished")).to_have_text("Finished", timeout=400_000)
            except AssertionError:
                pytest.fail(f"The batch did not finish. Worker log:\n{worker.tail()}")
            assert page.locator("#count-done").inner_text() == str(len(SMALL_IMAGES))
            assert page.locator("#count-failed").inner_text() == "0"
            assert page.eval_on_selector("#batch-progress", "b => b.value === b.max")

            page.click("#batch-cases")
            expect(page.locator("#case-count")).to_contain_text(f"{len(SMALL_IMAGES)} cases")
            page.goto(f"{server}/cases?reference=mel")
            page.click("#case-table tbody tr:first-child a")
            expect(page.locator("#reference-dx")).to_have_text("mel")
            expect(page.locator("#results")).to_contain_text("Untrained model — not a diagnosis")
            expect(page.locator(".disclaimer").first).to_contain_text("Research use only")

            page.click("#review-link")
            page.wait_for_url("**/review")
            page.wait_for_load_state("load")  # review.js (deferred) listens for the keys
            page.keyboard.press("5")  # mel
            page.keyboard.press("a")  # agrees with the model
            expect(page.locator("input[name=diagnosis][value=mel]")).to_be_checked()
            expect(page.locator("input[name=agrees_with_model][value=agree]")).to_be_checked()
            page.fill("#notes", "pigment network atypical")
            page.evaluate("document.activeElement.blur()")  # leave the notes field, so that Enter submits
            page.keyboard.press("Enter")
            page.wait_for_url(re.compile(r"/cases/\d+$"))
            expect(page.locator("#reviews")).to_contain_text("lead@example.org")
            expect(page.locator("#reviews")).to_contain_text("mel")
            expect(page.locator("#history")).to_contain_text("review.create")
        finally:
            browser.close()
