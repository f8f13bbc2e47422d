"""The research part of the JSON API (/api/v1): batches, the case list and export, reviews, re-runs,
the dashboard figures, model versions and the OpenAPI description. Bearer tokens, JSON errors."""

from __future__ import annotations

import functools

from flask import Blueprint, g, jsonify, request, url_for
from sqlalchemy import select
from werkzeug.exceptions import HTTPException

from . import batches as batch_service
from .api import error, token_required
from .batches import BatchInputError
from .caselist import FilterError, fetch_page, parse_filters, review_dict
from .config import DISCLAIMER
from .db import db
from .metrics import dashboard
from .models import UPLOAD_ROLES, Batch, Case, ModelVersion, Review
from .reruns import RerunError, model_version_or_error, rerun_batch, rerun_case, rerun_filtered
from .reviews import ReviewError, can_review, save_review

bp = Blueprint("api_portal", __name__, url_prefix="/api/v1")


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException):
    return error(exc.code or 500, exc.description or exc.name)


def uploader_required(view):
    @functools.wraps(view)
    def wrapped(**kwargs):
        if g.api_user.role not in UPLOAD_ROLES:
            return error(403, f"Role {g.api_user.role!r} may not upload or re-run cases.")
        return view(**kwargs)

    return token_required(wrapped)


def _body() -> dict:
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else request.form.to_dict()


# --- batches ------------------------------------------------------------------------------------

@bp.post("/batches")
@uploader_required
def create_batch():
    """Creates a batch from multipart `images` (many), optional `metadata` (HAM10000 CSV) or one `archive` (zip).

    201 for an empty batch (add files with POST /batches/<id>/files), 202 when files were stored and queued.
    """
    from flask import request as req

    req.max_content_length = batch_service.limit("BATCH_MAX_REQUEST_MB") * 1024 * 1024
    try:
        batch, items = batch_service.batch_from_request(req, g.api_user, "api")
    except BatchInputError as exc:
        return error(exc.status, exc.message, **({"rows": exc.rows} if exc.rows else {}))
    url = f"/api/v1/batches/{batch.id}"
    response = jsonify({"id": batch.id, "url": url, "files_url": f"{url}/files", **batch_service.items_summary(items)})
    response.headers["Location"] = url
    return response, 202 if items else 201


@bp.post("/batches/<int:batch_id>/files")
@uploader_required
def add_files(batch_id: int):
    """Adds a chunk of multipart `images` to a batch."""
    request.max_content_length = batch_service.limit("BATCH_MAX_REQUEST_MB") * 1024 * 1024
    batch = db.session.get(Batch, batch_id)
    if batch is None:
        return error(404, f"No batch with id {batch_id}.")
    try:
        items = batch_service.chunk_from_request(request, batch, g.api_user)
    except BatchInputError as exc:
        return error(exc.status, exc.message)
    return jsonify({"id": batch.id, "url": f"/api/v1/batches/{batch.id}", **batch_service.items_summary(items)}), 202


@bp.get("/batches/<int:batch_id>")
@token_required
def show_batch(batch_id: int):
    """Progress: total, counts (queued, running, done, failed), case_ids and per-file errors."""
    batch = db.session.get(Batch, batch_id)
    if batch is None:
        return error(404, f"No batch with id {batch_id}.")
    return jsonify(batch_service.batch_progress(batch))


@bp.post("/batches/<int:batch_id>/rerun")
@uploader_required
def rerun_batch_api(batch_id: int):
    """Re-runs the batch's images with another model version: JSON {"model_version_id"}."""
    if db.session.get(Batch, batch_id) is None:
        return error(404, f"No batch with id {batch_id}.")
    try:
        return jsonify(rerun_batch(batch_id, model_version_or_error(_body().get("model_version_id")), g.api_user)), 202
    except RerunError as exc:
        return error(exc.status, exc.message)


# --- cases ----------------------------------------------------------------------------------------

