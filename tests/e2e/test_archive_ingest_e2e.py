"""A zip through the API, decoded by a real Celery worker (ingest queue) and analysed (predict queue).

The web side runs in-process against the same SQLite file, storage folder and real redis-server as
the worker subprocess; the archive's entries travel as the stored archive and one task message.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from e2e_support import celery_worker_argv, wait_for
from portal_helpers import SMALL_IMAGES, image_bytes, make_token, make_user
from research_helpers import zip_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]
WORKER_WAIT = 300  # TensorFlow import + model build + first predictions on a busy 2-core box


def test_a_zip_is_decoded_by_the_worker_and_its_cases_analysed(web_app, start_worker, portal_env):
    app = web_app
    make_user(app, "zip@example.org", role="researcher")
    headers = {"Authorization": f"Bearer {make_token(app, 'zip@example.org')}"}
    client = app.test_client()
    entries = {
        "z/one.jpg": image_bytes(SMALL_IMAGES[0]),
        "z/two.jpg": image_bytes(SMALL_IMAGES[1]),
        "z/one-again.jpg": image_bytes(SMALL_IMAGES[0]),
        "z/notes.txt": b"not an image",
    }
    started = time.process_time()
    response = client.post(
        "/api/v1/batches", headers=headers, data={"archive": (io.BytesIO(zip_bytes(entries)), "z.zip")}
    )
    web_cpu = time.process_time() - started
    assert response.status_code == 202 and response.json["pending"] == 3, response.json
    archive = Path(portal_env["STORAGE_DIR"]) / "archives" / f"batch-{response.json['id']}.zip"
    assert archive.exists()  # the worker is not started yet: the archive and its items wait

    worker = start_worker(celery_worker_argv("zip"))

    def finished():
        body = client.get(response.json["url"], headers=headers).json
        return body if body["finished"] else None

    progress = wait_for(finished, WORKER_WAIT, worker, "the archive's cases analysed")
    assert progress["counts"] == {"pending": 0, "queued": 0, "running": 0, "done": 3, "failed": 1}, worker.tail()
    assert len(progress["case_ids"]) == 2 and progress["duplicates"] == 1
    assert progress["errors"][0]["file"] == "z/notes.txt"
    assert not archive.exists()
    assert web_cpu < 1.0
