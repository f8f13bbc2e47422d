import time

import pytest
from portal_helpers import PASSWORD, csrf_from, login, make_token, make_user


def test_pages_need_a_login(client):
    response = client.get("/cases")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_login_logout(client, researcher):
    response = login(client, researcher)
    assert response.status_code == 302 and response.headers["Location"].endswith("/cases")
    page = client.get("/cases").get_data(as_text=True)
    assert researcher in page and "Research use only" in page
    assert client.post("/logout", data={"csrf_token": csrf_from(page)}).status_code == 302
    assert client.get("/cases").status_code == 302


def test_wrong_password_and_unknown_user(client, researcher):
    assert login(client, researcher, "wrong password").status_code == 401
    assert login(client, "nobody@example.org").status_code == 401
    assert client.get("/cases").status_code == 302


def test_inactive_user_cannot_log_in(app, client):
    make_user(app, "gone@example.org", active=False)
    assert login(client, "gone@example.org").status_code == 401


def test_forms_need_the_csrf_token(client, researcher):
    response = client.post("/login", data={"email": researcher, "password": PASSWORD})
    assert response.status_code == 400
    client.get("/login")
    response = client.post("/login", data={"email": researcher, "password": PASSWORD, "csrf_token": "forged"})
    assert response.status_code == 400


def test_signed_in_forms_need_the_csrf_token(client, logged_in):
    refused = client.post("/logout")
    assert refused.status_code == 400 and b"did not come from this site" in refused.data
    assert client.post("/cases/new", data={"csrf_token": "forged"}).status_code == 400
    assert client.get("/cases").status_code == 200  # still signed in: the forged logout did nothing
    token = csrf_from(client.get("/cases").get_data(as_text=True))
    assert client.post("/logout", headers={"X-CSRF-Token": token}).status_code == 302  # the header works too


def test_logout_ends_the_session(client, researcher):
    login(client, researcher)
    page = client.get("/cases").get_data(as_text=True)
    client.post("/logout", data={"csrf_token": csrf_from(page)})
    with client.session_transaction() as session:
        assert "_user_id" not in session
    response = client.get("/cases/new")
    assert response.status_code == 302 and "/login?next=" in response.headers["Location"]


