"""The OpenAPI document that spectree builds from the API's schemas, and the schema checks on requests."""

from __future__ import annotations

import re

import pytest
from portal_helpers import login
from research_helpers import model_version, seed_case

from webapp.config import DISCLAIMER

UPLOADS = {("/api/v1/cases", "post"), ("/api/v1/batches", "post"), ("/api/v1/batches/{batch_id}/files", "post")}


def test_every_api_route_is_in_the_document(app, client, auth_headers):
    spec = client.get("/api/v1/openapi.json", headers=auth_headers).json
    assert spec["openapi"].startswith("3.")
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1"):
            path = re.sub(r"<(?:\w+(?:\([^)]*\))?:)?(\w+)>", r"{\1}", rule.rule)
            routes |= {(path, method.lower()) for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes and routes == documented
    assert not [r.rule for r in app.url_map.iter_rules() if "apidoc" in r.rule]  # no page pulling a CDN


def test_document_has_security_disclaimer_schemas_and_multipart_uploads(client, auth_headers):
    spec = client.get("/api/v1/openapi.json", headers=auth_headers).json
    assert DISCLAIMER in spec["info"]["description"]
    assert spec["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "flask --app webapp users token EMAIL, or the admin page",
    }
    assert spec["paths"]["/api/v1/health"]["get"]["security"] == []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op["summary"] and "security" not in op or path == "/api/v1/health", (path, method)
            content = op.get("requestBody", {}).get("content", {})
            assert ("multipart/form-data" in content) == ((path, method) in UPLOADS), (path, method)
            error = op["responses"]["400"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorBody"}, (path, method)
    schemas = spec["components"]["schemas"]
    assert {"CaseBody", "BatchProgress", "ReviewBody", "ModelVersionList", "Health", "ErrorBody"} <= set(schemas)
    put = spec["paths"]["/api/v1/cases/{case_id}/reviews"]["put"]
    assert put["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ReviewRequest"}
    listing = {p["name"] for p in spec["paths"]["/api/v1/cases"]["get"]["parameters"]}
    assert {"q", "predicted", "age_min", "sort", "per_page", "cursor"} <= listing


def test_document_needs_a_token_or_a_session(client, researcher):
    assert client.get("/api/v1/openapi.json").status_code == 401
    login(client, researcher)
    assert client.get("/api/v1/openapi.json").status_code == 200


@pytest.mark.parametrize(
    "body, message, field",
    [
        ({"model_version_id": "abc"}, "model_version_id must be a whole number, got 'abc'.", "model_version_id"),
        ({}, "model_version_id is required.", "model_version_id"),
        ([1, 2], "The body must be a JSON object.", None),
    ],
)
def test_a_request_that_breaks_its_schema_gets_the_json_error_shape(app, client, auth_headers, body, message, field):
    case_id = seed_case(app, top="nv", mv_id=model_version(app))
    response = client.post(f"/api/v1/cases/{case_id}/rerun", json=body, headers=auth_headers)
    expected = {"error": message, "status": 400, **({"field": field} if field else {})}
    assert response.status_code == 400 and response.json == expected


def test_schema_checks_run_after_the_token_check(client, auth_headers):
    assert client.put("/api/v1/cases/1/reviews", json={"diagnosis": ["mel"]}).status_code == 401
    response = client.get("/api/v1/dashboard?model_version=x", headers=auth_headers)
    assert response.status_code == 400 and response.json["field"] == "model_version"
    response = client.post("/api/v1/cases/1/explanations", json={"class": 7}, headers=auth_headers)
    assert response.json == {"error": "class must be a string, got 7.", "status": 400, "field": "class"}


def test_an_answer_that_breaks_its_schema_is_a_json_500(app, client, auth_headers, monkeypatch):
    monkeypatch.setattr("webapp.api.batches.batch_service.batch_progress", lambda batch: {"id": "not a number"})
    client.post("/api/v1/batches", data={"name": "empty"}, headers=auth_headers)
    response = client.get("/api/v1/batches/1", headers=auth_headers)
    assert response.status_code == 500 and response.json["status"] == 500 and "schema" in response.json["error"]
