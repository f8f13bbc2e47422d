"""Every route needs a session or a token; roles; the admin page and CLI (the OpenAPI document: test_openapi.py)."""

from __future__ import annotations

import re

import pytest
from portal_helpers import csrf_from, login, make_user

PUBLIC = {"/login", "/api/v1/health", "/static/<path:filename>"}


def _url(rule) -> str:
    return re.sub(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>", lambda m: "1" if m.group(1) == "int" else "x", rule.rule)


def test_anonymous_requests_never_get_through(app, client):
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.rule in PUBLIC:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            token = csrf_from(client.get("/login").get_data(as_text=True))  # so that POSTs reach the login check
            response = client.open(_url(rule), method=method, headers={"X-CSRF-Token": token})
            where = f"{method} {rule.rule}"
            if rule.rule.startswith("/api/"):
                assert response.status_code == 401, where
            else:
                assert response.status_code == 302 and "/login" in response.location, where
            checked += 1
    assert checked > 40


@pytest.mark.parametrize(
    "role, path, status",
    [
        ("reviewer", "/batches/new", 403),
        ("reviewer", "/cases/new", 403),
        ("researcher", "/review/next", 403),
        ("researcher", "/admin", 403),
        ("reviewer", "/admin/audit", 403),
        ("admin", "/admin", 200),
        ("reviewer", "/dashboard", 200),
        ("reviewer", "/batches", 200),
        ("researcher", "/cases", 200),
    ],
)
def test_roles_on_pages(app, client, role, path, status):
    make_user(app, f"{role}@example.org", role=role)
    login(client, f"{role}@example.org")
    assert client.get(path).status_code == status


def test_admin_page_manages_users_and_tokens(app, client):
    from webapp.db import db
    from webapp.models import ApiToken, AuditEntry, User

    make_user(app, "admin@example.org", role="admin")
    login(client, "admin@example.org")
    csrf = csrf_from(client.get("/admin").get_data(as_text=True))
    assert (
        client.post(
            "/admin/users",
            data={"csrf_token": csrf, "email": "New@Example.org", "role": "reviewer", "password": "long enough pw"},
        ).status_code
        == 302
    )
    assert (
        client.post(
            "/admin/users", data={"csrf_token": csrf, "email": "x@example.org", "role": "reviewer", "password": "short"}
        ).status_code
        == 302
    )
    with app.app_context():
        new = db.session.scalar(db.select(User).where(User.email == "new@example.org"))
        assert (
            new.role == "reviewer" and db.session.scalar(db.select(User).where(User.email == "x@example.org")) is None
        )
        new_id, admin_id = new.id, db.session.scalar(db.select(User.id).where(User.email == "admin@example.org"))
    client.post(f"/admin/users/{new_id}", data={"csrf_token": csrf, "role": "researcher", "active": "1"})
    page = client.post(f"/admin/users/{new_id}/tokens", data={"csrf_token": csrf, "label": "laptop"}).get_data(
        as_text=True
    )
    token = re.search(r'id="new-token">([^<]+)<', page).group(1)
    assert client.get("/api/v1/cases", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    with app.app_context():
        token_id = db.session.scalar(db.select(ApiToken.id).where(ApiToken.label == "laptop"))
    client.post(f"/admin/tokens/{token_id}/revoke", data={"csrf_token": csrf})
    assert client.get("/api/v1/cases", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    client.post(f"/admin/users/{new_id}", data={"csrf_token": csrf, "role": "researcher", "active": "0"})
    assert login(client.application.test_client(), "new@example.org", "long enough pw").status_code == 401
    # The last active admin cannot demote themselves.
    client.post(f"/admin/users/{admin_id}", data={"csrf_token": csrf, "role": "reviewer", "active": "1"})
    assert "last active admin" in client.get("/admin").get_data(as_text=True)
    with app.app_context():
        actions = [e.action for e in db.session.scalars(db.select(AuditEntry).order_by(AuditEntry.id))]
    assert actions == ["user.create", "user.update", "token.issue", "token.revoke", "user.update"]
    assert "token.revoke" in client.get("/admin/audit").get_data(as_text=True)


def test_cli_roles_tokens_and_model_versions(app, tmp_path):
    import json

    make_user(app, "cli@example.org", role="researcher")
    make_user(app, "boss@example.org", role="admin")
    runner = app.test_cli_runner()
    assert runner.invoke(args=["users", "role", "cli@example.org", "reviewer"]).exit_code == 0
    token_output = runner.invoke(args=["users", "token", "cli@example.org", "--label", "ci"]).output
    listing = runner.invoke(args=["users", "tokens", "cli@example.org"]).output
    token_id = listing.split("\t")[0]
    assert "active" in listing and token_output.strip().splitlines()[-1].startswith("dp_")
    assert runner.invoke(args=["users", "revoke-token", token_id]).exit_code == 0
    assert "revoked" in runner.invoke(args=["users", "tokens", "cli@example.org"]).output
    assert runner.invoke(args=["users", "deactivate", "cli@example.org"]).exit_code == 0
    assert runner.invoke(args=["users", "deactivate", "boss@example.org"]).exit_code != 0  # last admin
    artifact = tmp_path / "model"
    artifact.mkdir()
    (artifact / "manifest.json").write_text(
        json.dumps({"name": "m", "version": "1", "trained": True, "trained_on": "HAM", "class_names": ["nv", "mel"]})
    )
    result = runner.invoke(args=["models", "register", str(artifact)])
    assert result.exit_code == 0 and "m 1" in result.output
    assert str(artifact) in runner.invoke(args=["models", "list"]).output
    assert runner.invoke(args=["models", "register", str(tmp_path)]).exit_code != 0