def test_login_redirects_back_to_the_page_asked_for(client, researcher):
    response = client.get("/cases?dx=mel")
    location = response.headers["Location"]
    assert response.status_code == 302 and "/login?next=" in location
    token = csrf_from(client.get(location).get_data(as_text=True))
    response = client.post(location, data={"email": researcher, "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"] == "/cases?dx=mel"


def test_a_deactivated_users_session_is_refused(app, client, researcher):
    from webapp.db import db
    from webapp.models import User

    login(client, researcher)
    assert client.get("/cases").status_code == 200

    def set_active(active):
        with app.app_context():
            db.session.scalars(db.select(User)).one().active = active
            db.session.commit()

    set_active(False)
    assert client.get("/cases").status_code == 302
    set_active(True)  # the session ended; reactivation does not bring it back
    assert client.get("/cases").status_code == 302


def test_next_parameter_only_redirects_locally(client, researcher):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    data = {"email": researcher, "password": PASSWORD, "csrf_token": token}
    response = client.post("/login?next=https://evil.example/x", data=data)
    assert response.headers["Location"].endswith("/cases")


def test_bearer_tokens(app, client, researcher):
    token = make_token(app, researcher)
    assert client.get("/api/v1/cases/1", headers={"Authorization": f"Bearer {token}"}).status_code == 404
    for headers, message in [
        ({}, "Missing Authorization"),
        ({"Authorization": "Basic abc"}, "Malformed"),
        ({"Authorization": "Bearer dp_wrong"}, "Invalid or revoked"),
        ({"Authorization": token}, "Malformed"),
    ]:
        response = client.get("/api/v1/cases/1", headers=headers)
        assert response.status_code == 401 and message in response.json["error"]
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoked_token_and_inactive_user(app, client, researcher):
    from webapp.db import db
    from webapp.models import ApiToken, User, utcnow

    token = make_token(app, researcher)
    with app.app_context():
        db.session.scalars(db.select(ApiToken)).one().revoked_at = utcnow()
        db.session.commit()
    assert client.get("/api/v1/cases/1", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    token = make_token(app, researcher)
    with app.app_context():
        db.session.scalars(db.select(User)).one().active = False
        db.session.commit()
    assert client.get("/api/v1/cases/1", headers={"Authorization": f"Bearer {token}"}).status_code == 401


# --- sessions that end (issue 14) ----------------------------------------------------------------


def _cookie(client) -> str:
    return client.get_cookie("session").value


def _replay(app, cookie: str):
    """A new browser that presents a copied session cookie."""
    other = app.test_client()
    other.set_cookie("session", cookie)
    return other


def test_a_cookie_replayed_after_logout_signs_no_one_in(app, client, researcher):
    login(client, researcher)
    stolen = _cookie(client)
    assert _replay(app, stolen).get("/cases").status_code == 200
    client.post("/logout", data={"csrf_token": csrf_from(client.get("/cases").get_data(as_text=True))})
    for path in ("/cases", "/cases/export.csv"):
        response = _replay(app, stolen).get(path)
        assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_role_change_and_deactivation_end_every_session(app, client, researcher):
    from webapp.accounts.service import update_user
    from webapp.db import db
    from webapp.models import User

    def change(**values):
        with app.app_context():
            update_user(db.session.scalar(db.select(User).where(User.email == researcher)), None, **values)

    login(client, researcher)
    stolen = _cookie(client)
    change(role="reviewer")
    assert _replay(app, stolen).get("/cases").status_code == 302
    login(client, researcher)
    stolen = _cookie(client)
    assert _replay(app, stolen).get("/cases").status_code == 200
    change(active=False)
    change(active=True)  # reactivated: the cookies from before stay dead
    assert _replay(app, stolen).get("/cases").status_code == 302


def test_the_session_lives_hours_not_days(app, client, researcher):
    from webapp import create_app

    assert app.permanent_session_lifetime.total_seconds() == 8 * 3600
    login(client, researcher)
    cookie = client.get_cookie("session")
    assert cookie.expires is not None  # a permanent cookie: the browser drops it too
    keys = ("TESTING", "INSTANCE_DIR", "DATABASE_URL", "STORAGE_DIR", "REDIS_URL", "BROKER_TIMEOUT")
    short = create_app({key: app.config[key] for key in keys} | {"SESSION_HOURS": 1 / 3600})
    replayed = short.test_client()
    replayed.set_cookie("session", cookie.value)
    assert replayed.get("/cases").status_code == 200
    time.sleep(2.1)
    assert replayed.get("/cases").status_code == 302  # the server refuses the older signature


def _change(client, current, new, again=None):
    page = client.get("/account/password")
    assert page.status_code == 200
    data = {"current": current, "new": new, "new_again": new if again is None else again}
    return client.post("/account/password", data={**data, "csrf_token": csrf_from(page.get_data(as_text=True))})


def test_password_change_page(app, client, researcher):
    from webapp.db import db
    from webapp.models import AuditEntry

    login(client, researcher)
    other_browser = _replay(app, _cookie(client))
    assert _change(client, "wrong current pw", "a new and long passphrase").status_code == 400
    assert _change(client, PASSWORD, "a new and long passphrase", "differs").status_code == 400
    refused = _change(client, PASSWORD, "password1234")
    assert refused.status_code == 400 and b"common or breached" in refused.data
    assert _change(client, PASSWORD, "short pw").status_code == 400
    done = _change(client, PASSWORD, "a new and long passphrase")
    assert done.status_code == 302
    assert client.get("/cases").status_code == 200  # this browser stays signed in
    assert other_browser.get("/cases").status_code == 302  # every other session ended
    client.post("/logout", data={"csrf_token": csrf_from(client.get("/cases").get_data(as_text=True))})
    assert login(client, researcher).status_code == 401
    assert login(client, researcher, "a new and long passphrase").status_code == 302
    with app.app_context():
        actions = [e.action for e in db.session.scalars(db.select(AuditEntry))]
        entry = db.session.scalars(db.select(AuditEntry).where(AuditEntry.action == "user.password")).one()
        assert actions.count("user.password") == 1 and entry.old is None and entry.new is None


def test_password_page_needs_a_login(client):
    response = client.get("/account/password")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("elevenchars", "at least 12"),
        ("x" * 1025, "at most 1024"),
        ("password1234", "common or breached"),
        ("Qwertyuiop123", "common or breached"),
        ("aaaaaaaaaaaa", "repeats or counts"),
        ("abcabcabcabc", "repeats or counts"),
        ("123456789012", "repeats or counts"),
        ("researcher-2026!", "email name"),
    ],
)
def test_password_rules(password, message):
    from webapp.auth.passwords import password_problem

    assert message in password_problem(password, "researcher@example.org")


