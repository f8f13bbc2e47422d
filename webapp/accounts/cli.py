"""`flask --app webapp users ...`: create accounts and issue API tokens from the command line."""

from __future__ import annotations

import click
from flask import Blueprint

from ..auth.sessions import find_user
from ..db import db
from ..models import ROLES, ApiToken, User
from .service import AccountError, create_user, issue_token, reset_password, revoke_token, update_user

bp = Blueprint("users", __name__, cli_group="users")


@bp.cli.command("create")
@click.argument("email")
@click.option("--role", type=click.Choice(ROLES), default="researcher", show_default=True)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True, help="Prompted for when not given.")
def create(email: str, role: str, password: str) -> None:
    """Create a user with EMAIL and a password (recorded in the audit log)."""
    try:
        user = create_user(email, role, password, None)
    except AccountError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"Created {user.role} {user.email}.")


@bp.cli.command("password")
@click.argument("email")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True, help="Prompted for when not given.")
def set_password(email: str, password: str) -> None:
    """Set EMAIL's password (recorded in the audit log); the user's sessions end."""
    try:
        reset_password(_existing(email), password, None)
    except AccountError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"Password of {email} changed; their sessions have ended.")


@bp.cli.command("token")
@click.argument("email")
@click.option("--label", default=None, help="A note on what the token is for.")
def create_token(email: str, label: str | None) -> None:
    """Print a new API token for EMAIL (the last line of the output; only its hash is stored; audited)."""
    user = _existing(email)
    _row, plain = issue_token(user, label, None)
    click.echo(f"New API token for {user.email} (shown once; send as 'Authorization: Bearer <token>'):")
    click.echo(plain)


@bp.cli.command("list")
def list_users() -> None:
    """List users and their roles."""
    for user in db.session.scalars(db.select(User).order_by(User.id)):
        click.echo(f"{user.id}\t{user.email}\t{user.role}\t{'active' if user.active else 'inactive'}")


@bp.cli.command("role")
@click.argument("email")
@click.argument("role", type=click.Choice(ROLES))
def change_role(email: str, role: str) -> None:
    """Give EMAIL the role ROLE (recorded in the audit log)."""
    user = _update_account(email, role=role)
    click.echo(f"{user.email} is now {user.role}.")


@bp.cli.command("deactivate")
@click.argument("email")
def deactivate(email: str) -> None:
    """Deactivate EMAIL: no login, and their API tokens stop working."""
    user = _update_account(email, active=False)
    click.echo(f"Deactivated {user.email}.")


def _update_account(email: str, **changes):
    """Applies CHANGES to EMAIL's account (audited); refusals become a clean CLI error."""
    user = _existing(email)
    try:
        update_user(user, None, **changes)
    except AccountError as exc:
        raise click.ClickException(exc.message) from None
    return user


@bp.cli.command("activate")
@click.argument("email")
def activate(email: str) -> None:
    """Re-activate EMAIL."""
    user = _update_account(email, active=True)
    click.echo(f"Activated {user.email}.")


@bp.cli.command("tokens")
@click.argument("email")
def list_tokens(email: str) -> None:
    """List the API tokens of EMAIL (id, label, created, last used, revoked)."""
    for row in _existing(email).tokens:
        click.echo(
            f"{row.id}\t{row.label or ''}\t{row.created_at:%Y-%m-%d %H:%M}\t"
            f"{row.last_used_at or 'never used'}\t{'revoked' if row.revoked_at else 'active'}"
        )


@bp.cli.command("revoke-token")
@click.argument("token_id", type=int)
def revoke(token_id: int) -> None:
    """Revoke the API token with id TOKEN_ID (see `users tokens EMAIL`)."""
    row = db.session.get(ApiToken, token_id)
    if row is None:
        raise click.ClickException(f"No token with id {token_id}.")
    revoke_token(row, None)
    click.echo(f"Revoked token {token_id} of {row.user.email}.")


def _existing(email: str) -> User:
    user = find_user(email)
    if user is None:
        raise click.ClickException(f"No user with email {email}.")
    return user
