"""Security headers, CSRF protection and rate limits for every response, in one place.

Headers: a Content-Security-Policy without inline scripts (the templates load their only script,
static/case.js, from a file), `nosniff`, `X-Frame-Options: DENY` (and `frame-ancestors 'none'`),
`Referrer-Policy: same-origin`, a restrictive Permissions-Policy, HSTS in production, and
`Cache-Control: private, no-store` on every answer but static assets: pages, API answers and
patient files (images, explanation maps, CSV exports) stay out of shared and browser caches.
Inline `style=""` attributes stay allowed (`style-src 'unsafe-inline'`): the probability bars set
their width that way, and CSS cannot run code.

CSRF: Flask-WTF's `CSRFProtect` checks every unsafe request's `csrf_token` form field or
`X-CSRF-Token` header; the `/api/v1` blueprint (bearer tokens, no cookies) is exempt.

Rate limits: Flask-Limiter, counting in Redis (`REDIS_URL`, shared by every web process). When
Redis cannot be reached it counts in this process's memory (`in_memory_fallback_enabled`), so a
limit still holds per process and a login never becomes a 500. `login_limit` counts failed logins
per (email, client address) and per client address; `upload_limit` counts uploads and
`explain_limit` queued explanation requests per user.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, current_app, g, request
from flask.json.provider import DefaultJSONProvider
from flask_limiter import Limiter, RateLimitExceeded
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.routing import IntegerConverter

from .errors import error_response

CSRF_MESSAGE = "The form has expired or did not come from this site; reload the page and try again."

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def client_ip() -> str:
    """The peer address. Behind a reverse proxy, wrap the app in werkzeug's ProxyFix so that this
    is the client's address and not the proxy's (see docs/security.md)."""
    return request.remote_addr or "unknown"


def upload_key() -> str:
    """One counter per uploading user (page session or API token)."""
    user = g.get("api_user") or g.get("user")
    return f"user-{user.id}" if user is not None else client_ip()


csrf = CSRFProtect()
limiter = Limiter(key_func=client_ip, key_prefix="dermportal", in_memory_fallback_enabled=True, swallow_errors=True)
# One count per user over every upload route (single image and folder upload; pages and API).
upload_limit = limiter.shared_limit(
    lambda: current_app.config["UPLOAD_RATE_LIMIT"], "uploads", key_func=upload_key, methods=["POST"]
)
# One count per user over the page's and the API's explanation requests; only a request that
# queues work (202 from the API, a "queued" redirect from the page) counts.
explain_limit = limiter.shared_limit(
    lambda: current_app.config["EXPLAIN_RATE_LIMIT"],
    "explanations",
    key_func=upload_key,
    methods=["POST"],
    deduct_when=lambda response: response.status_code == 202 or bool(g.get("explanation_queued")),
)


def retry_after() -> int:
    """Seconds until the limit this request broke lets it through again."""
    breached = limiter.current_limit
    return max(1, int(breached.reset_at - time.time())) if breached is not None else 60


def init_app(app: Flask) -> None:
    """CSRF protection, rate limits and the security headers for `app`."""
    app.config.setdefault("WTF_CSRF_TIME_LIMIT", None)  # a token lives as long as its session
    app.config.update(
        WTF_CSRF_ENABLED=app.config.get("CSRF_ENABLED", True),
        RATELIMIT_STORAGE_URI=app.config["REDIS_URL"],
        RATELIMIT_STORAGE_OPTIONS={
            "socket_connect_timeout": min(app.config["BROKER_TIMEOUT"], 0.5),
            "socket_timeout": app.config["BROKER_TIMEOUT"],
        },
    )
    csrf.init_app(app)
    limiter.init_app(app)
    limiter._storage_dead = False  # one limiter serves every app the factory builds: presume Redis up
    production = app.config.get("PORTAL_ENV") == "production"

    @app.errorhandler(CSRFError)
    def _csrf_failed(exc: CSRFError):
        exc.description = CSRF_MESSAGE
        return error_response(exc)

    @app.errorhandler(RateLimitExceeded)
    def _rate_limited(exc: RateLimitExceeded):
        wait = retry_after()
        if exc.response is None:
            exc.description = f"Too many requests (at most {exc.description}); try again in {wait} seconds."
        response = exc.response if exc.response is not None else error_response(exc)
        response.headers["Retry-After"] = str(wait)
        return response

    @app.after_request
    def _security_headers(response):
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        if production:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
        if request.endpoint != "static":
            # Pages, API answers and patient files (images, maps, exports): in no cache at all,
            # whatever send_file or a view set.
            response.headers["Cache-Control"] = "private, no-store"
        return response


# --- input bounds ------------------------------------------------------------------------------

# Ids are INTEGER columns: PostgreSQL's range ends at 2**31 - 1 (SQLite's at 2**63 - 1). A larger
# id in a URL or a query names no row, and must say so (404, 400), not overflow the driver (500).
ID_MAX = 2**31 - 1


class IdConverter(IntegerConverter):
    """`<int:...>` in every route: a whole number from 0 to ID_MAX; a larger one matches no route (404)."""

    def __init__(self, url_map, *args, **kwargs) -> None:
        kwargs.setdefault("max", ID_MAX)
        super().__init__(url_map, *args, **kwargs)


def query_id(value: str) -> int:
    """`request.args.get(name, type=query_id)`: the id, or ValueError (so None) past the id range."""
    number = int(value)
    if not 0 < number <= ID_MAX:
        raise ValueError(f"{value!r} is not an id")
    return number


class BoundedJSON(DefaultJSONProvider):
    """JSON nested past Python's recursion limit (5,000 deep) is a malformed request (400), not a
    RecursionError (500): Werkzeug turns the ValueError into a 400 for every route."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("The JSON is nested too deeply.") from None