def test_a_good_password_passes_and_the_list_is_vendored():
    from webapp.auth.passwords import common_passwords, password_problem

    assert password_problem("correct horse battery", "researcher@example.org") is None
    assert len(common_passwords()) > 19_000 and "iloveyou" in common_passwords()


def test_every_place_that_sets_a_password_applies_the_rules(app, client, tmp_path):
    from webapp.auth.passwords import password_problem
    from webapp.bootstrap import ensure_admin
    from webapp.db import db
    from webapp.models import User

    runner = app.test_cli_runner()
    result = runner.invoke(args=["users", "create", "x@example.org", "--password", "password1234"])
    assert result.exit_code != 0 and "common or breached" in result.output
    make_user(app, "boss@example.org", role="admin")
    result = runner.invoke(args=["users", "password", "boss@example.org", "--password", "aaaaaaaaaaaa"])
    assert result.exit_code != 0 and "repeats" in result.output
    login(client, "boss@example.org")
    csrf = csrf_from(client.get("/admin").get_data(as_text=True))
    form = {"csrf_token": csrf, "email": "y@example.org", "role": "reviewer", "password": "eleven char"}
    client.post("/admin/users", data=form)
    assert "at least 12" in client.get("/admin").get_data(as_text=True)
    with app.app_context():  # the first admin of an empty database gets a password that passes
        db.session.execute(db.delete(User))
        db.session.commit()
    password = ensure_admin(app, tmp_path / "admin-password")
    assert password_problem(password, "admin@localhost") is None


def test_cli_account_commands_are_audited(app):
    from webapp.db import db
    from webapp.models import AuditEntry

    runner = app.test_cli_runner()
    assert runner.invoke(args=["users", "create", "c@example.org", "--password", "long enough pw"]).exit_code == 0
    assert runner.invoke(args=["users", "token", "c@example.org"]).exit_code == 0
    assert runner.invoke(args=["users", "role", "c@example.org", "reviewer"]).exit_code == 0
    assert runner.invoke(args=["users", "password", "c@example.org", "--password", "another long pw"]).exit_code == 0
    assert runner.invoke(args=["users", "deactivate", "c@example.org"]).exit_code == 0
    assert runner.invoke(args=["users", "activate", "c@example.org"]).exit_code == 0
    with app.app_context():
        actions = [e.action for e in db.session.scalars(db.select(AuditEntry).order_by(AuditEntry.id))]
    assert actions == ["user.create", "token.issue", "user.update", "user.password", "user.update", "user.update"]


def test_guessing_the_current_password_on_the_password_page_is_limited(client, researcher):
    login(client, researcher)
    for _ in range(5):
        assert _change(client, "wrong current pw", "a new and long passphrase").status_code == 400
    assert _change(client, PASSWORD, "a new and long passphrase").status_code == 429
