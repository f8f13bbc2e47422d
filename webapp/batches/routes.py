"""Folder-upload pages: the list of batches, the upload form, chunks sent by the browser, progress."""

from __future__ import annotations

from flask import Blueprint, flash, g, jsonify, redirect, render_template, request, url_for
from flask_login import login_required
from sqlalchemy import select

from ..auth.sessions import role_required
from ..cases.deletion import DeletionError, check_confirmed, delete_batch
from ..db import db
from ..errors import get_or_404, wants_json
from ..models import UPLOAD_ROLES, Batch, ModelVersion
from ..security import csrf, upload_limit
from . import service as batch_service
from .service import BatchInputError

bp = Blueprint("batches", __name__)


@bp.get("/batches")
@login_required
def batches():
    rows = db.session.scalars(select(Batch).order_by(Batch.id.desc()).limit(200)).all()
    return render_template("batches/index.html", batches=[(b, batch_service.batch_progress(b)) for b in rows])


@bp.get("/batches/new")
@role_required(*UPLOAD_ROLES)
def new_batch():
    return render_template("batches/new.html", per_request=50)


def _raise_body_limit_then_check_csrf() -> None:
    """Folder uploads may be larger than one image: the CSRF check parses the body, so it runs after."""
    request.max_content_length = batch_service.limit("BATCH_MAX_REQUEST_MB") * 1024 * 1024
    csrf.protect()


@bp.post("/batches")
@csrf.exempt
@role_required(*UPLOAD_ROLES)
@upload_limit
def create_batch():
    """Creates a batch (the browser sends its metadata CSV here, then the images in chunks)."""
    _raise_body_limit_then_check_csrf()
    try:
        batch, items = batch_service.batch_from_request(request, g.user, "browser")
    except BatchInputError as exc:
        if wants_json():  # batch.js shows the summary above its table of the rows
            body = {"error": exc.message, "summary": exc.summary, "status": exc.status, "rows": exc.rows}
            return jsonify(body), exc.status
        flash(exc.summary, "error")
        return render_template("batches/new.html", per_request=50, rows=exc.rows), exc.status
    url = url_for("batches.show_batch", batch_id=batch.id)
    if wants_json():
        return jsonify(
            {
                "id": batch.id,
                "url": url,
                "files_url": url_for("batches.add_batch_files", batch_id=batch.id),
                **batch_service.items_summary(items),
            }
        ), 201
    return redirect(url)


@bp.post("/batches/<int:batch_id>/files")
@csrf.exempt
@role_required(*UPLOAD_ROLES)
def add_batch_files(batch_id: int):
    """One chunk of a folder upload (sent by static/batch.js with the X-CSRF-Token header)."""
    _raise_body_limit_then_check_csrf()
    batch = get_or_404(Batch, batch_id)
    try:
        items = batch_service.chunk_from_request(request, batch, g.user)
    except BatchInputError as exc:
        return jsonify({"error": exc.message, "status": exc.status}), exc.status
    return jsonify({"id": batch.id, **batch_service.items_summary(items)})


@bp.get("/batches/<int:batch_id>")
@login_required
def show_batch(batch_id: int):
    batch = get_or_404(Batch, batch_id)
    versions = db.session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
    return render_template(
        "batches/show.html", batch=batch, progress=batch_service.batch_progress(batch), model_versions=versions
    )


@bp.post("/batches/<int:batch_id>/delete")
@role_required("admin")
def delete(batch_id: int):
    """The batch page's delete form: the batch and every case it created (cases.deletion)."""
    try:
        check_confirmed(request.form)
        result = delete_batch(batch_id, g.user, request.form.get("reason"))
    except DeletionError as exc:
        flash(exc.message, "error")
        return show_batch(batch_id), exc.status
    flash(f"Batch #{batch_id} and its {len(result.case_ids)} case(s) were deleted.", "info")
    return redirect(url_for("batches.batches"))


@bp.get("/batches/<int:batch_id>/progress.json")
@login_required
def batch_progress(batch_id: int):
    return jsonify(batch_service.batch_progress(get_or_404(Batch, batch_id)))
