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