@bp.get("/cases")
@token_required
def list_cases():
    """The filtered case list with metadata, predictions and reviews, paginated by cursor."""
    try:
        filters = parse_filters(request.args)
        page = fetch_page(filters, g.api_user, with_reviews=True)
    except FilterError as exc:
        return error(400, exc.message, field=exc.field)
    next_url = url_for("api_portal.list_cases", **filters.query_args(cursor=page.next_cursor)) if page.next_cursor else None
    return jsonify({"cases": page.rows, "total": page.total, "per_page": filters.per_page,
                    "next_cursor": page.next_cursor, "next": next_url, "filters": filters.query_args(cursor=""),
                    "disclaimer": DISCLAIMER})


@bp.get("/cases.csv")
@token_required
def export_cases():
    """The filtered case list as CSV (every match; cells neutralised against spreadsheet formulas)."""
    from .portal import csv_response

    try:
        return csv_response(request.args, g.api_user)
    except FilterError as exc:
        return error(400, exc.message, field=exc.field)


@bp.post("/cases/rerun")
@uploader_required
def rerun_selection():
    """Re-runs every case matching the query-string filters: JSON {"model_version_id"}."""
    try:
        filters = parse_filters(request.args)
        return jsonify(rerun_filtered(filters, model_version_or_error(_body().get("model_version_id")), g.api_user)), 202
    except FilterError as exc:
        return error(400, exc.message, field=exc.field)
    except RerunError as exc:
        return error(exc.status, exc.message)


@bp.post("/cases/<int:case_id>/rerun")
@uploader_required
def rerun_case_api(case_id: int):
    """Re-runs one case with another model version: JSON {"model_version_id"}."""
    if db.session.get(Case, case_id) is None:
        return error(404, f"No case with id {case_id}.")
    try:
        return jsonify(rerun_case(case_id, model_version_or_error(_body().get("model_version_id")), g.api_user)), 202
    except RerunError as exc:
        return error(exc.status, exc.message)


@bp.get("/cases/<int:case_id>/reviews")
@token_required
def list_reviews(case_id: int):
    if db.session.get(Case, case_id) is None:
        return error(404, f"No case with id {case_id}.")
    reviews = db.session.scalars(select(Review).where(Review.case_id == case_id).order_by(Review.id)).all()
    return jsonify({"case_id": case_id, "reviews": [review_dict(r) for r in reviews]})


@bp.put("/cases/<int:case_id>/reviews")
@token_required
def put_review(case_id: int):
    """Creates or updates the caller's review: JSON {"diagnosis", "agrees_with_model", "confidence", "notes"}."""
    if not can_review(g.api_user):
        return error(403, f"Role {g.api_user.role!r} may not review cases.")
    case = db.session.get(Case, case_id)
    if case is None:
        return error(404, f"No case with id {case_id}.")
    try:
        review, created = save_review(case, g.api_user, _body())
    except ReviewError as exc:
        return error(400, exc.message, field=exc.field)
    return jsonify(review_dict(review)), 201 if created else 200


# --- figures and model versions -----------------------------------------------------------------------

@bp.get("/dashboard")
@token_required
def dashboard_api():
    """Model against reference (confusion matrix, sensitivity, balanced accuracy) and reviewer kappa."""
    return jsonify({**dashboard(request.args.get("model_version", type=int)), "disclaimer": DISCLAIMER})


@bp.get("/model-versions")
@token_required
def model_versions():
    rows = db.session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
    return jsonify({"model_versions": [
        {"id": mv.id, "name": mv.name, "version": mv.version, "trained": mv.trained, "trained_on": mv.trained_on,
         "class_names": mv.class_names, "artifact_path": mv.artifact_path, "created": mv.created_at.isoformat()}
        for mv in rows]})


@bp.get("/openapi.json")
def openapi():
    """This API's OpenAPI 3 description (needs a token or a signed-in session)."""
    from .auth import user_from_bearer
    from .openapi import build_spec

    if g.get("user") is None:
        user, reason = user_from_bearer()
        if user is None:
            response, status = error(401, reason)
            response.headers["WWW-Authenticate"] = 'Bearer realm="dermportal"'
            return response, status
    from flask import current_app

    return jsonify(build_spec(current_app))
