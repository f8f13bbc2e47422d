"""`flask --app webapp batch import FOLDER` and `flask --app webapp models register/list`."""

from __future__ import annotations

import json
from pathlib import Path

import click
from flask import Blueprint, current_app
from sqlalchemy import select

from .db import db
from .models import ModelVersion, User

batch_bp = Blueprint("batch_cli", __name__, cli_group="batch")
models_bp = Blueprint("models_cli", __name__, cli_group="models")
CHUNK = 50


@batch_bp.cli.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--metadata", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="HAM10000 metadata CSV.")
@click.option("--user", "email", default=None, help="Uploader (default: the first active admin).")
@click.option("--name", default=None, help="A name for the batch (default: the folder's name).")
def import_folder(folder: Path, metadata: Path | None, email: str | None, name: str | None) -> None:
    """Import every .jpg/.jpeg/.png under FOLDER as one batch; prints a JSON summary."""
    from . import batches
    from .auth import find_user

    if email:
        user = find_user(email)
        if user is None or not user.active:
            raise click.ClickException(f"No active user with email {email}.")
    else:
        user = db.session.scalar(select(User).where(User.role == "admin", User.active.is_(True)).order_by(User.id))
        if user is None:
            raise click.ClickException("No active admin; pass --user EMAIL.")
    if user.role not in ("admin", "researcher"):
        raise click.ClickException(f"{user.email} is a {user.role}; uploads need an admin or researcher.")
    rows = None
    if metadata is not None:
        try:
            rows = batches.parse_metadata_csv(metadata.read_bytes())
        except batches.BatchInputError as exc:
            details = "".join(f"\n  row {r['row']} ({r['image_id']}): {r['error']}" for r in exc.rows[:20])
            raise click.ClickException(exc.message + details) from None
    root = folder.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                   and p.suffix.lower() in batches.IMAGE_EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(root).parts))
    batch = batches.create_batch(user, source="cli", name=name or root.name, expected_files=len(files),
                                 metadata=rows, metadata_filename=metadata.name if metadata else None)
    cap = int(current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024)
    with click.progressbar(length=len(files), label=f"Batch {batch.id}", file=click.get_text_stream("stderr")) as bar:
        for start in range(0, len(files), CHUNK):
            triples = []
            for path in files[start:start + CHUNK]:
                with open(path, "rb") as f:
                    triples.append((str(path.relative_to(root)), f.read(cap + 1), None))
            batches.add_files(batch, triples, user)
            bar.update(len(triples))
    progress = batches.batch_progress(batch)
    click.echo(json.dumps({k: progress[k] for k in ("id", "url", "total", "counts", "duplicates", "errors")}, indent=1))


@models_bp.cli.command("register")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def register(folder: Path) -> None:
    """Register the model artifact in FOLDER (its manifest.json) so that cases can be re-run with it."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise click.ClickException(f"{folder} has no manifest.json; it is not a model artifact.")
    try:
        manifest = json.loads(manifest_path.read_text())
        name, version, classes = str(manifest["name"]), str(manifest["version"]), list(manifest["class_names"])
    except (ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(f"{manifest_path} is not a valid manifest ({exc.__class__.__name__}: {exc}).") from None
    row = db.session.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version))
    if row is None:
        row = ModelVersion(name=name, version=version, trained=bool(manifest.get("trained")),
                           trained_on=manifest.get("trained_on"), class_names=classes, manifest=manifest)
        db.session.add(row)
    row.artifact_path = str(folder.resolve())
    db.session.commit()
    click.echo(f"Model version {row.id}: {name} {version} ({'trained on ' + str(row.trained_on) if row.trained else 'untrained'}) at {row.artifact_path}")


@models_bp.cli.command("list")
def list_versions() -> None:
    """List the registered model versions."""
    for mv in db.session.scalars(select(ModelVersion).order_by(ModelVersion.id)):
        click.echo(f"{mv.id}\t{mv.name}\t{mv.version}\t{'trained' if mv.trained else 'untrained'}\t{mv.artifact_path or ''}")
