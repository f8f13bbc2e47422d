"""The JSON API (/api/v1): bearer-token auth, JSON errors for every 4xx, never a 500 for bad input."""

from __future__ import annotations

import functools
import time

from flask import Blueprint, g, jsonify, request
from sqlalchemy import text
from werkzeug.exceptions import HTTPException

from .auth import user_from_bearer
from .cases import CaseFields, DuplicateImage, FieldError, UploadError, create_case, parse_case_fields
from .config import DISCLAIMER
from .db import db
from .models import Case
from .presenters import case_dict
from .queue import broker_status, worker_status

bp = Blueprint("api", __name__, url_prefix="/api/v1")


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


@bp.post("/cases")
@token_required
def create():
    if not g.api_user.can_upload:
        return error(403, f"Role {g.api_user.role!r} may not upload cases.")
    file = request.files.get("image")
    if file is None or not file.filename:
        return error(400, "No file: send the image as multipart/form-data field 'image'.")
    try:
        fields: CaseFields = parse_case_fields(request.form)
        case, job = create_case(file.read(), file.filename, fields, g.api_user)
    except FieldError as exc:
        return error(400, exc.message, field=exc.field)
    except UploadError as exc:
        return error(exc.status, exc.message)
    except DuplicateImage as exc:
        return error(409, exc.message, id=exc.case_id, url=f"/api/v1/cases/{exc.case_id}")
    url = f"/api/v1/cases/{case.id}"
    response = jsonify({"id": case.id, "url": url, "status": job.status, "job_id": job.id, "disclaimer": DISCLAIMER})
    response.headers["Location"] = url
    return response, 202


@bp.get("/cases/<int:case_id>")
@token_required
def show(case_id: int):
    case = db.session.get(Case, case_id)
    if case is None:
        return error(404, f"No case with id {case_id}.")
    return jsonify(case_dict(case))


@bp.post("/cases/<int:case_id>/explanations")
@token_required
def request_explanation(case_id: int):
    """Queues an explanation: JSON {"method": "gradcam"|"gradcam++"|"shap", "class": "mel", "analysis_id"?}.

    202 with the queued explanation, 200 when it already exists (queued, running or done).
    """
    from .explanations import ExplanationRequestError, explanation_dict
    from .explanations import request_explanation as request_one

    case = db.session.get(Case, case_id)
    if case is None:
        return error(404, f"No case with id {case_id}.")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        body = request.form.to_dict()
    try:
        row, queued = request_one(case, body.get("method"), body.get("class"), body.get("analysis_id"))
    except ExplanationRequestError as exc:
        return error(exc.status, exc.message)
    return jsonify({**explanation_dict(row), "case_url": f"/api/v1/cases/{case_id}", "disclaimer": DISCLAIMER}), (202 if queued else 200)


@bp.get("/health")
def health():
    """Web, database, broker and worker state; the worker is asked with a short timeout."""
    started = time.monotonic()
    try:
        db.session.execute(text("SELECT 1"))
        database = {"ok": True}
    except Exception as exc:
        db.session.rollback()
        database = {"ok": False, "error": exc.__class__.__name__}
    broker = broker_status()
    worker = worker_status(timeout=1.0) if broker["ok"] else {"ok": False, "workers": [], "error": "broker unreachable"}
    ok = database["ok"] and broker["ok"] and worker["ok"]
    body = {
        "status": "ok" if ok else "degraded",
        "web": {"ok": True},
        "database": database,
        "broker": broker,
        "worker": worker,
        "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
    }
    return jsonify(body), 200 if ok else 503
