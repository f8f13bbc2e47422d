"""The audit log: who changed what, when, with the old and new values as JSON."""

from __future__ import annotations

import json
from typing import Any

from .db import db
from .models import AuditEntry, User


def record(
    action: str,
    entity: str,
    entity_id: int | None,
    *,
    user: User | None,
    case_id: int | None = None,
    old: dict[str, Any] | None = None,
    new: dict[str, Any] | None = None,
) -> AuditEntry:
    """Adds an entry to the session; it is committed with the change it describes."""
    entry = AuditEntry(
        action=action,
        entity=entity,
        entity_id=entity_id,
        user_id=user.id if user else None,
        case_id=case_id,
        old=old,
        new=new,
    )
    db.session.add(entry)
    return entry


def entry_dict(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": entry.at.isoformat(),
        "user": entry.user.email if entry.user else None,
        "action": entry.action,
        "entity": entry.entity,
        "entity_id": entry.entity_id,
        "case_id": entry.case_id,
        "old": entry.old,
        "new": entry.new,
    }


def as_text(values: dict[str, Any] | None) -> str:
    """An entry's old or new values for a page: JSON as written (no \\u0027 for an apostrophe: Jinja's
    `tojson` escapes for scripts, and the page's own escaping already makes the text safe)."""
    return json.dumps(values, ensure_ascii=False) if values else ""
