"""scripts/run_portal.py: the supervisor stops every child (and grandchild) it started, and the
ready banner comes only once the worker analyses an upload at once."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from portal_helpers import SMALL_IMAGES, image_bytes, make_token

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "Ready: the worker has loaded and warmed the model"
FIRST_UPLOAD_LIMIT_S = 10.0


@pytest.fixture(scope="module")
def launcher():
    spec = importlib.util.spec_from_file_location("run_portal", ROOT / "scripts" / "run_portal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead for our purposes
        return f.read().split()[2] != "Z"


def test_stop_all_ends_children_and_their_children(launcher, tmp_path):
    sup = launcher.Supervisor()
    pidfile = tmp_path / "grandchild.pid"
    # A child that starts a grandchild (like Celery's pool) and ignores nothing.
    script = f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    child = sup.start("worker", [sys.executable, "-c", script], dict(os.environ))
    stubborn = sup.start(
        "web",
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"],
        dict(os.environ),
    )
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    sup.check()
    launcher.STOP_TIMEOUT["web"] = 1  # SIGTERM is ignored: it gets SIGKILL after this
    started = time.monotonic()
    sup.stop_all()
    assert time.monotonic() - started < 8
    for pid in (child.pid, stubborn.pid, grandchild):
        deadline = time.monotonic() + 3
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), pid


def test_check_reports_a_dead_child(launcher):
    sup = launcher.Supervisor()
    proc = sup.start("redis", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
    proc.wait(10)
    with pytest.raises(RuntimeError, match="redis process exited unexpectedly"):
        sup.check()
    sup.stop_all()


def test_free_port(launcher):
    port = launcher.free_port()
    assert launcher.port_free("127.0.0.1", port)


def test_a_restartable_child_is_started_again_with_a_limit(launcher, monkeypatch, tmp_path):
    monkeypatch.setattr(launcher, "RESTART_BACKOFF", (0.0,))
    monkeypatch.setattr(launcher, "RESTART_LIMIT", 2)
    sup = launcher.Supervisor()
    counter = tmp_path / "starts"
    script = f"open({str(counter)!r}, 'a').write('x'); raise SystemExit(1)"
    sup.start("worker", [sys.executable, "-c", script], dict(os.environ), restart=True)
    try:
        deadline = time.monotonic() + 30
        with pytest.raises(RuntimeError, match="worker process exited .* after 2 restarts"):
            while time.monotonic() < deadline:
                sup.check()
                time.sleep(0.05)
        assert counter.read_text() == "xxx"  # the first start and two restarts
    finally:
        sup.stop_all()


# --- make run: ready means ready -------------------------------------------------------------------------


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"the launcher exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout:.0f} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


@pytest.fixture
def portal(launcher, tmp_path, monkeypatch):
    """scripts/run_portal.py as `make run` starts it (its own redis-server, Celery worker, gunicorn)
    with the shipped model and a fresh instance folder; yields (base url, environment, log file)."""
    port = launcher.free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "PORTAL_ENV")}
    env.update(
        INSTANCE_DIR=str(tmp_path / "instance"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'instance' / 'portal.db'}",
        STORAGE_DIR=str(tmp_path / "storage"),
        MODEL_DIR=str(ROOT / "models" / "default"),  # read only
        REDIS_PORT=str(launcher.free_port()),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    log = tmp_path / "portal.log"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "run_portal.py"), "--port", str(port), "--web-workers", "1"],
        cwd=ROOT,
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", env, log, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the launcher stops its children itself
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_first_upload_after_the_ready_banner_is_analysed_within_10_s(portal, monkeypatch):
    base, env, log, proc = portal
    wait_for_line(log, READY_LINE, proc, timeout=900)
    text = log.read_text()
    assert text.index("waiting for the worker to load and warm") < text.index(READY_LINE)

    for key in ("INSTANCE_DIR", "DATABASE_URL", "STORAGE_DIR", "MODEL_DIR"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("PORTAL_ENV", "development")
    from webapp import create_app

    token = make_token(create_app(), "admin@localhost")  # the launcher's first admin
    headers = {"Authorization": f"Bearer {token}"}

    started = time.monotonic()
    response = requests.post(
        f"{base}/api/v1/cases",
        files={"image": (SMALL_IMAGES[0], image_bytes(SMALL_IMAGES[0]), "image/jpeg")},
        headers=headers,
        timeout=10,
    )
    assert response.status_code == 202, response.text
    case_url = base + response.json()["url"]
    while True:
        body = requests.get(case_url, headers=headers, timeout=10).json()
        elapsed = time.monotonic() - started
        if body["status"] in ("succeeded", "failed") or elapsed > 60:
            break
        time.sleep(0.1)
    assert body["status"] == "succeeded", (body, log.read_text()[-4000:])
    assert elapsed <= FIRST_UPLOAD_LIMIT_S, f"the first upload took {elapsed:.1f} s after the banner"
    print(f"first upload after the banner analysed in {elapsed:.2f} s")
