"""Account changes shared by the admin page and the command line, each written to the audit log."""

from __future__ import annotations

from sqlalchemy import func, select

from .. import audit
from ..auth.passwords import password_problem
from ..auth.sessions import find_user
from ..db import db
from ..models import ROLES, ApiToken, User, utcnow


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
    _check_password(password, email)
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
        user.end_sessions()  # a session signed in under the old role or state must not go on
        audit.record("user.update", "user", user.id, user=actor, old=old, new=new)
    db.session.commit()
    return user


def _check_password(password: str, email: str) -> None:
    problem = password_problem(password, email)
    if problem is not None:
        raise AccountError(problem)


def change_password(user: User, current: str, new: str, new_again: str) -> User:
    """The user's own change: the current password, then the new one twice. Ends every session
    of the user, the one asking included (the page signs it in again)."""
    if not user.check_password((current or "")[:1024]):
        raise AccountError("The current password is wrong.")
    if new != new_again:
        raise AccountError("The two new passwords differ.")
    if new == current:
        raise AccountError("The new password is the current one; choose another.")
    _check_password(new, user.email)
    user.set_password(new)
    user.end_sessions()
    audit.record("user.password", "user", user.id, user=user)  # never the passwords themselves
    db.session.commit()
    return user


def reset_password(user: User, password: str, actor: User | None) -> User:
    """An operator sets a user's password (`users password`); the user's sessions end."""
    _check_password(password, user.email)
    user.set_password(password)
    user.end_sessions()
    audit.record("user.password", "user", user.id, user=actor, new={"reset": True})
    db.session.commit()
    return user


def end_sessions(user: User) -> None:
    """Signs the user out everywhere (logout): every session cookie issued so far stops working."""
    user.end_sessions()
    db.session.commit()


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
