"""/api/v1: the portal's health, the dashboard figures and the OpenAPI description."""

from __future__ import annotations

import time

from flask import g, jsonify, request
from spectree import Response
from sqlalchemy import text

from ..auth.sessions import user_from_bearer
from ..config import DISCLAIMER
from ..dashboard.figures import dashboard
from ..db import db
from ..queue import broker_status, worker_status
from .blueprint import bp, error, spec, token_required
from .schemas import Dashboard, DashboardQuery, Health


@bp.get("/health")
@spec.validate(resp=Response(HTTP_200=Health, HTTP_503=(Health, "a part is down")), security={})
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


@bp.get("/dashboard")
@token_required
@spec.validate(query=DashboardQuery, resp=Response(HTTP_200=Dashboard))
def dashboard_api():
    """Model against reference (confusion matrix, sensitivity, balanced accuracy) and reviewer kappa."""
    return jsonify({**dashboard(request.context.query.model_version), "disclaimer": DISCLAIMER})


@bp.get("/openapi.json")
@spec.validate(resp=Response(HTTP_200=(None, "this document")))
def openapi():
    """This API's OpenAPI 3 description (needs a token or a signed-in session)."""
    if g.get("user") is None:
        user, reason = user_from_bearer()
        if user is None:
            response, status = error(401, reason)
            response.headers["WWW-Authenticate"] = 'Bearer realm="dermportal"'
            return response, status
    return jsonify(spec.spec)
