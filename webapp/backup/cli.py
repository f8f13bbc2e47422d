"""`flask --app webapp backup create PATH` and `backup restore PATH [--force]`; a JSON summary each."""

from __future__ import annotations

import json
from pathlib import Path

import click
from flask import Blueprint, current_app

from ..db import db
from ..storage import LocalStorage, storage_from_settings
from .service import BackupError, create_backup, restore_backup

bp = Blueprint("backup", __name__, cli_group="backup")


def _storage() -> LocalStorage:
    storage = storage_from_settings(current_app.extensions["settings"])
    if not isinstance(storage, LocalStorage):
        raise click.ClickException("Backups cover the local storage folder; back up object storage with its own tools.")
    return storage


@bp.cli.command("create")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def create(path: Path) -> None:
    """Write the database and every stored file to the new archive PATH (safe while the portal runs)."""
    try:
        report = create_backup(db.engine, _storage(), path)
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(report.as_dict(), indent=1))


@bp.cli.command("restore")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace an instance that already holds rows or files.")
def restore(path: Path, force: bool) -> None:
    """Restore the archive PATH into the instance the settings name (stop the portal first)."""
    try:
        report = restore_backup(db.engine, _storage(), path, force=force)
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(report.as_dict(), indent=1))
