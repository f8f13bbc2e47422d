"""The permission table, tested whole: every route and method of app.url_map, called as anonymous,
as each role in a browser session and with each role's API token, answers as
`webapp.security.ACCESS` says; a route without an entry (or an entry without a route) fails."""

from __future__ import annotations

import io
import re

import pytest
from portal_helpers import PASSWORD, SMALL_IMAGES, image_bytes, make_token, make_user

from webapp.security import ACCESS, EITHER, SESSION, TOKEN

ROLES = ("admin", "researcher", "reviewer")
PRINCIPALS = [("anonymous", None)] + [(role, via) for via in (SESSION, TOKEN) for role in ROLES]
# Calls that change who is signed in or what exists run after all the others.
LAST = ("admin.revoke", "cases.delete", "batches.delete", "api.delete_one", "api.delete_one_batch", "auth.logout")


def build_portal(tmp, database_url: str):
    """An app with a user and token of each role, a case with its stored image and an empty batch."""
    from webapp import create_app
    from webapp.db import db

    app = create_app(
        {
            "TESTING": True,
            "CSRF_ENABLED": False,  # the table is about roles; CSRF has its own tests
            "INSTANCE_DIR": tmp / "instance",
            "DATABASE_URL": database_url,
            "STORAGE_DIR": tmp / "storage",
            "MODEL_DIR": tmp / "no-model",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "BROKER_TIMEOUT": 0.5,
            "LOGIN_RATE_LIMIT": "1000 per minute",  # the table posts /login empty many times
            "LOGIN_ADDRESS_RATE_LIMIT": "1000 per minute",
        }
    )
    with app.app_context():
        db.create_all()
    tokens = {}
    for role in ROLES:
        make_user(app, f"{role}@example.org", role=role)
        tokens[role] = make_token(app, f"{role}@example.org")
    spare_user = make_user(app, "spare@example.org", role="reviewer")
    make_token(app, "spare@example.org")
    bearer = {"Authorization": f"Bearer {tokens['researcher']}"}
    client = app.test_client()
    upload = {"image": (io.BytesIO(image_bytes(SMALL_IMAGES[0])), "x.jpg")}
    case = client.post("/api/v1/cases", headers=bearer, data=upload).json
    batch = client.post("/api/v1/batches", headers=bearer, data={"name": "b"}).json
    image = client.get(case["url"], headers=bearer).json["images"][0]
    h = image["content_hash"]
    values = {
        "case_id": case["id"],
        "batch_id": batch["id"],
        "user_id": spare_user,
        "token_id": 4,  # the spare user's token: revoking it harms no caller
        "explanation_id": 1,
        "key": f"images/{h[:2]}/{h[2:4]}/{h}.png",
        "filename": "style.css",
    }
    return app, tokens, values


