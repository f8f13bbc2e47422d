"""Signing in and out of the pages."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, session, url_for

from ..security import client_ip, login_limiter
from .sessions import find_user, load_logged_in_user

bp = Blueprint("auth", __name__)
bp.before_app_request(load_logged_in_user)


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//") and not urlsplit(target).netloc:
        return target
    return url_for("cases.index")


@bp.route("/login", methods=("GET", "POST"))
def login():
    if request.method == "POST":
        email = request.form.get("email", "")[:254]
        password = request.form.get("password", "")[:1024]
        limiter, ip = login_limiter(), client_ip()
        wait = limiter.retry_after(email, ip)
        if wait:
            flash(f"Too many failed logins; try again in {wait // 60 + 1} minutes.", "error")
            return render_template("login.html", email=email), 429, {"Retry-After": str(wait)}
        user = find_user(email)
        if user is None or not user.active or not user.check_password(password):
            limiter.failed(email, ip)
            flash("Unknown email or wrong password.", "error")
            return render_template("login.html", email=email), 401
        limiter.succeeded(email, ip)
        session.clear()
        session["user_id"] = user.id
        return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", email="")


@bp.route("/logout", methods=("POST",))
def logout():
    session.clear()
    return redirect(url_for("auth.login"))


