#!/usr/bin/env python3
"""Writes requirements-web.lock: the pinned packages the web image needs, and nothing of TensorFlow.

The web process imports Flask and its extensions, spectree and pydantic (the API schemas),
SQLAlchemy, Celery (as a client), redis, Pillow and psycopg2, never ml/ (tested). This walks the
dependency closure of those top-level packages through the metadata of what is installed in .venv,
so the versions are exactly those of requirements.lock. `make lock`
runs it after pinning requirements.lock.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEB_PACKAGES = [
    "flask",
    "flask-sqlalchemy",
    "flask-migrate",
    "flask-login",
    "flask-wtf",
    "flask-limiter",
    "spectree",
    "pydantic",  # spectree's model backend (its "pydantic" extra, which the walk below does not follow)
    "sqlalchemy",
    "alembic",
    "celery",
    "redis",
    "pillow",
    "psycopg2-binary",
    "gunicorn",
    "markdown-it-py",  # model cards on the model-version pages (raw HTML in them is escaped)
    "boto3",  # webapp.storage's S3 backend (STORAGE_BACKEND=s3)
]
FORBIDDEN = {"tensorflow", "tensorflow-cpu", "keras", "shap", "opencv-python-headless", "torch"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    """{canonical name: version} of `roots` and everything they require (markers evaluated here)."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonical(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency that is not installed
        found[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def main() -> int:
    pins = closure(WEB_PACKAGES)
    bad = FORBIDDEN & set(pins)
    if bad:
        print(f"The web requirements would pull in {sorted(bad)}; refusing.", file=sys.stderr)
        return 1
    lines = ["# Pinned by 'make lock' (scripts/lock_web.py): the web image's packages, no TensorFlow."]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    (ROOT / "requirements-web.lock").write_text("\n".join(lines) + "\n")
    print(f"requirements-web.lock: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
