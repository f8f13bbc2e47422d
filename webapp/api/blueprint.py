"""The /api/v1 blueprint: bearer-token auth, role checks, JSON errors for every 4xx, never a 500 for bad input."""

from __future__ import annotations

import functools

from flask import Blueprint, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ..auth.sessions import user_from_bearer
from ..models import UPLOAD_ROLES
from ..security import csrf

bp = Blueprint("api", __name__, url_prefix="/api/v1")
csrf.exempt(bp)  # bearer tokens, no cookies: not exposed to CSRF


def error(status: int, message: str, **extra):
    return jsonify({"error": message, "status": status, **extra}), status


def token_required(view):
    @functools.wraps(view)
    def wrapped(**kwargs):
        user, reason = user_from_bearer()
        if user is None:
            response, status = error(401, reason)
            response.headers["WWW-Authenticate"] = 'Bearer realm="dermportal"'
            return response, status
        g.api_user = user
        return view(**kwargs)

    return wrapped


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException):
    return error(exc.code or 500, exc.description or exc.name)


def uploader_required(view):
    """Like `token_required`, and the token's user must have an upload role."""

    @functools.wraps(view)
    def wrapped(**kwargs):
        if g.api_user.role not in UPLOAD_ROLES:
            return error(403, f"Role {g.api_user.role!r} may not upload or re-run cases.")
        return view(**kwargs)

    return token_required(wrapped)


def request_body() -> dict:
    """The JSON object of the request, or its form fields."""
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else request.form.to_dict()
