"""/api/v1/cases: upload one image, read a case, request an explanation, list and export the history."""

from __future__ import annotations

from collections.abc import Callable

from flask import g, jsonify, request, url_for
from spectree import Response

from ..cases.deletion import Deletion, DeletionError, delete_case
from ..cases.explanations import ExplanationRequestError
from ..cases.explanations import request_explanation as request_one
from ..cases.export import csv_response
from ..cases.intake import DuplicateImage, FieldError, UploadError, create_case, parse_case_fields
from ..cases.listing import FilterError, fetch_page, parse_filters
from ..config import DISCLAIMER
from ..errors import get_or_404
from ..models import Case
from ..presenters import case_dict, explanation_dict
from ..review import blind
from ..security import explain_limit, upload_limit
from ..similar.service import add_similar_cases
from .blueprint import bp, error, request_body, spec, token_required
from .schemas import (
    CaseBody,
    CaseFilters,
    CasePage,
    CaseQueued,
    CaseUpload,
    DeletionRequest,
    DeletionResult,
    ErrorBody,
    ExplanationBody,
    ExplanationRequest,
)


@bp.post("/cases")
@token_required
@upload_limit
@spec.validate(
    form=CaseUpload,
    resp=Response(HTTP_202=CaseQueued, HTTP_403=ErrorBody, HTTP_409=ErrorBody, HTTP_413=ErrorBody, HTTP_415=ErrorBody),
)
def create():
    """Uploads one image as a case (multipart `image`, optional `age`, `sex`, `site`, references); 202 when queued."""
    if not g.api_user.can_upload:
        return error(403, f"Role {g.api_user.role!r} may not upload cases.")
    file = request.files.get("image")
    if file is None or not file.filename:
        return error(400, "No file: send the image as multipart/form-data field 'image'.")
    try:
        fields = parse_case_fields(request.form)
        case, job = create_case(file.read(), file.filename, fields, g.api_user)
    except FieldError as exc:
        return error(400, exc.message, field=exc.field)
    except UploadError as exc:
        return error(exc.status, exc.message)
    except DuplicateImage as exc:
        return error(409, exc.message, id=exc.case_id, url=f"/api/v1/cases/{exc.case_id}")
    url = f"/api/v1/cases/{case.id}"
    response = jsonify({"id": case.id, "url": url, "status": job.status, "job_id": job.id, "disclaimer": DISCLAIMER})
    response.headers["Location"] = url
    return response, 202


@bp.get("/cases/<int:case_id>")
@token_required
@spec.validate(resp=Response(HTTP_200=CaseBody, HTTP_404=ErrorBody))
def show(case_id: int):
    """The case with its images, jobs, analyses (probabilities, model, explanations) and reviews."""
    case = get_or_404(Case, case_id)
    body = case_dict(case)
    add_similar_cases(body["analyses"], g.api_user)
    return jsonify(blind.hide_from(g.api_user, body))


@bp.delete("/cases/<int:case_id>")
@token_required
@spec.validate(
    query=DeletionRequest,
    json=DeletionRequest,
    resp=Response(HTTP_200=DeletionResult, HTTP_403=ErrorBody, HTTP_404=ErrorBody),
)
def delete_one(case_id: int):
    """Deletes the case with its image, results, maps and reviews (admin only); `reason` is required and audited."""
    return deletion_response(delete_case, case_id)


def deletion_response(delete: Callable[..., Deletion], entity_id: int):
    """Calls `delete(entity_id, user, reason)` with the reason from the query or the JSON body
    (spectree checks no body on DELETE), and answers with what went or the service's refusal."""
    body = request.get_json(silent=True)
    reason = request.args.get("reason") or (body.get("reason") if isinstance(body, dict) else None)
    try:
        result = delete(entity_id, g.api_user, reason)
    except DeletionError as exc:
        return error(exc.status, exc.message, **({"field": "reason"} if exc.status == 400 else {}))
    return jsonify(result.as_dict())


@bp.post("/cases/<int:case_id>/explanations")
@token_required
@explain_limit
@spec.validate(
    json=ExplanationRequest,
    resp=Response(
        HTTP_200=ExplanationBody, HTTP_202=ExplanationBody, HTTP_403=ErrorBody, HTTP_404=ErrorBody, HTTP_409=ErrorBody
    ),
)
def request_explanation(case_id: int):
    """Queues an explanation: JSON {"method": "gradcam"|"gradcam++"|"shap", "class": "mel", "analysis_id"?}.

    202 with the queued explanation, 200 when it already exists (queued, running or done).
    """
    case = get_or_404(Case, case_id)
    body = request_body()
    if blind.is_blinded(g.api_user, case_id):
        return error(403, blind.NOTE)
    try:
        row, queued = request_one(case, body.get("method"), body.get("class"), body.get("analysis_id"))
    except ExplanationRequestError as exc:
        return error(exc.status, exc.message)
    return jsonify({**explanation_dict(row), "case_url": f"/api/v1/cases/{case_id}", "disclaimer": DISCLAIMER}), (
        202 if queued else 200
    )


@bp.get("/cases")
@token_required
@spec.validate(query=CaseFilters, resp=Response(HTTP_200=CasePage))
def list_cases():
    """The filtered case list with metadata, predictions and reviews, paginated by cursor."""
    try:
        filters = parse_filters(request.args)
        page = fetch_page(filters, g.api_user, with_reviews=True)
    except FilterError as exc:
        return error(400, exc.message, field=exc.field)
    next_url = url_for("api.list_cases", **filters.query_args(cursor=page.next_cursor)) if page.next_cursor else None
    return jsonify(
        {
            "cases": page.rows,
            "total": page.total,
            "per_page": filters.per_page,
            "next_cursor": page.next_cursor,
            "next": next_url,
            "filters": filters.query_args(cursor=""),
            "disclaimer": DISCLAIMER,
        }
    )


@bp.get("/cases.csv")
@token_required
@spec.validate(query=CaseFilters, resp=Response(HTTP_200=(None, "CSV (text/csv), streamed")))
def export_cases():
    """The filtered case list as CSV (every match; cells neutralised against spreadsheet formulas)."""
    try:
        return csv_response(request.args, g.api_user)
    except FilterError as exc:
        return error(400, exc.message, field=exc.field)
