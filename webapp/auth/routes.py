"""Signing in and out of the pages; failed logins are rate limited per (email, client address)."""

from __future__ import annotations

import contextlib
import hashlib
import time
from urllib.parse import urlsplit

from flask import Blueprint, current_app, flash, make_response, redirect, render_template, request, session, url_for
from flask_limiter import RequestLimit
from flask_login import login_user, logout_user

from ..security import client_ip, limiter
from .sessions import find_user, set_g_user

bp = Blueprint("auth", __name__)
bp.before_app_request(set_g_user)


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//") and not urlsplit(target).netloc:
        return target
    return url_for("cases.index")


def _login_key() -> str:
    """One counter per (email, client address); a hash, so that Redis holds no email addresses."""
    email = request.form.get("email", "")[:254].strip().lower()
    return hashlib.sha256(f"{email}\0{client_ip()}".encode()).hexdigest()[:32]


def _too_many_failures(limit: RequestLimit):
    wait = max(1, int(limit.reset_at - time.time()))
    flash(f"Too many failed logins; try again in {wait // 60 + 1} minutes.", "error")
    return make_response(render_template("login.html", email=request.form.get("email", "")[:254]), 429)


@bp.route("/login", methods=("GET", "POST"))
@limiter.limit(
    lambda: current_app.config["LOGIN_RATE_LIMIT"],
    key_func=_login_key,
    methods=["POST"],
    deduct_when=lambda response: response.status_code == 401,
    on_breach=_too_many_failures,
)
def login():
    if request.method == "POST":
        email = request.form.get("email", "")[:254]
        password = request.form.get("password", "")[:1024]
        user = find_user(email)
        if user is None or not user.active or not user.check_password(password):
            flash("Unknown email or wrong password.", "error")
            return render_template("login.html", email=email), 401
        with contextlib.suppress(Exception):  # a success clears the failures (unless Redis just went down)
            for counted in limiter.current_limits:
                counted.limiter.clear(counted.limit, *counted.request_args)
        session.clear()
        login_user(user)
        return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", email="")


@bp.route("/logout", methods=("POST",))
def logout():
    logout_user()
    session.clear()
    return redirect(url_for("auth.login"))
