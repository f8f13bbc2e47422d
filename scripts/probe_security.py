"""Measures the figures of issue 14's probe on this machine (a temporary portal; no network):

    .venv/bin/python scripts/probe_security.py

- failed login: milliseconds for an existing account and for an unknown one (median of 7);
- /api/v1/health: the first call of a process, then the median of 20 later ones, with a worker
  ping that takes 1 s (stubbed: no worker runs here);
- an explanation map of a 6000x6000 upload: bytes stored (raw .npy and overlay PNG).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYTEST_CURRENT_TEST", "scripts/probe_security.py")  # PORTAL_ENV=testing is for tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from webapp import create_app  # noqa: E402
from webapp.db import db  # noqa: E402
from webapp.models import User  # noqa: E402


def _median_ms(call, runs: int) -> float:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="probe-"))
    app = create_app(
        {"TESTING": True, "CSRF_ENABLED": False, "INSTANCE_DIR": tmp, "REDIS_URL": "redis://127.0.0.1:1/0"}
    )
    app.config.update(LOGIN_RATE_LIMIT="1000 per minute", LOGIN_ADDRESS_RATE_LIMIT="1000 per minute")
    with app.app_context():
        db.create_all()
        user = User(email="known@example.org", role="researcher")
        user.set_password("a long enough passphrase")
        db.session.add(user)
        db.session.commit()
    client = app.test_client()
    timings: dict[str, list[float]] = {"known": [], "unknown": []}
    for _ in range(7):  # interleaved, so that the machine's load touches both alike
        for name in timings:
            login = {"email": f"{name}@example.org", "password": "wrong guess"}
            timings[name].append(_median_ms(lambda data=login: client.post("/login", data=data), 1))
    for name, ms in timings.items():
        print(f"failed login, {name} account: {statistics.median(ms):.0f} ms (median of 7)")

    import webapp.api.status as status

    status.broker_status = lambda app: {"ok": True}
    status.worker_status = lambda app, timeout: time.sleep(1.0) or {"ok": True, "workers": ["w@host"]}
    first = _median_ms(lambda: client.get("/api/v1/health"), 1)
    later = _median_ms(lambda: client.get("/api/v1/health"), 20)
    print(f"health: first call {first:.0f} ms, later calls {later:.1f} ms (worker ping 1 s)")

    from worker.explain import gradcam_layer_png, npy_bytes, stored_map

    stored = stored_map(np.random.default_rng(0).random((6000, 6000), dtype=np.float32), (120, 160))
    print(
        f"map of a 6000x6000 upload: {len(npy_bytes(stored)) / 1024:.1f} KB raw + "
        f"{len(gradcam_layer_png(stored)) / 1024:.1f} KB overlay (was {6000 * 6000 * 4 / 1e6:.0f} MB raw)"
    )


if __name__ == "__main__":
    main()
