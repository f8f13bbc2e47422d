"""Signing in and out of the pages, and changing one's own password.

Failed logins are limited twice: per (email, client address), which stops guessing one account,
and per client address over all accounts, which stops one guess each against many accounts
(spraying). A success clears only the first.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from urllib.parse import urlsplit

from flask import Blueprint, current_app, flash, g, make_response, redirect, render_template, request, session, url_for
from flask_limiter import RequestLimit
from flask_login import login_required, login_user, logout_user

from ..accounts.service import AccountError, change_password, end_sessions
from ..security import client_ip, limiter
from .passwords import PASSWORD_MIN
from .sessions import authenticate, set_g_user

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


def _address_key() -> str:
    """One counter per client address across accounts; hashed like `_login_key`, so that Redis holds
    no addresses."""
    return "address-" + hashlib.sha256(client_ip().encode()).hexdigest()[:32]


def _too_many_failures(limit: RequestLimit):
    wait = max(1, int(limit.reset_at - time.time()))
    flash(f"Too many failed logins; try again in {wait // 60 + 1} minutes.", "error")
    return make_response(render_template("login.html", email=request.form.get("email", "")[:254]), 429)


def _failed(response) -> bool:
    return response.status_code == 401


def _clear_account_failures() -> None:
    """A success clears this account's failures, never the address's count over all accounts."""
    key = _login_key()
    with contextlib.suppress(Exception):  # unless Redis just went down
        for counted in limiter.current_limits:
            if key in counted.request_args:
                counted.limiter.clear(counted.limit, *counted.request_args)


def start_session(user) -> None:
    """A fresh session for `user` that expires PERMANENT_SESSION_LIFETIME after its last use."""
    session.clear()
    session.permanent = True
    login_user(user)


@bp.route("/login", methods=("GET", "POST"))
@limiter.limit(
    lambda: current_app.config["LOGIN_RATE_LIMIT"],
    key_func=_login_key,
    methods=["POST"],
    deduct_when=_failed,
    on_breach=_too_many_failures,
)
@limiter.limit(
    lambda: current_app.config["LOGIN_ADDRESS_RATE_LIMIT"],
    key_func=_address_key,
    methods=["POST"],
    deduct_when=_failed,
    on_breach=_too_many_failures,
)
def login():
    if request.method == "POST":
        email = request.form.get("email", "")[:254]
        user = authenticate(email, request.form.get("password", "")[:1024])
        if user is None:
            flash("Unknown email or wrong password.", "error")
            return render_template("login.html", email=email), 401
        _clear_account_failures()
        start_session(user)
        return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", email="")


@bp.route("/logout", methods=("POST",))
def logout():
    if g.user is not None:
        end_sessions(g.user)  # every cookie of this user, copies included, stops working
    logout_user()
    session.clear()
    return redirect(url_for("auth.login"))


def _user_key() -> str:
    return f"password-user-{g.user.id}" if g.get("user") is not None else client_ip()


@bp.route("/account/password", methods=("GET", "POST"))
@login_required
@limiter.limit(
    lambda: current_app.config["LOGIN_RATE_LIMIT"],
    key_func=_user_key,
    methods=["POST"],
    deduct_when=lambda response: response.status_code == 400,
)
def password():
    """Change one's own password: the current one, then the new one twice. Other sessions end."""
    if request.method == "POST":
        form = request.form
        try:
            change_password(g.user, form.get("current", ""), form.get("new", ""), form.get("new_again", ""))
        except AccountError as exc:
            flash(exc.message, "error")
            return render_template("auth/password.html", password_min=PASSWORD_MIN), 400
        start_session(g.user)
        flash("Password changed; every other session of this account has been signed out.", "info")
        return redirect(url_for("cases.index"))
    return render_template("auth/password.html", password_min=PASSWORD_MIN)
