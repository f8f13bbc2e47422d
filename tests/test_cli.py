from webapp.db import db
from webapp.models import ApiToken, User, hash_token


def test_create_user_and_token(app):
    runner = app.test_cli_runner()
    result = runner.invoke(
        args=["users", "create", "Admin@Example.org", "--role", "admin", "--password", "long-enough-pw"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(args=["users", "token", "admin@example.org"])
    assert result.exit_code == 0, result.output
    token = result.output.strip().splitlines()[-1]
    with app.app_context():
        user = db.session.scalars(db.select(User)).one()
        assert user.email == "admin@example.org" and user.role == "admin" and user.check_password("long-enough-pw")
        assert db.session.scalars(db.select(ApiToken)).one().token_hash == hash_token(token)
    assert app.test_client().get("/api/v1/cases/1", headers={"Authorization": f"Bearer {token}"}).status_code == 404


def test_password_prompt(app):
    result = app.test_cli_runner().invoke(
        args=["users", "create", "r@example.org"], input="pw-from-prompt\npw-from-prompt\n"
    )
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert db.session.scalars(db.select(User)).one().role == "researcher"


def test_cli_errors(app):
    runner = app.test_cli_runner()
    assert runner.invoke(args=["users", "create", "x@example.org", "--password", "short"]).exit_code != 0
    assert runner.invoke(args=["users", "create", "not-an-email", "--password", "long-enough-pw"]).exit_code != 0
    assert (
        runner.invoke(
            args=["users", "create", "x@example.org", "--role", "god", "--password", "long-enough-pw"]
        ).exit_code
        != 0
    )
    assert runner.invoke(args=["users", "create", "x@example.org", "--password", "long-enough-pw"]).exit_code == 0
    duplicate = runner.invoke(args=["users", "create", "X@example.org", "--password", "long-enough-pw"])
    assert duplicate.exit_code != 0 and "already exists" in duplicate.output
    unknown = runner.invoke(args=["users", "token", "nobody@example.org"])
    assert unknown.exit_code != 0 and "No user" in unknown.output
