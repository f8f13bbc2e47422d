"""/api/v1/batches: folder uploads (files, metadata CSV or a zip archive) and their progress."""

from __future__ import annotations

import functools

from flask import g, jsonify, request
from spectree import Response

from ..batches import service as batch_service
from ..batches.service import BatchInputError
from ..cases.deletion import delete_batch
from ..errors import get_or_404
from ..models import Batch
from ..security import upload_limit
from .blueprint import bp, error, spec, token_required, uploader_required
from .cases import deletion_response
from .schemas import BatchCreated, BatchFiles, BatchProgress, BatchUpload, DeletionRequest, DeletionResult, ErrorBody


def batch_size_limit(view):
    """Raises the request size limit to BATCH_MAX_REQUEST_MB before anything reads the form."""

    @functools.wraps(view)
    def wrapped(**kwargs):
        request.max_content_length = batch_service.limit("BATCH_MAX_REQUEST_MB") * 1024 * 1024
        return view(**kwargs)

    return wrapped


@bp.post("/batches")
@uploader_required
@upload_limit
@batch_size_limit
@spec.validate(
    form=BatchUpload,
    resp=Response(
        HTTP_201=(BatchCreated, "an empty batch: add files at files_url"),
        HTTP_202=(BatchCreated, "files stored and queued"),
        HTTP_403=ErrorBody,
        HTTP_413=ErrorBody,
        HTTP_415=ErrorBody,
    ),
)
def create_batch():
    """Creates a batch from multipart `images` (many), optional `metadata` (HAM10000 CSV) or one `archive` (zip).

    201 for an empty batch (add files with POST /batches/<id>/files), 202 when files were stored and queued.
    """
    try:
        batch, items = batch_service.batch_from_request(request, g.api_user, "api")
    except BatchInputError as exc:
        return error(exc.status, exc.message, **({"rows": exc.rows} if exc.rows else {}))
    url = f"/api/v1/batches/{batch.id}"
    response = jsonify({"id": batch.id, "url": url, "files_url": f"{url}/files", **batch_service.items_summary(items)})
    response.headers["Location"] = url
    return response, 202 if items else 201


@bp.post("/batches/<int:batch_id>/files")
@uploader_required
@batch_size_limit
@spec.validate(form=BatchFiles, resp=Response(HTTP_202=BatchCreated, HTTP_403=ErrorBody, HTTP_404=ErrorBody))
def add_files(batch_id: int):
    """Adds a chunk of multipart `images` to a batch."""
    batch = get_or_404(Batch, batch_id)
    try:
        items = batch_service.chunk_from_request(request, batch, g.api_user)
    except BatchInputError as exc:
        return error(exc.status, exc.message)
    return jsonify({"id": batch.id, "url": f"/api/v1/batches/{batch.id}", **batch_service.items_summary(items)}), 202


@bp.get("/batches/<int:batch_id>")
@token_required
@spec.validate(resp=Response(HTTP_200=BatchProgress, HTTP_404=ErrorBody))
def show_batch(batch_id: int):
    """Progress: total, counts (queued, running, done, failed), case_ids and per-file errors."""
    batch = get_or_404(Batch, batch_id)
    return jsonify(batch_service.batch_progress(batch))


@bp.delete("/batches/<int:batch_id>")
@token_required
@spec.validate(
    query=DeletionRequest,
    json=DeletionRequest,
    resp=Response(HTTP_200=DeletionResult, HTTP_403=ErrorBody, HTTP_404=ErrorBody),
)
def delete_one_batch(batch_id: int):
    """Deletes the batch with every case it created (admin only); `reason` is required and audited."""
    return deletion_response(delete_batch, batch_id)
