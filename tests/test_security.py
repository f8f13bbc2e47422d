# ruff: noqa: F811  (pytest fixtures imported from test_explanations are parameters below)
"""Access control on every route and stored file, cookies, security headers, login rate limiting,
and no secrets in the repository."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import pytest
from portal_helpers import PASSWORD, SMALL_IMAGES, csrf_from, image_bytes, login, make_token, make_user, missing_part
from research_helpers import run_sent_ingests
from test_explanations import case_id, sent, token  # noqa: F401  (fixtures: a case with stored maps)

from webapp.db import db

ROOT = Path(__file__).resolve().parent.parent
# Routes anyone may reach: the login form, static assets, and the health probe (no data in it).
PUBLIC_ENDPOINTS = {"auth.login", "static", "api.health", "cases.home"}


def _fill(rule) -> str:
    """A URL for the rule with made-up values for its arguments."""
    url = rule.rule
    for arg in rule.arguments:
        converter = rule._converters[arg].__class__.__name__
        value = (
            "1"
            if converter in ("IntegerConverter", "NumberConverter")
            else "images/ab/cd/" + "ab" * 32 + ".png"
            if converter == "PathConverter"
            else "1"
        )
        url = re.sub(r"<(?:[^<>:]+:)?" + re.escape(arg) + r">", value, url)
    return url


def test_every_route_needs_a_session_or_token(app, client):
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PUBLIC_ENDPOINTS:
            continue
        url = _fill(rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = client.open(url, method=method)
            location = response.headers.get("Location", "")
            refused = (
                response.status_code in (401, 403)
                or (response.status_code == 302 and "/login" in location)
                or (method != "GET" and response.status_code == 400 and not url.startswith("/api/"))
            )  # CSRF
            assert refused, f"{method} {url} ({rule.endpoint}) answered {response.status_code} without a login"
            checked += 1
    assert checked >= 8


def test_stored_files_need_a_session(app, client, auth_headers, sent_tasks):
    response = client.post(
        "/api/v1/cases", headers=auth_headers, data={"image": (io.BytesIO(image_bytes(SMALL_IMAGES[0])), "x.jpg")}
    )
    assert response.status_code == 202
    h = client.get(response.json["url"], headers=auth_headers).json["images"][0]["content_hash"]
    url = f"/files/images/{h[:2]}/{h[2:4]}/{h}.jpg"  # the key is guessable from the hash: it must not be enough
    anonymous = app.test_client().get(url)
    assert anonymous.status_code in (302, 401, 403) and b"\xff\xd8\xff" not in anonymous.data
    login(client, "researcher@example.org")
    stored = client.get(url)
    assert stored.data.startswith(b"\xff\xd8\xff") and stored.mimetype == "image/jpeg"


def test_security_headers_on_pages_and_api(client):
    for url in ("/login", "/api/v1/health", "/api/v1/cases/1", "/no-such-page"):
        headers = client.get(url).headers
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "same-origin"


def test_templates_have_no_inline_scripts():
    for path in (ROOT / "templates").rglob("*.html"):
        html = path.read_text()
        for match in re.finditer(r"<script\b([^>]*)>(.*?)</script>", html, re.S):
            assert "src=" in match.group(1) and not match.group(2).strip(), f"inline script in {path}"
        assert not re.search(r"\son[a-z]+\s*=", html), f"inline event handler in {path}"
        assert "javascript:" not in html, path


def test_session_cookie_flags(app, client, researcher):
    response = login(client, researcher)
    cookie = next(v for k, v in response.headers.items() if k == "Set-Cookie" and v.startswith("session="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_production_cookies_are_secure_and_hsts_is_sent(tmp_path):
    from webapp import create_app

    app = create_app(
        {
            "PORTAL_ENV": "production",
            "SECRET_KEY": "x" * 64,
            "INSTANCE_DIR": tmp_path,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}",
            "REDIS_URL": "redis://127.0.0.1:1/0",
        }
    )
    assert app.config["SESSION_COOKIE_SECURE"] and app.config["SESSION_COOKIE_HTTPONLY"]
    assert app.config["SESSION_COOKIE_SAMESITE"] == "Lax"
    with app.test_client() as client:
        assert client.get("/login").headers["Strict-Transport-Security"].startswith("max-age=")


def _attempt(client, email, password, ip="10.0.0.1"):
    csrf = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post(
        "/login", data={"email": email, "password": password, "csrf_token": csrf}, environ_base={"REMOTE_ADDR": ip}
    )


def test_login_is_rate_limited_per_email_and_address(app, client, researcher):
    for _ in range(5):
        assert _attempt(client, researcher, "wrong").status_code == 401
    blocked = _attempt(client, researcher, PASSWORD)  # even the right password, for 15 minutes
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 800
    assert b"Too many failed logins" in blocked.data
    # Another address, or another account from this address, is not blocked.
    assert _attempt(client, researcher, PASSWORD, ip="10.0.0.2").status_code == 302
    assert _attempt(app.test_client(), "other@example.org", "wrong").status_code == 401


def test_a_successful_login_clears_the_failures(client, researcher):
    for _ in range(4):
        _attempt(client, researcher, "wrong")
    assert _attempt(client, researcher, PASSWORD).status_code == 302
    for _ in range(4):
        assert _attempt(client, researcher, "wrong").status_code == 401


def test_the_login_limit_holds_while_redis_is_down(app, client, researcher):
    assert app.config["RATELIMIT_STORAGE_URI"] == "redis://127.0.0.1:1/0"  # nothing listens there
    for _ in range(5):
        assert _attempt(client, researcher, "wrong").status_code == 401  # not a 500
    assert _attempt(client, researcher, PASSWORD).status_code == 429  # counted in memory meanwhile


def test_only_failed_logins_count(client, researcher):
    for _ in range(8):
        assert _attempt(client, researcher, PASSWORD).status_code == 302
    for _ in range(3):  # forms without a token are refused before they count
        assert client.post("/login", data={"email": researcher, "password": "wrong"}).status_code == 400
    for _ in range(5):
        assert _attempt(client, researcher, "wrong").status_code == 401


def _upload_page(client):
    csrf = csrf_from(client.get("/cases/new").get_data(as_text=True))
    return client.post(
        "/cases/new", data={"csrf_token": csrf, "image": (io.BytesIO(image_bytes(SMALL_IMAGES[1])), "y.jpg")}
    )


def test_uploads_are_rate_limited_per_user_over_pages_and_api(tmp_path, sent_tasks):
    from webapp import create_app
    from webapp.db import db

    app = create_app(
        {
            "TESTING": True,
            "INSTANCE_DIR": tmp_path / "i",
            "DATABASE_URL": f"sqlite:///{tmp_path / 't.db'}",
            "STORAGE_DIR": tmp_path / "s",
            "MODEL_DIR": tmp_path / "m",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "BROKER_TIMEOUT": 0.5,
            "UPLOAD_RATE_LIMIT": "2 per hour",
        }
    )
    with app.app_context():
        db.create_all()
    make_user(app)
    make_user(app, "other@example.org")
    headers = {"Authorization": f"Bearer {make_token(app, 'researcher@example.org')}"}
    client = app.test_client()
    image = {"image": (io.BytesIO(image_bytes(SMALL_IMAGES[0])), "x.jpg")}
    api = client.post("/api/v1/cases", headers=headers, data=image)
    assert api.status_code == 202
    login(client, "researcher@example.org")
    assert _upload_page(client).status_code == 302
    blocked = _upload_page(client)  # the third upload of this user within the hour, page or API
    assert blocked.status_code == 429 and 3000 < int(blocked.headers["Retry-After"]) <= 3600
    blocked = client.post("/api/v1/batches", headers=headers)
    assert blocked.status_code == 429 and blocked.json["status"] == 429 and "2 per 1 hour" in blocked.json["error"]
    assert int(blocked.headers["Retry-After"]) > 3000
    other = app.test_client()
    login(other, "other@example.org")
    assert _upload_page(other).status_code == 302  # another user has their own count
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


SECRET_PATTERNS = [
    re.compile(r"-----BEGIN (?:RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"(?i)(?:secret_key|password|passwd|api_key|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/_\-]{24,}"),
    re.compile(r"ghp_[A-Za-z0-9]{30,}|xox[abp]-[A-Za-z0-9-]{10,}"),
]


def secrets_in(root: Path, names: list[str]) -> list[str]:
    """Secret-looking strings in the files `names` under `root` (tests included; binaries left out)."""
    found = []
    for name in names:
        path = root / name
        if path.suffix in (".h5", ".keras", ".png", ".jpg", ".npy", ".npz", ".lock", ".pdf") or not path.is_file():
            continue
        if path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(errors="ignore")
        for pattern in SECRET_PATTERNS:
            for match in pattern.finditer(text):
                if "example" in match.group(0).lower() or "change-me" in text[match.start() : match.end() + 40]:
                    continue
                found.append(f"{name}: {match.group(0)[:40]}")
    return found


def test_the_secret_scan_reads_the_tests_too(tmp_path):
    planted = tmp_path / "tests" / "test_planted.py"
    planted.parent.mkdir()
    planted.write_text('SECRET_KEY = "' + "q7" * 16 + '"\nexample = "' + "AKIA" + "Z" * 16 + '"\n')
    assert secrets_in(tmp_path, ["tests/test_planted.py"]) == [
        "tests/test_planted.py: AKIA" + "Z" * 16,
        'tests/test_planted.py: SECRET_KEY = "' + "q7" * 13,
    ]


def test_no_secrets_in_the_repository():
    try:
        files = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        missing_part("not a git checkout: the secret scan lists files with git")
    assert ".env" not in files and not any(f.startswith("instance/") for f in files)
    assert any(name.startswith("tests/") for name in files)  # the tests are scanned like the rest
    found = secrets_in(ROOT, files)
    assert not found, found
    example = (ROOT / ".env.example").read_text()
    for line in example.splitlines():
        if re.match(r"^(SECRET_KEY|POSTGRES_PASSWORD|FLOWER_PASSWORD)=", line):
            assert line.split("=", 1)[1] in ("", "change-me"), line


def test_unknown_inactive_and_known_accounts_cost_the_same(app, researcher):
    """The probe timed 313 ms for an existing account and 15 ms for an unknown one."""
    import statistics
    import time

    from webapp.auth.sessions import authenticate

    make_user(app, "inactive@example.org", active=False)
    timings = {}
    with app.test_request_context():
        authenticate("warm@example.org", "x")  # the dummy hash is made once per process
        for email in (researcher, "nobody@example.org", "inactive@example.org"):
            runs = []
            for _ in range(3):
                started = time.perf_counter()
                assert authenticate(email, "wrong password") is None
                runs.append(time.perf_counter() - started)
            timings[email] = statistics.median(runs)
    known = timings[researcher]
    assert all(0.5 < spent / known < 2 for spent in timings.values()), timings


def test_one_address_is_limited_across_accounts(app, client, researcher):
    """Spraying: one guess each against many accounts meets a limit per client address."""
    for n in range(30):
        assert _attempt(client, f"user{n}@example.org", "Winter2026!").status_code == 401
    blocked = _attempt(client, researcher, PASSWORD)
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 800
    assert _attempt(app.test_client(), researcher, PASSWORD, ip="10.0.0.9").status_code == 302


# --- private files (issue 14) ---------------------------------------------------------------------


def _private(response) -> bool:
    return (
        response.headers["Cache-Control"] == "private, no-store"
        and response.headers["X-Content-Type-Options"] == "nosniff"
    )


def test_every_patient_file_is_private_and_api_urls_work_with_the_token(app, client, case_id, token):
    bearer = {"Authorization": f"Bearer {token}"}
    body = client.get(f"/api/v1/cases/{case_id}", headers=bearer).json
    image_url = body["images"][0]["url"]
    gradcam = body["analyses"][0]["explanations"][0]
    files = [image_url, gradcam["url"], gradcam["raw_url"], "/api/v1/cases.csv"]
    for url in files:
        response = client.get(url, headers=bearer)
        assert response.status_code == 200 and _private(response), (url, response.headers)
        response.close()
    assert client.get(image_url).status_code == 302  # neither a session nor a token
    login(client, "researcher@example.org")
    for url in [image_url, gradcam["url"], gradcam["raw_url"], "/cases/export.csv", f"/cases/{case_id}"]:
        response = client.get(url)
        assert response.status_code == 200 and _private(response), (url, response.headers)
        response.close()


def test_a_stored_npy_map_downloads_from_its_own_route_not_the_files_route(app, client, case_id, token):
    from webapp.models import Explanation

    with app.app_context():
        row = db.session.scalars(db.select(Explanation).where(Explanation.raw_key.is_not(None))).first()
        raw_key, raw_url = row.raw_key, f"/cases/{row.image.case_id}/explanations/{row.id}/raw.npy"
    headers = {"Authorization": f"Bearer {token}"}
    # /files serves uploaded images only: a map passes its route's blind-review check (webapp.review.blind).
    assert client.get(f"/files/{raw_key}", headers=headers).status_code == 404
    response = client.get(raw_url, headers=headers)
    assert response.status_code == 200 and response.mimetype == "application/octet-stream"
    assert response.data.startswith(b"\x93NUMPY")


def test_no_server_path_or_host_in_model_versions(app, client, token, tmp_path):
    from webapp.models import ModelVersion

    with app.app_context():
        db.session.add(
            ModelVersion(
                name="m", version="1", trained=False, class_names=["a"], manifest={}, artifact_path=str(tmp_path / "m")
            )
        )
        db.session.commit()
    body = client.get("/api/v1/model-versions", headers={"Authorization": f"Bearer {token}"}).get_data(as_text=True)
    assert '"name":"m"' in body.replace(" ", "") and str(tmp_path) not in body and "artifact_path" not in body


# --- cheap, quiet health (issue 14) ---------------------------------------------------------------


def test_anonymous_health_names_no_host_and_admins_see_details(app, client):
    import socket

    body = client.get("/api/v1/health").get_data(as_text=True)
    assert '"ok":false' in body.replace(" ", "")
    for secret in ("127.0.0.1", socket.gethostname(), "error", "pid", "celery@"):
        assert secret not in body, secret
    make_user(app, "admin@example.org", role="admin")
    admin = client.get("/api/v1/health", headers={"Authorization": f"Bearer {make_token(app, 'admin@example.org')}"})
    assert "ConnectionError" in admin.json["broker"]["error"]


def test_health_answers_from_a_cached_status_in_milliseconds(app, client, monkeypatch):
    """The probe: each health call pinged the worker (about 1 s); 48 concurrent ones stalled /login."""
    import threading
    import time

    asked = []

    def slow_worker_status(app, timeout):
        asked.append(time.monotonic())
        time.sleep(1.0)
        return {"ok": True, "workers": ["predict@some-host"]}

    monkeypatch.setattr("webapp.api.status.broker_status", lambda app: {"ok": True})
    monkeypatch.setattr("webapp.api.status.worker_status", slow_worker_status)
    app.config["HEALTH_CACHE_SECONDS"] = 0.5
    assert client.get("/api/v1/health").status_code == 200  # the process's first call waits once
    timings = []

    def probe():
        started = time.monotonic()
        response = app.test_client().get("/api/v1/health")
        timings.append(time.monotonic() - started)
        assert response.status_code == 200 and "some-host" not in response.get_data(as_text=True)

    for _ in range(3):  # past the cache's age: answered from the last status while one thread re-asks
        threads = [threading.Thread(target=probe) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(0.6)
    assert max(timings) < 0.5, sorted(timings)[-3:]
    assert len(asked) <= 4  # one ask per refresh, never one per request


def test_json_nested_5000_deep_is_a_400(app, client, case_id):
    make_user(app, "admin@example.org", role="admin")  # an admin may also review
    bearer = {"Authorization": f"Bearer {make_token(app, 'admin@example.org')}", "Content-Type": "application/json"}
    deep = "[" * 5000 + "]" * 5000
    for method, url in [("POST", f"/api/v1/cases/{case_id}/explanations"), ("PUT", f"/api/v1/cases/{case_id}/reviews")]:
        response = client.open(url, method=method, headers=bearer, data=deep)
        assert response.status_code == 400 and response.json["status"] == 400, (url, response.status_code)


def test_ids_past_the_database_range_are_404_not_500(client, auth_headers):
    for huge in (2**31, 2**63, 2**64):
        response = client.get(f"/api/v1/cases/{huge}", headers=auth_headers)
        assert response.status_code == 404 and response.is_json


# --- bounded work (issue 14) ----------------------------------------------------------------------


def test_a_map_of_a_huge_upload_is_stored_at_the_models_resolution(app, case_id):
    """The probe: a 6000x6000 upload stored each map at full size in float32 (144 MB per map)."""
    import io as _io

    import numpy as np
    from PIL import Image as PILImage

    from webapp.models import Explanation
    from webapp.storage import storage_from_settings
    from worker.explain import gradcam_layer_png, store_explanation

    huge = np.random.default_rng(0).random((3000, 4000), dtype=np.float32)
    with app.app_context():
        row = db.session.scalars(db.select(Explanation).where(Explanation.status == "queued")).first()
        row.method, row.class_name = "gradcam++", "bcc"
        store_explanation(row, row.image, huge, gradcam_layer_png, (120, 160), {"in_prediction_pass": False})
        db.session.commit()
        storage = storage_from_settings(app.extensions["settings"])
        with storage.open(row.raw_key) as f:
            raw = np.load(_io.BytesIO(f.read()), allow_pickle=False)
        with storage.open(row.overlay_key) as f:
            overlay = PILImage.open(_io.BytesIO(f.read()))
            overlay.load()
    assert raw.shape == (120, 160) and raw.dtype == np.float16
    assert abs(float(raw.mean()) - float(huge.mean())) < 0.01  # area-averaged, not sampled
    assert overlay.size == (160, 120)  # drawn from the stored map; the page stretches it over the image


def test_explanation_requests_are_limited_per_user_over_pages_and_api(app, client, case_id, token, sent):
    """The probe: any signed-in role could request maps without a quota."""
    app.config["EXPLAIN_RATE_LIMIT"] = "2 per hour"
    bearer = {"Authorization": f"Bearer {token}"}
    url = f"/api/v1/cases/{case_id}/explanations"
    assert client.post(url, json={"method": "gradcam", "class": "bcc"}, headers=bearer).status_code == 202
    stored = client.post(url, json={"method": "gradcam", "class": "mel"}, headers=bearer)
    assert stored.status_code == 200  # the map exists: no work queued, not counted
    login(client, "researcher@example.org")
    csrf = csrf_from(client.get(f"/cases/{case_id}").get_data(as_text=True))
    page = client.post(
        f"/cases/{case_id}/explanations", data={"csrf_token": csrf, "method": "gradcam++", "class": "mel"}
    )
    assert page.status_code == 302
    blocked = client.post(url, json={"method": "gradcam", "class": "nv"}, headers=bearer)
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 3000
    assert len([name for name, *_ in sent if name == "worker.tasks.explain_gradcam"]) == 2


def test_a_metadata_csv_is_bounded_by_its_batchs_files(app, client, auth_headers, sent_tasks):
    """The probe: a 200,000-row CSV was stored with a one-image batch (three made /batches take 5 s)."""
    from research_helpers import CSV_HEADER, HAM_CSV

    from webapp.models import Batch

    rows = "".join(f"ISIC_{n:07d},HAM_{n:07d},nv,histo,40,male,back\n" for n in range(2_000))
    refused = client.post(
        "/api/v1/batches",
        headers=auth_headers,
        data={"expected_files": "2", "metadata": (io.BytesIO((CSV_HEADER + rows).encode()), "m.csv")},
    )
    assert refused.status_code == 413 and "at most one row per file" in refused.json["error"]
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Batch.id))) == 0
    # Rows for files that never came are dropped when the last announced file is in.
    created = client.post(
        "/api/v1/batches",
        headers=auth_headers,
        data={
            "expected_files": "2",
            "metadata": (io.BytesIO((HAM_CSV + "".join(rows.splitlines(True)[:8])).encode()), "m.csv"),
        },
    )
    assert created.status_code == 201
    files = [(io.BytesIO(image_bytes(name)), name) for name in SMALL_IMAGES[:2]]
    assert client.post(created.json["files_url"], headers=auth_headers, data={"images": files}).status_code == 202
    with app.app_context():
        kept = db.session.get(Batch, created.json["id"]).metadata_rows
    assert sorted(kept) == sorted(name[:-4] for name in SMALL_IMAGES[:2])


def test_batch_requests_are_limited_to_a_chunk(app, client, auth_headers):
    """The probe: batch requests accepted 1 GB."""
    big = io.BytesIO(b"\0" * (65 * 1024 * 1024))
    response = client.post("/api/v1/batches", headers=auth_headers, data={"images": [(big, "a.png")]})
    assert response.status_code == 413


# --- safe defaults (issue 14) ---------------------------------------------------------------------


def test_the_testing_configuration_refuses_to_serve_outside_tests(tmp_path):
    """The probe: PORTAL_ENV=testing signed cookies with a key from the source (a forged cookie got
    /admin), and nothing stopped it from being served."""
    import os
    import sys

    from webapp.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="test suite only"):
        Settings.load(environ={"PORTAL_ENV": "testing", "INSTANCE_DIR": str(tmp_path)})
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env |= {"PORTAL_ENV": "testing", "INSTANCE_DIR": str(tmp_path / "i")}
    for command in (
        [sys.executable, "-c", "from webapp import create_app; create_app()"],
        [sys.executable, "scripts/run_portal.py", "--port", "5977"],  # the launcher
    ):
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "test suite only" in done.stderr + done.stdout, command
    under_test = Settings.load({"TESTING": True}, environ={"INSTANCE_DIR": str(tmp_path)})
    assert under_test.PORTAL_ENV == "testing" and under_test.SECRET_KEY != "testing-secret-key"
    assert len(under_test.SECRET_KEY) == 64


def test_the_database_and_stored_files_are_the_service_users_only(tmp_path):
    """The probe: portal.db was created world-readable."""
    import os
    import stat

    from webapp import create_app
    from webapp.db import db
    from webapp.storage import storage_from_settings

    previous = os.umask(0o022)
    try:
        (tmp_path / "instance").mkdir()
        app = create_app({"TESTING": True, "INSTANCE_DIR": tmp_path / "instance", "REDIS_URL": "redis://127.0.0.1:1/0"})
        with app.app_context():
            db.create_all()
            db.engine.dispose()
        storage = storage_from_settings(app.extensions["settings"])
        storage.save("images/ab/cd/" + "ab" * 32 + ".png", b"png")
    finally:
        os.umask(previous)
    database = tmp_path / "instance" / "portal.db"
    stored = app.extensions["settings"].STORAGE_DIR / "images" / "ab" / "cd" / ("ab" * 32 + ".png")
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700


def test_the_same_file_again_is_refused_before_it_is_decoded(app, client, auth_headers, sent_tasks, monkeypatch):
    """The probe: duplicates were found only after decoding (a repeated zip of large PNGs cost the
    web process its CPU again)."""
    import zipfile

    from webapp.cases import intake

    decoded = []
    real = intake.process_upload
    monkeypatch.setattr(intake, "process_upload", lambda *args: decoded.append(1) or real(*args))
    data = image_bytes(SMALL_IMAGES[0])
    first = client.post("/api/v1/cases", headers=auth_headers, data={"image": (io.BytesIO(data), "x.jpg")})
    assert first.status_code == 202 and len(decoded) == 1
    again = client.post("/api/v1/cases", headers=auth_headers, data={"image": (io.BytesIO(data), "y.jpg")})
    assert again.status_code == 409 and again.json["id"] == first.json["id"] and len(decoded) == 1
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.jpg", data)
        zf.writestr("b.jpg", data)
    archive.seek(0)
    batch = client.post("/api/v1/batches", headers=auth_headers, data={"archive": (archive, "again.zip")})
    assert batch.status_code == 202 and batch.json["pending"] == 2 and len(decoded) == 1
    run_sent_ingests(app, sent_tasks)  # the worker decodes archives
    progress = client.get(batch.json["url"], headers=auth_headers).json
    assert progress["duplicates"] == 2 and len(decoded) == 1
