"""`flask --app webapp similar rebuild-index`: the similar-case indexes rebuilt from the database."""

from __future__ import annotations

import json

import click
from flask import Blueprint

from .service import rebuild_all

bp = Blueprint("similar_cli", __name__, cli_group="similar")


@bp.cli.command("rebuild-index")
def rebuild_index() -> None:
    """Rebuilds every model version's index from the stored embeddings and writes it to the instance
    folder; running processes pick up rows they miss before each search, and a restart loads it."""
    click.echo(json.dumps({"vectors_per_model_version": rebuild_all()}))
