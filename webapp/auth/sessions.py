"""Who is asking: the session user of pages (with CSRF tokens on forms), role checks, bearer tokens for the API."""

from __future__ import annotations

import functools
import hmac
import secrets

from flask import abort, current_app, g, redirect, request, session, url_for
from sqlalchemy import func, select

from ..db import db
from ..models import ApiToken, User, hash_token, utcnow

CSRF_FIELD = "csrf_token"


# --- CSRF -------------------------------------------------------------------------------------

def csrf_token() -> str:
    """The session's CSRF token (created on first use); templates put it in every form."""
    if CSRF_FIELD not in session:
        session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return session[CSRF_FIELD]


def check_csrf() -> None:
    """Refuses unsafe requests from forms that do not carry the session's CSRF token."""
    if request.method in ("GET", "HEAD", "OPTIONS") or not current_app.config.get("CSRF_ENABLED", True):
        return
    if request.path.startswith("/api/"):  # bearer tokens, no cookies: not exposed to CSRF
        return
    # The header first: a JavaScript upload is not parsed here, so its view can raise the body limit.
    sent = request.headers.get("X-CSRF-Token") or request.form.get(CSRF_FIELD) or ""
    expected = session.get(CSRF_FIELD) or ""
    if not expected or not hmac.compare_digest(sent, expected):
        abort(400, description="The form has expired or did not come from this site; reload the page and try again.")


# --- sessions ---------------------------------------------------------------------------------

def load_logged_in_user() -> None:
    """Runs before every request: the session's user in `g.user`, then the CSRF check."""
    user_id = session.get("user_id")
    g.user = db.session.get(User, user_id) if user_id is not None else None
    if g.user is not None and not g.user.active:
        session.clear()
        g.user = None
    check_csrf()


def login_required(view):
    @functools.wraps(view)
    def wrapped(**kwargs):
        if g.user is None:
            return redirect(url_for("auth.login", next=request.full_path if request.query_string else request.path))
        return view(**kwargs)

    return wrapped


def role_required(*roles: str):
    """The view needs a signed-in user with one of `roles` (anonymous: redirect to login; else 403)."""

    def decorate(view):
        @functools.wraps(view)
        def wrapped(**kwargs):
            if g.user.role not in roles:
                abort(403, description=f"This page needs the role {' or '.join(roles)}; you are {g.user.role}.")
            return view(**kwargs)

        return login_required(wrapped)

    return decorate


def find_user(email: str) -> User | None:
    return db.session.scalar(select(User).where(func.lower(User.email) == email.strip().lower()))


# --- API tokens ---------------------------------------------------------------------------------

def user_from_bearer() -> tuple[User | None, str | None]:
    """The user of the request's `Authorization: Bearer <token>`, or None and the reason."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        return None, "Missing Authorization header; send 'Authorization: Bearer <token>'."
    if scheme.lower() != "bearer" or not token.strip():
        return None, "Malformed Authorization header; send 'Authorization: Bearer <token>'."
    row = db.session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token.strip())))
    if row is None or row.revoked_at is not None or not row.user.active:
        return None, "Invalid or revoked API token."
    now = utcnow()
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:  # not a write per request
        row.last_used_at = now
        db.session.commit()
    return row.user, None
