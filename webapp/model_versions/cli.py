"""`flask --app webapp models register FOLDER` and `models list`."""

from __future__ import annotations

import json
from pathlib import Path

import click
from flask import Blueprint
from sqlalchemy import select

from ..db import db
from ..models import ModelVersion
from .service import register_model_version

bp = Blueprint("models_cli", __name__, cli_group="models")


@bp.cli.command("register")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def register(folder: Path) -> None:
    """Register the model artifact in FOLDER (its manifest.json) so that cases can be re-run with it."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise click.ClickException(f"{folder} has no manifest.json; it is not a model artifact.")
    try:
        manifest = json.loads(manifest_path.read_text())
        name, version = str(manifest["name"]), str(manifest["version"])
        list(manifest["class_names"])  # a manifest without class names is refused here
    except (ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(
            f"{manifest_path} is not a valid manifest ({exc.__class__.__name__}: {exc})."
        ) from None
    row = register_model_version(manifest, folder)
    click.echo(
        f"Model version {row.id}: {name} {version} ({'trained on ' + str(row.trained_on) if row.trained else 'untrained'}) at {row.artifact_path}"
    )


@bp.cli.command("list")
def list_versions() -> None:
    """List the registered model versions."""
    for mv in db.session.scalars(select(ModelVersion).order_by(ModelVersion.id)):
        click.echo(
            f"{mv.id}\t{mv.name}\t{mv.version}\t{'trained' if mv.trained else 'untrained'}\t{mv.artifact_path or ''}"
        )
