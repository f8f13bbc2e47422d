"""Role checks for pages (the session user) on top of `auth.login_required`."""

from __future__ import annotations

import functools

from flask import abort, g

from .auth import login_required


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
