"""The API documentation page: the OpenAPI document (spectree) rendered by the server, no CDN."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template
from flask_login import login_required

from .blueprint import spec

bp = Blueprint("apidocs", __name__)
METHODS = ("get", "post", "put", "patch", "delete")


def _ref_name(schema: dict[str, Any] | None) -> str | None:
    ref = (schema or {}).get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref else None


def _type(schema: dict[str, Any]) -> str:
    """A schema's type in a few words: `string`, `integer or null`, `list of CaseRow`, `Dashboard`."""
    if name := _ref_name(schema):
        return name
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    return schema.get("format") or schema.get("type") or "any"


def _body(content: dict[str, Any] | None) -> list[dict[str, str]]:
    return [
        {"media_type": media, "type": _type(value.get("schema", {})), "ref": _ref_name(value.get("schema"))}
        for media, value in (content or {}).items()
    ]


def _operation(path: str, method: str, op: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": path,
        "method": method.upper(),
        "summary": op.get("summary", ""),
        "description": op.get("description", ""),
        "parameters": [
            {
                "name": p["name"],
                "in": p.get("in", ""),
                "required": p.get("required", False),
                "type": _type(p.get("schema", {})),
                "description": p.get("description") or p.get("schema", {}).get("description", ""),
            }
            for p in op.get("parameters", [])
        ],
        "request": _body(op.get("requestBody", {}).get("content")),
        "responses": [
            {"status": status, "description": r.get("description", ""), "bodies": _body(r.get("content"))}
            for status, r in sorted(op.get("responses", {}).items())
        ],
    }


def _schema(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    required = set(schema.get("required", []))
    return {
        "name": name,
        "description": schema.get("description", ""),
        "properties": [
            {
                "name": key,
                "type": _type(value),
                "required": key in required,
                "description": value.get("description", ""),
            }
            for key, value in schema.get("properties", {}).items()
        ],
    }


def document() -> dict[str, Any]:
    """The OpenAPI document as lists the page template walks: operations, then schemas."""
    doc = spec.spec
    operations = [
        _operation(path, method, op)
        for path, item in sorted(doc.get("paths", {}).items())
        for method, op in item.items()
        if method in METHODS
    ]
    schemas = [_schema(n, s) for n, s in sorted(doc.get("components", {}).get("schemas", {}).items())]
    return {"info": doc.get("info", {}), "operations": operations, "schemas": schemas}


@bp.get("/docs/api")
@login_required
def api_docs():
    return render_template("api_docs.html", doc=document())
