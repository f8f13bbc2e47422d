"""Error responses: JSON for the API and for clients that ask for it, the error page otherwise."""

from __future__ import annotations

from typing import TypeVar

from flask import Flask, Response, abort, jsonify, make_response, render_template, request
from werkzeug.exceptions import HTTPException

from .db import db

Row = TypeVar("Row")


def wants_json() -> bool:
    """Whether the client asked for JSON (fetch() from the pages' scripts, or an Accept header)."""
    return request.accept_mimetypes.best == "application/json" or request.headers.get("X-Requested-With") == "fetch"


def get_or_404(model: type[Row], row_id: int) -> Row:
    """The row of `model` with this id, or a 404 that names what was not found."""
    row = db.session.get(model, row_id)
    if row is None:
        abort(404, description=f"No {model.__name__.lower()} with id {row_id}.")
    return row


def error_response(exc: HTTPException) -> Response:
    """JSON for the API and for clients that ask for it, the error page otherwise."""
    if request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json":
        return make_response(jsonify({"error": exc.description, "status": exc.code}), exc.code)
    return make_response(render_template("error.html", error=exc), exc.code)


def register_error_pages(app: Flask) -> None:
    app.register_error_handler(HTTPException, error_response)
