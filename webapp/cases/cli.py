"""`flask --app webapp cases delete ID --reason TEXT --admin EMAIL`: a case deleted from the shell."""

from __future__ import annotations

import json
from collections.abc import Callable

import click
from flask import Blueprint

from ..auth.sessions import find_user
from .deletion import Deletion, DeletionError, check_reason, delete_case

bp = Blueprint("cases_cli", __name__, cli_group="cases")


def run_deletion(
    delete: Callable[..., Deletion], what: str, entity_id: int, reason: str, email: str, yes: bool
) -> None:
    """Deletes as the admin `email` (whom the audit log names) after a confirmation; prints a JSON summary."""
    actor = find_user(email)
    if actor is None:
        raise click.ClickException(f"No user with email {email}.")
    try:
        check_reason(reason)  # before the question, not after it
    except DeletionError as exc:
        raise click.BadParameter(exc.message, param_hint="--reason") from None
    if not yes:
        click.confirm(f"Delete {what} {entity_id} for good?", abort=True)
    try:
        result = delete(entity_id, actor, reason)
    except DeletionError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(json.dumps(result.as_dict(), indent=1))


@bp.cli.command("delete")
@click.argument("case_id", type=int)
@click.option("--reason", required=True, help="Why (3-500 characters, no patient data); audited.")
@click.option("--admin", "email", required=True, help="The admin the deletion is recorded under.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete_case_command(case_id: int, reason: str, email: str, yes: bool) -> None:
    """Delete case CASE_ID with its image, results, maps and reviews."""
    run_deletion(delete_case, "case", case_id, reason, email, yes)
