"""The /api/v1 blueprint: bearer-token auth, role checks, JSON errors for every 4xx, never a 500 for bad input.

`spec` (spectree) validates each route's request and response against its schemas (`schemas.py`) and
builds the OpenAPI document from them; a request that breaks a schema gets the JSON error shape.
"""

from __future__ import annotations

import functools

from flask import Blueprint, Response, abort, g, jsonify, request
from pydantic import ValidationError
from spectree import SpecTree
from spectree.plugins.flask_plugin import FlaskPlugin
from werkzeug.exceptions import HTTPException

from ..auth.sessions import user_from_bearer
from ..config import DISCLAIMER
from ..models import UPLOAD_ROLES
from ..security import csrf
from .schemas import ErrorBody

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
    """The JSON object of the request as its schema read it, or its form fields."""
    body = getattr(getattr(request, "context", None), "json", None)
    return body.model_dump(by_alias=True, exclude_unset=True) if body is not None else request.form.to_dict()


PHRASES = {
    "missing": "is required",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
}


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """(message, field) of the first error of a schema check, in the words of the services' own errors."""
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"] if not isinstance(part, int)) or None
    if first["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return "The body must be a JSON object.", None
    phrase = PHRASES.get(first["type"], first["msg"].lower())
    got = f", got {first['input']!r:.40}" if first["type"] != "missing" else ""
    return f"{field or 'body'} {phrase}{got}.", field


def refuse_invalid(req, resp, exc, instance, adapter) -> None:
    """spectree's hook after the request check: answers a schema violation with `error()`, not its own body."""
    if exc is not None:
        message, field = validation_message(exc)
        response, status = error(400, message, **({"field": field} if field else {}))
        response.status_code = status
        abort(response)  # an HTTPException without a code: Flask sends the response as it is


class Plugin(FlaskPlugin):
    def validate_response(self, resp, resp_model, skip_validation, force_resp_serialize):
        if isinstance(resp, Response) and resp.is_streamed:  # a CSV download stays a stream
            return resp, None
        response, exc = super().validate_response(resp, resp_model, skip_validation, force_resp_serialize)
        if exc is not None:  # our bug, logged by spectree's `after` hook: answered in our shape, not the library's
            response = error(500, "The answer did not match its documented schema.")[0]
            response.status_code = 500
        return response, exc

    def get_func_operation_id(self, func, path, method):
        return f"{func.__name__}.{method.lower()}"


spec = SpecTree(
    "flask",
    backend=Plugin,
    mode="strict",  # the routes decorated with spec.validate: every /api/v1 route (a test checks)
    before=refuse_invalid,
    validation_error_status=400,
    validation_error_model=ErrorBody,
    naming_strategy=lambda model: model.__name__,
    nested_naming_strategy=lambda _parent, child: child,
    title="Dermoscopy research portal API",
    version="1",
    description=f"{DISCLAIMER} Every prediction names its model name, version and training data.",
    security_schemes=[
        {
            "name": "bearer",
            "data": {
                "type": "http",
                "scheme": "bearer",
                "description": "flask --app webapp users token EMAIL, or the admin page",
            },
        }
    ],
    security={"bearer": []},
)
