"""The admin page: users (create, role, deactivate), API tokens (issue, revoke), model versions, audit log."""

from __future__ import annotations

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for
from sqlalchemy import select

from ..audit import entry_dict
from ..auth.sessions import role_required
from ..db import db
from ..models import ROLES, ApiToken, AuditEntry, ModelVersion, User
from ..security import query_id
from .service import AccountError, create_user, issue_token, revoke_token, update_user

bp = Blueprint("admin", __name__, url_prefix="/admin")
AUDIT_PAGE = 100


def _user_or_404(user_id: int) -> User:
    user = db.session.get(User, user_id)
    if user is None:
        abort(404, description=f"No user with id {user_id}.")
    return user


@bp.get("")
@role_required("admin")
def index():
    users = db.session.scalars(select(User).order_by(User.id)).all()
    tokens = db.session.scalars(select(ApiToken).order_by(ApiToken.id.desc())).all()
    versions = db.session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
    return render_template("admin/index.html", users=users, tokens=tokens, model_versions=versions, roles=ROLES)


@bp.post("/users")
@role_required("admin")
def add_user():
    try:
        user = create_user(
            request.form.get("email", ""), request.form.get("role", ""), request.form.get("password", ""), g.user
        )
        flash(f"Created {user.role} {user.email}.", "info")
    except AccountError as exc:
        flash(exc.message, "error")
    return redirect(url_for("admin.index"))


@bp.post("/users/<int:user_id>")
@role_required("admin")
def change_user(user_id: int):
    user = _user_or_404(user_id)
    active = request.form.get("active")
    try:
        update_user(
            user,
            g.user,
            role=request.form.get("role") or None,
            active=None if active is None else active in ("1", "true", "on", "yes"),
        )
        flash(f"Updated {user.email}: {user.role}, {'active' if user.active else 'deactivated'}.", "info")
    except AccountError as exc:
        flash(exc.message, "error")
    return redirect(url_for("admin.index"))


@bp.post("/users/<int:user_id>/tokens")
@role_required("admin")
def new_token(user_id: int):
    user = _user_or_404(user_id)
    row, plain = issue_token(user, request.form.get("label"), g.user)
    # Shown once on this response, never put in the (signed, not encrypted) session cookie.
    return render_template("admin/token.html", user=user, token=plain, row=row)


@bp.post("/tokens/<int:token_id>/revoke")
@role_required("admin")
def revoke(token_id: int):
    row = db.session.get(ApiToken, token_id)
    if row is None:
        abort(404, description=f"No token with id {token_id}.")
    revoke_token(row, g.user)
    flash(f"Revoked token {row.id} of {row.user.email}.", "info")
    return redirect(url_for("admin.index"))


@bp.get("/audit")
@role_required("admin")
def audit_log():
    before = request.args.get("before", type=query_id)
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(AUDIT_PAGE)
    if before:
        query = query.where(AuditEntry.id < before)
    entries = db.session.scalars(query).all()
    return render_template(
        "admin/audit.html",
        entries=[entry_dict(e) for e in entries],
        next_before=entries[-1].id if len(entries) == AUDIT_PAGE else None,
    )
