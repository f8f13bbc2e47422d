"""/api/v1: the model versions, and re-running cases, batches and selections with one of them."""

from __future__ import annotations

from flask import g, jsonify, request
from spectree import Response
from sqlalchemy import select

from ..cases.listing import FilterError, parse_filters
from ..db import db
from ..errors import get_or_404
from ..model_versions.service import RerunError, model_version_or_error, rerun_batch, rerun_case, rerun_filtered
from ..models import Batch, Case, ModelVersion
from .blueprint import bp, error, request_body, spec, token_required, uploader_required
from .schemas import CaseFilters, ErrorBody, ModelVersionList, RerunRequest, RerunResult

RERUN = Response(HTTP_202=RerunResult, HTTP_403=ErrorBody, HTTP_404=ErrorBody)


@bp.get("/model-versions")
@token_required
@spec.validate(resp=Response(HTTP_200=ModelVersionList))
def model_versions():
    """The registered model versions: name, version, training data, class names (no server paths)."""
    rows = db.session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
    return jsonify(
        {
            "model_versions": [
                {
                    "id": mv.id,
                    "name": mv.name,
                    "version": mv.version,
                    "trained": mv.trained,
                    "trained_on": mv.trained_on,
                    "class_names": mv.class_names,
                    "created": mv.created_at.isoformat(),
                }
                for mv in rows
            ]
        }
    )


@bp.post("/batches/<int:batch_id>/rerun")
@uploader_required
@spec.validate(json=RerunRequest, resp=RERUN)
def rerun_batch_api(batch_id: int):
    """Re-runs the batch's images with another model version: JSON {"model_version_id"}."""
    get_or_404(Batch, batch_id)
    try:
        return jsonify(
            rerun_batch(batch_id, model_version_or_error(request_body().get("model_version_id")), g.api_user)
        ), 202
    except RerunError as exc:
        return error(exc.status, exc.message)


@bp.post("/cases/rerun")
@uploader_required
@spec.validate(query=CaseFilters, json=RerunRequest, resp=RERUN)
def rerun_selection():
    """Re-runs every case matching the query-string filters: JSON {"model_version_id"}."""
    try:
        filters = parse_filters(request.args)
        return jsonify(
            rerun_filtered(filters, model_version_or_error(request_body().get("model_version_id")), g.api_user)
        ), 202
    except FilterError as exc:
        return error(400, exc.message, field=exc.field)
    except RerunError as exc:
        return error(exc.status, exc.message)


@bp.post("/cases/<int:case_id>/rerun")
@uploader_required
@spec.validate(json=RerunRequest, resp=RERUN)
def rerun_case_api(case_id: int):
    """Re-runs one case with another model version: JSON {"model_version_id"}."""
    get_or_404(Case, case_id)
    try:
        return jsonify(
            rerun_case(case_id, model_version_or_error(request_body().get("model_version_id")), g.api_user)
        ), 202
    except RerunError as exc:
        return error(exc.status, exc.message)
