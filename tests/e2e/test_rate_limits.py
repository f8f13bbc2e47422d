"""Rate limits counted in a real redis-server: shared by every web process, no email in the keys."""

from __future__ import annotations

import pytest
from portal_helpers import PASSWORD, csrf_from, make_user

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _attempt(client, email, password):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post(
        "/login",
        data={"email": email, "password": password, "csrf_token": token},
        environ_base={"REMOTE_ADDR": "10.0.0.7"},
    )


def test_failed_logins_are_counted_in_redis(portal_env, redis_url):
    import redis
    from flask_migrate import upgrade

    from webapp import create_app

    app = create_app()
    with app.app_context():
        upgrade()
    email = "researcher@example.org"
    make_user(app, email)
    for _ in range(5):
        assert _attempt(app.test_client(), email, "wrong").status_code == 401
    keys = [key.decode() for key in redis.Redis.from_url(redis_url).keys("*dermportal*")]
    assert keys and not any(email in key or "10.0.0.7" in key for key in keys)
    # Another web process (a new app with its own memory) sees the same count.
    other_process = create_app()
    blocked = _attempt(other_process.test_client(), email, PASSWORD)
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 800
