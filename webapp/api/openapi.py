"""The OpenAPI 3 description of /api/v1, served at /api/v1/openapi.json.

The routes and methods come from the app's URL map, so every /api/v1 route appears (a test checks
it); the descriptions come from `DETAILS` where written out, else from the view's docstring.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask

from ..config import DISCLAIMER

ERROR = {"$ref": "#/components/responses/Error"}
JSON_BODY = {"content": {"application/json": {"schema": {"type": "object"}}}}
FILTER_PARAMS = [
    (
        "q",
        "string",
        "prefix (case-sensitive) of a lesion or patient reference or a file name; '#123' or '123' for a case id",
    ),
    ("predicted", "string", "predicted top class (e.g. mel), by any model version or by `model_version`"),
    ("model_version", "integer", "model version id"),
    ("reference", "string", "reference diagnosis: a dx class, 'any' or 'none'"),
    ("review", "string", "unreviewed | reviewed | reviewed_by_me | not_reviewed_by_me"),
    ("agreement", "string", "agree | disagree (reviewers with the model) | matches_reference | differs_from_reference"),
    ("status", "string", "queued | running | succeeded | failed (analysis jobs)"),
    ("date_from", "string", "uploaded on or after (YYYY-MM-DD)"),
    ("date_to", "string", "uploaded on or before (YYYY-MM-DD)"),
    ("age_min", "integer", "0-120"),
    ("age_max", "integer", "0-120"),
    ("sex", "string", "male | female | unknown"),
    ("site", "string", "HAM10000 localization"),
    ("batch", "integer", "batch id"),
    ("uploader", "integer", "user id"),
    ("sort", "string", "newest | oldest | age | -age"),
    ("per_page", "integer", "1-200 (default 50)"),
    ("cursor", "string", "the `next_cursor` of the previous page"),
]
BATCH_FORM = {
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "metadata": {
                        "type": "string",
                        "format": "binary",
                        "description": "HAM10000 CSV: image_id, lesion_id, dx, dx_type, age, sex, localization",
                    },
                    "archive": {
                        "type": "string",
                        "format": "binary",
                        "description": "one .zip of images (and optionally the CSV)",
                    },
                    "name": {"type": "string"},
                    "expected_files": {"type": "integer"},
                },
            }
        }
    }
}
DETAILS: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/v1/batches", "post"): {
        "summary": "Create a batch (files, a zip, a metadata CSV)",
        "requestBody": BATCH_FORM,
        "responses": {
            "201": {"description": "empty batch created: {id, url, files_url}"},
            "202": {"description": "files stored and queued: {id, url, received, stored, duplicates, errors}"},
            "400": ERROR,
            "413": ERROR,
            "415": ERROR,
        },
    },
    ("/api/v1/batches/{batch_id}/files", "post"): {
        "summary": "Add a chunk of images to a batch",
        "requestBody": BATCH_FORM,
    },
    ("/api/v1/batches/{batch_id}", "get"): {
        "summary": "Batch progress",
        "responses": {
            "200": {
                "description": "{id, total, counts: {queued, running, done, failed}, case_ids, errors: [{file, error}]}"
            },
            "404": ERROR,
        },
    },
    ("/api/v1/cases", "get"): {
        "summary": "Filtered, paginated case list",
        "filters": True,
        "responses": {"200": {"description": "{cases, total, per_page, next_cursor, next, filters}"}, "400": ERROR},
    },
    ("/api/v1/cases.csv", "get"): {
        "summary": "Filtered case list as CSV",
        "filters": True,
        "responses": {"200": {"description": "CSV", "content": {"text/csv": {}}}, "400": ERROR},
    },
    ("/api/v1/cases/rerun", "post"): {
        "summary": "Re-run the filtered selection with a model version",
        "filters": True,
        "requestBody": JSON_BODY,
    },
    ("/api/v1/cases/{case_id}/reviews", "put"): {
        "summary": "Create or update the caller's review",
        "requestBody": JSON_BODY,
    },
    ("/api/v1/cases", "post"): {
        "summary": "Upload one image as a case (multipart `image`, `age`, `sex`, `site`, refs)",
        "responses": {"202": {"description": "queued"}, "400": ERROR, "409": ERROR, "413": ERROR, "415": ERROR},
    },
}


def _openapi_path(rule: str) -> tuple[str, list[dict[str, Any]]]:
    params = []

    def replace(match: re.Match) -> str:
        converter, name = match.group(1), match.group(2)
        params.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "integer" if converter == "int" else "string"},
            }
        )
        return "{" + name + "}"

    return re.sub(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>", replace, rule), params


def build_spec(app: Flask) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if not rule.rule.startswith("/api/v1"):
            continue
        path, params = _openapi_path(rule.rule)
        view = app.view_functions.get(rule.endpoint)
        doc = " ".join(((view.__doc__ or "").strip().split("\n\n")[0]).split()) if view else ""
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            detail = dict(DETAILS.get((path, method.lower()), {}))
            operation: dict[str, Any] = {
                "operationId": f"{rule.endpoint}.{method.lower()}",
                "summary": detail.pop("summary", None) or doc or rule.endpoint,
                "description": doc,
                "responses": detail.pop("responses", None) or {"200": {"description": "OK"}, "4XX": ERROR},
            }
            parameters = list(params)
            if detail.pop("filters", False):
                parameters += [
                    {"name": n, "in": "query", "schema": {"type": t}, "description": d} for n, t, d in FILTER_PARAMS
                ]
            if parameters:
                operation["parameters"] = parameters
            operation.update(detail)
            if rule.endpoint.endswith("health"):
                operation["security"] = []
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Dermoscopy research portal API",
            "version": "1",
            "description": f"{DISCLAIMER} Every prediction names its model name, version and training data.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "flask --app webapp users token EMAIL, or the admin page",
                }
            },
            "responses": {
                "Error": {
                    "description": "error",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
                            }
                        }
                    },
                }
            },
        },
    }
