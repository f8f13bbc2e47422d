"""/api/v1/batches: folder uploads (files, metadata CSV or a zip archive) and their progress."""

from __future__ import annotations

from flask import g, jsonify, request

from ..batches import service as batch_service
from ..batches.service import BatchInputError
from ..errors import get_or_404
from ..models import Batch
from ..security import upload_limit
from .blueprint import bp, error, token_required, uploader_required


@bp.post("/batches")
@uploader_required
@upload_limit
def create_batch():
    """Creates a batch from multipart `images` (many), optional `metadata` (HAM10000 CSV) or one `archive` (zip).

    201 for an empty batch (add files with POST /batches/<id>/files), 202 when files were stored and queued.
    """
    request.max_content_length = batch_service.limit("BATCH_MAX_REQUEST_MB") * 1024 * 1024
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
def add_files(batch_id: int):
    """Adds a chunk of multipart `images` to a batch."""
    request.max_content_length = batch_service.limit("BATCH_MAX_REQUEST_MB") * 1024 * 1024
    batch = get_or_404(Batch, batch_id)
    try:
        items = batch_service.chunk_from_request(request, batch, g.api_user)
    except BatchInputError as exc:
        return error(exc.status, exc.message)
    return jsonify({"id": batch.id, "url": f"/api/v1/batches/{batch.id}", **batch_service.items_summary(items)}), 202


@bp.get("/batches/<int:batch_id>")
@token_required
def show_batch(batch_id: int):
    """Progress: total, counts (queued, running, done, failed), case_ids and per-file errors."""
    batch = get_or_404(Batch, batch_id)
    return jsonify(batch_service.batch_progress(batch))
