"""/api/v1: the portal's health, the dashboard figures and the OpenAPI description."""

from __future__ import annotations

import threading
import time
from typing import Any

from flask import Flask, current_app, g, jsonify, request
from spectree import Response
from sqlalchemy import text

from ..auth.sessions import user_from_bearer
from ..config import DISCLAIMER
from ..dashboard.figures import dashboard
from ..db import db
from ..queue import broker_status, worker_status
from .blueprint import bp, error, spec, token_required
from .schemas import Dashboard, DashboardQuery, Health


class StatusCache:
    """The broker's and the worker's state, asked at most once per HEALTH_CACHE_SECONDS in one
    background thread. A request reads the last answer and never waits on a ping (the worker's
    takes up to a second, and 48 concurrent probes used to stall /login); only the very first
    request of a process waits, once, for the first answer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._checked = 0.0
        self._refresh: threading.Thread | None = None

    def get(self, app: Flask) -> tuple[dict[str, Any], float]:
        """(the last {"broker": ..., "worker": ...}, its age in seconds)."""
        with self._lock:
            stale = time.monotonic() - self._checked > app.config["HEALTH_CACHE_SECONDS"]
            if (self._value is None or stale) and (self._refresh is None or not self._refresh.is_alive()):
                self._refresh = threading.Thread(target=self._ask, args=(app,), name="health", daemon=True)
                self._refresh.start()
            refresh = self._refresh
        if self._value is None:
            refresh.join(timeout=app.config["BROKER_TIMEOUT"] + 2)
        value = self._value or {"broker": {"ok": False, "error": "not checked yet"}, "worker": {"ok": False}}
        return value, round(time.monotonic() - self._checked, 1)

    def _ask(self, app: Flask) -> None:
        broker = broker_status(app)
        worker = worker_status(app, timeout=1.0) if broker["ok"] else {"ok": False, "error": "broker unreachable"}
        self._value, self._checked = {"broker": broker, "worker": worker}, time.monotonic()


def _status_cache() -> StatusCache:
    return current_app.extensions.setdefault("health_status", StatusCache())


def _asked_by_an_admin() -> bool:
    user = g.get("user")
    if user is None and request.headers.get("Authorization"):
        user, _ = user_from_bearer()
    return user is not None and user.role == "admin"


def _quiet(part: dict[str, Any]) -> dict[str, Any]:
    """What anyone may read of a part: up or down (errors and worker names carry host names)."""
    return {"ok": bool(part.get("ok"))}


@bp.get("/health")
@spec.validate(resp=Response(HTTP_200=Health, HTTP_503=(Health, "a part is down")), security={})
def health():
    """Web, database, broker and worker state, from a status refreshed in the background (its age
    in `checked_s_ago`). Anonymous callers see up or down per part; an admin also sees the errors
    and the workers' names."""
    started = time.monotonic()
    try:
        db.session.execute(text("SELECT 1"))
        database = {"ok": True}
    except Exception as exc:
        db.session.rollback()
        database = {"ok": False, "error": exc.__class__.__name__}
    cached, age = _status_cache().get(current_app._get_current_object())
    broker, worker = cached["broker"], cached["worker"]
    if not _asked_by_an_admin():
        broker, worker = _quiet(broker), _quiet(worker)
    ok = database["ok"] and broker["ok"] and worker["ok"]
    body = {
        "status": "ok" if ok else "degraded",
        "web": {"ok": True},
        "database": database,
        "broker": broker,
        "worker": worker,
        "checked_s_ago": age,
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
