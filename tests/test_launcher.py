"""scripts/run_portal.py: the supervisor stops every child (and grandchild) it started."""

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