@pytest.fixture(scope="module")
def portal(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setattr("webapp.queue.send", lambda name, *args, queue: "task-id")
    tmp = tmp_path_factory.mktemp("permissions")
    return build_portal(tmp, f"sqlite:///{tmp / 'test.db'}")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _url(rule, values) -> str:
    url = rule.rule
    for arg in rule.arguments:
        url = re.sub(r"<(?:[^<>:]+:)?" + re.escape(arg) + r">", str(values[arg]), url)
    return url


def _refused(response) -> bool:
    """403; a bearer challenge (401 with WWW-Authenticate); or a redirect to log in first."""
    location = response.headers.get("Location", "")
    return (
        response.status_code == 403
        or (response.status_code == 401 and "WWW-Authenticate" in response.headers)
        or (response.status_code == 302 and "/login?next=" in location)
    )


def _expected(endpoint: str, role: str, via: str | None) -> bool:
    audience, reached = ACCESS[endpoint]
    if role == "anonymous":
        return "anonymous" in audience
    return role in audience and (reached == EITHER or reached == via)


def test_every_route_has_an_entry_and_every_entry_a_route(portal):
    app, _, _ = portal
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert endpoints - set(ACCESS) == set(), "routes without an entry in webapp.security.ACCESS"
    assert set(ACCESS) - endpoints == set(), "entries in webapp.security.ACCESS without a route"


def test_every_route_answers_each_principal_as_the_table_says(portal):
    app, tokens, values = portal
    clients = {}
    for role in ROLES:
        clients[role] = app.test_client()
        assert (
            clients[role].post("/login", data={"email": f"{role}@example.org", "password": PASSWORD}).status_code == 302
        )
    rules = sorted(
        app.url_map.iter_rules(),
        key=lambda rule: (rule.endpoint in LAST, LAST.index(rule.endpoint) if rule.endpoint in LAST else 0),
    )
    wrong, calls = [], 0
    for rule in rules:
        url = _url(rule, values)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            for role, via in PRINCIPALS:
                client = clients[role] if via == SESSION else app.test_client()
                headers = {"Authorization": f"Bearer {tokens[role]}"} if via == TOKEN else {}
                response = client.open(url, method=method, headers=headers)
                response.close()
                calls += 1
                assert response.status_code < 500 or rule.endpoint == "api.health", f"{method} {url} as {role} {via}"
                allowed = not _refused(response)
                if allowed != _expected(rule.endpoint, role, via):
                    wrong.append(f"{method} {url} as {role} by {via}: {response.status_code}")
    assert wrong == [], "\n".join(wrong)
    assert calls == 7 * sum(len(rule.methods - {"HEAD", "OPTIONS"}) for rule in app.url_map.iter_rules())


# --- no 500 from input -------------------------------------------------------------------------------

HUGE = (2**31, 2**63, 2**64)  # past PostgreSQL's INTEGER, at and past SQLite's 64-bit integers
ID_PARAMS = ("case_id", "batch", "model_version", "uploader", "before", "per_page", "age_min", "cursor", "page")


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_no_route_answers_500_to_hostile_input(engine, request, tmp_path, monkeypatch):
    """Ids past the database's integer range in every path and id-like query parameter, and JSON
    nested 5,000 deep in every unsafe request: a 4xx, never a 500."""
    monkeypatch.setattr("webapp.queue.send", lambda name, *args, queue: "task-id")
    url = request.getfixturevalue("fresh_postgres_url") if engine == "postgresql" else f"sqlite:///{tmp_path / 'h.db'}"
    app, tokens, values = build_portal(tmp_path, url)
    app.config["PROPAGATE_EXCEPTIONS"] = False  # a bug answers 500 here, as in production
    session = app.test_client()
    session.post("/login", data={"email": "admin@example.org", "password": PASSWORD})
    bearer = {"Authorization": f"Bearer {tokens['admin']}"}
    failures = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda rule: rule.endpoint in LAST):
        reached_by = ACCESS[rule.endpoint][1]
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            for huge in HUGE:
                ids = {arg: huge for arg in rule.arguments if arg not in ("key", "filename")}
                path = _url(rule, {**values, **ids})
                plain = _url(rule, values)
                calls = [(path, {})]
                if method == "GET":
                    calls += [(f"{plain}?{name}={huge}", {}) for name in ID_PARAMS] + [(f"{plain}?q=%23{huge}", {})]
                elif huge == HUGE[0]:
                    calls.append((plain, {"data": _nested(5000), "content_type": "application/json"}))
                for target, extra in calls:
                    for via, client, headers in ((SESSION, session, {}), (TOKEN, app.test_client(), bearer)):
                        response = client.open(target, method=method, headers=headers, **extra)
                        response.close()
                        if response.status_code >= 500 and rule.endpoint != "api.health":
                            failures.append(f"{method} {target[:90]} {str(extra)[:30]}: {response.status_code}")
                        reaches = reached_by in (via, EITHER)
                        if ids and reaches and target == path and response.status_code not in (404, 405):
                            failures.append(f"{method} {target[:90]}: {response.status_code}, not 404")
    assert failures == [], "\n".join(sorted(set(failures)))
