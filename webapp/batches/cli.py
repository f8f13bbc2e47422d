"""`flask --app webapp batch import FOLDER`: a server-side folder imported as one batch;
`flask --app webapp batch delete ID --reason TEXT --admin EMAIL`: a batch and its cases deleted."""

from __future__ import annotations

import json
from pathlib import Path

import click
from flask import Blueprint, current_app
from sqlalchemy import select

from ..auth.sessions import find_user
from ..cases.cli import run_deletion
from ..cases.deletion import delete_batch
from ..db import db
from ..models import User
from . import service
from .inputs import IMAGE_EXTENSIONS, BatchInputError, parse_metadata_csv

bp = Blueprint("batch_cli", __name__, cli_group="batch")
CHUNK = 50


@bp.cli.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--metadata", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="HAM10000 metadata CSV.")
@click.option("--user", "email", default=None, help="Uploader (default: the first active admin).")
@click.option("--name", default=None, help="A name for the batch (default: the folder's name).")
def import_folder(folder: Path, metadata: Path | None, email: str | None, name: str | None) -> None:
    """Import every .jpg/.jpeg/.png under FOLDER as one batch; prints a JSON summary."""
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
            rows = parse_metadata_csv(metadata.read_bytes())
        except BatchInputError as exc:
            details = "".join(f"\n  row {r['row']} ({r['image_id']}): {r['error']}" for r in exc.rows[:20])
            raise click.ClickException(exc.summary + details) from None
    root = folder.resolve()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and not p.is_symlink()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    batch = service.create_batch(
        user,
        source="cli",
        name=name or root.name,
        expected_files=len(files),
        metadata=rows,
        metadata_filename=metadata.name if metadata else None,
    )
    cap = int(current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024)
    with click.progressbar(length=len(files), label=f"Batch {batch.id}", file=click.get_text_stream("stderr")) as bar:
        for start in range(0, len(files), CHUNK):
            triples = []
            for path in files[start : start + CHUNK]:
                with open(path, "rb") as f:
                    triples.append((str(path.relative_to(root)), f.read(cap + 1), None))
            service.add_files(batch, triples, user)
            bar.update(len(triples))
    progress = service.batch_progress(batch)
    click.echo(json.dumps({k: progress[k] for k in ("id", "url", "total", "counts", "duplicates", "errors")}, indent=1))


@bp.cli.command("delete")
@click.argument("batch_id", type=int)
@click.option("--reason", required=True, help="Why (3-500 characters, no patient data); audited.")
@click.option("--admin", "email", required=True, help="The admin the deletion is recorded under.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete_batch_command(batch_id: int, reason: str, email: str, yes: bool) -> None:
    """Delete batch BATCH_ID with every case it created."""
    run_deletion(delete_batch, "batch", batch_id, reason, email, yes)
