"""Account changes shared by the admin page and the command line, each written to the audit log."""

from __future__ import annotations

from sqlalchemy import func, select

from .. import audit
from ..auth.sessions import find_user
from ..db import db
from ..models import ROLES, ApiToken, User, utcnow

PASSWORD_MIN = 8


class AccountError(ValueError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _active_admins(excluding: User) -> int:
    return db.session.scalar(
        select(func.count())
        .select_from(User)
        .where(User.role == "admin", User.active.is_(True), User.id != excluding.id)
    )


def create_user(email: str, role: str, password: str, actor: User | None) -> User:
    email = (email or "").strip().lower()
    if "@" not in email or len(email) > 254:
        raise AccountError(f"{email!r} is not an email address.")
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}.")
    if len(password or "") < PASSWORD_MIN:
        raise AccountError(f"The password must have at least {PASSWORD_MIN} characters.")
    if find_user(email) is not None:
        raise AccountError(f"A user with email {email} already exists.")
    user = User(email=email, role=role)
    user.set_password(password)
    db.session.add(user)
    db.session.flush()
    audit.record("user.create", "user", user.id, user=actor, new={"email": email, "role": role})
    db.session.commit()
    return user


def update_user(user: User, actor: User | None, role: str | None = None, active: bool | None = None) -> User:
    """Changes role and/or active state; refuses to leave the portal without an active admin."""
    old = {"role": user.role, "active": user.active}
    if role is not None and role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}.")
    new_role = role if role is not None else user.role
    new_active = active if active is not None else user.active
    if user.role == "admin" and user.active and (new_role != "admin" or not new_active) and _active_admins(user) == 0:
        raise AccountError("This is the last active admin; make another admin first.")
    user.role, user.active = new_role, new_active
    new = {"role": user.role, "active": user.active}
    if new != old:
        audit.record("user.update", "user", user.id, user=actor, old=old, new=new)
    db.session.commit()
    return user


def issue_token(user: User, label: str | None, actor: User | None) -> tuple[ApiToken, str]:
    row, plain = ApiToken.issue(user, (label or "").strip()[:100] or None)
    db.session.add(row)
    db.session.flush()
    audit.record("token.issue", "api_token", row.id, user=actor, new={"user": user.email, "label": row.label})
    db.session.commit()
    return row, plain


def revoke_token(row: ApiToken, actor: User | None) -> ApiToken:
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit.record(
            "token.revoke",
            "api_token",
            row.id,
            user=actor,
            old={"revoked": False},
            new={"revoked": True, "user": row.user.email},
        )
        db.session.commit()
    return row