# --- who may use each route --------------------------------------------------------------------

# Audiences: the roles let through. A signed-in session reaches the pages, a bearer token the API.
PUBLIC = ("anonymous", "admin", "researcher", "reviewer")
SIGNED_IN = ("admin", "researcher", "reviewer")
UPLOADERS = ("admin", "researcher")  # models.UPLOAD_ROLES
REVIEWERS = ("admin", "reviewer")  # models.REVIEW_ROLES
ADMINS = ("admin",)
SESSION, TOKEN, EITHER = "session", "token", "session or token"

# Every endpoint of app.url_map: (audience, how it is reached). The route decorators enforce it;
# tests/test_permissions.py calls every route and method as anonymous, each role in a browser
# session and each role's API token, and fails on any answer this table does not predict and on
# any route missing here.
ACCESS: dict[str, tuple[tuple[str, ...], str]] = {
    "static": (PUBLIC, EITHER),
    "auth.login": (PUBLIC, EITHER),
    "auth.logout": (PUBLIC, EITHER),  # signed out or not, it ends at the login page
    "auth.password": (SIGNED_IN, SESSION),
    "cases.home": (SIGNED_IN, SESSION),
    "cases.index": (SIGNED_IN, SESSION),
    "cases.new": (UPLOADERS, SESSION),
    "cases.show": (SIGNED_IN, SESSION),
    "cases.status": (SIGNED_IN, SESSION),
    "cases.stored_file": (SIGNED_IN, EITHER),
    "cases.export_cases_csv": (SIGNED_IN, SESSION),
    "cases.export_cases_json": (SIGNED_IN, SESSION),
    "cases.delete": (ADMINS, SESSION),
    "explanations.request_from_page": (SIGNED_IN, SESSION),
    "explanations.overlay": (SIGNED_IN, EITHER),
    "explanations.raw": (SIGNED_IN, EITHER),
    "batches.batches": (SIGNED_IN, SESSION),
    "batches.new_batch": (UPLOADERS, SESSION),
    "batches.create_batch": (UPLOADERS, SESSION),
    "batches.add_batch_files": (UPLOADERS, SESSION),
    "batches.show_batch": (SIGNED_IN, SESSION),
    "batches.batch_progress": (SIGNED_IN, SESSION),
    "batches.delete": (ADMINS, SESSION),
    "model_versions.rerun_case_page": (UPLOADERS, SESSION),
    "model_versions.rerun_batch_page": (UPLOADERS, SESSION),
    "model_versions.rerun_selection": (UPLOADERS, SESSION),
    "model_versions.index": (SIGNED_IN, SESSION),
    "apidocs.api_docs": (SIGNED_IN, SESSION),
    "review.review_next": (REVIEWERS, SESSION),
    "review.review_skip": (REVIEWERS, SESSION),
    "review.review_case": (REVIEWERS, SESSION),
    "dashboard.dashboard": (SIGNED_IN, SESSION),
    "admin.index": (ADMINS, SESSION),
    "admin.audit_log": (ADMINS, SESSION),
    "admin.add_user": (ADMINS, SESSION),
    "admin.change_user": (ADMINS, SESSION),
    "admin.new_token": (ADMINS, SESSION),
    "admin.revoke": (ADMINS, SESSION),
    "api.health": (PUBLIC, EITHER),
    "api.openapi": (SIGNED_IN, EITHER),
    "api.dashboard_api": (SIGNED_IN, TOKEN),
    "api.model_versions": (SIGNED_IN, TOKEN),
    "api.create": (UPLOADERS, TOKEN),
    "api.list_cases": (SIGNED_IN, TOKEN),
    "api.export_cases": (SIGNED_IN, TOKEN),
    "api.show": (SIGNED_IN, TOKEN),
    "api.delete_one": (ADMINS, TOKEN),
    "api.request_explanation": (SIGNED_IN, TOKEN),
    "api.rerun_case_api": (UPLOADERS, TOKEN),
    "api.rerun_selection": (UPLOADERS, TOKEN),
    "api.list_reviews": (SIGNED_IN, TOKEN),
    "api.put_review": (REVIEWERS, TOKEN),
    "api.create_batch": (UPLOADERS, TOKEN),
    "api.show_batch": (SIGNED_IN, TOKEN),
    "api.add_files": (UPLOADERS, TOKEN),
    "api.rerun_batch_api": (UPLOADERS, TOKEN),
    "api.delete_one_batch": (ADMINS, TOKEN),
}


# --- spreadsheet safety -----------------------------------------------------------------------

# A cell starting with one of these is run as a formula by spreadsheets (CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def looks_like_formula(value: str) -> bool:
    return bool(value) and value.startswith(FORMULA_START)


def neutralise(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: strings starting with = + - @ tab CR get a `'`."""
    if isinstance(value, str) and looks_like_formula(value):
        return "'" + value
    return value
