"""Research pages: batch upload and progress, review and its queue, the dashboard, re-runs, export."""

from __future__ import annotations

from flask import (Blueprint, Response, abort, flash, g, jsonify, redirect, render_template, request, session,
                   stream_with_context, url_for)
from sqlalchemy import select

from . import batches as batch_service
from .access import role_required
from .auth import login_required
from .batches import BatchInputError
from .caselist import FilterError, export_csv, parse_filters
from .db import db
from .metrics import dashboard as dashboard_data
from .models import CONFIDENCE_LEVELS, DX_LONG_NAMES, REVIEW_DIAGNOSES, REVIEW_ROLES, UPLOAD_ROLES, Batch, Case, ModelVersion
from .presenters import case_dict
from .reruns import RerunError, model_version_or_error, rerun_batch, rerun_case, rerun_filtered
from .reviews import ReviewError, can_review, next_case_for, save_review

bp = Blueprint("portal", __name__)
SKIP_MAX = 500


def wants_json() -> bool:
    return request.accept_mimetypes.best == "application/json" or request.headers.get("X-Requested-With") == "fetch"


def _batch_or_404(batch_id: int) -> Batch:
    batch = db.session.get(Batch, batch_id)
    if batch is None:
        abort(404, description=f"No batch with id {batch_id}.")
    return batch


def _case_or_404(case_id: int) -> Case:
    case = db.session.get(Case, case_id)
    if case is None:
        abort(404, description=f"No case with id {case_id}.")
    return case


# --- batches ------------------------------------------------------------------------------------

@bp.get("/batches")
@login_required
def batches():
    rows = db.session.scalars(select(Batch).order_by(Batch.id.desc()).limit(200)).all()
    return render_template("batches/index.html", batches=[(b, batch_service.batch_progress(b)) for b in rows])


@bp.get("/batches/new")
@role_required(*UPLOAD_ROLES)
def new_batch():
    return render_template("batches/new.html", per_request=50)


@bp.post("/batches")
@role_required(*UPLOAD_ROLES)
def create_batch():
    """Creates a batch (the browser sends its metadata CSV here, then the images in chunks)."""
    request.max_content_length = batch_service.limit("BATCH_MAX_REQUEST_MB") * 1024 * 1024
    try:
        batch, items = batch_service.batch_from_request(request, g.user, "browser")
    except BatchInputError as exc:
        if wants_json():
            return jsonify({"error": exc.message, "status": exc.status, "rows": exc.rows}), exc.status
        flash(exc.message, "error")
        return render_template("batches/new.html", per_request=50, rows=exc.rows), exc.status
    url = url_for("portal.show_batch", batch_id=batch.id)
    if wants_json():
        return jsonify({"id": batch.id, "url": url, "files_url": url_for("portal.add_batch_files", batch_id=batch.id),
                        **batch_service.items_summary(items)}), 201
    return redirect(url)


@bp.post("/batches/<int:batch_id>/files")
@role_required(*UPLOAD_ROLES)
def add_batch_files(batch_id: int):
    """One chunk of a folder upload (sent by static/batch.js with the X-CSRF-Token header)."""
    request.max_content_length = batch_service.limit("BATCH_MAX_REQUEST_MB") * 1024 * 1024
    batch = _batch_or_404(batch_id)
    try:
        items = batch_service.chunk_from_request(request, batch, g.user)
    except BatchInputError as exc:
        return jsonify({"error": exc.message, "status": exc.status}), exc.status
    return jsonify({"id": batch.id, **batch_service.items_summary(items)})


@bp.get("/batches/<int:batch_id>")
@login_required
def show_batch(batch_id: int):
    batch = _batch_or_404(batch_id)
    versions = db.session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
    return render_template("batches/show.html", batch=batch, progress=batch_service.batch_progress(batch),
                           model_versions=versions)


@bp.get("/batches/<int:batch_id>/progress.json")
@login_required
def batch_progress(batch_id: int):
    return jsonify(batch_service.batch_progress(_batch_or_404(batch_id)))


@bp.post("/batches/<int:batch_id>/rerun")
@role_required(*UPLOAD_ROLES)
def rerun_batch_page(batch_id: int):
    _batch_or_404(batch_id)
    _rerun_and_flash(rerun_batch, batch_id)
    return redirect(url_for("portal.show_batch", batch_id=batch_id))


# --- re-runs of cases and selections --------------------------------------------------------------

@bp.post("/cases/<int:case_id>/rerun")
@role_required(*UPLOAD_ROLES)
def rerun_case_page(case_id: int):
    _case_or_404(case_id)
    _rerun_and_flash(rerun_case, case_id)
    return redirect(url_for("cases.show", case_id=case_id))


def _rerun_and_flash(rerun, target_id: int) -> None:
    """Runs a case or batch re-run with the form's model version and flashes what it queued."""
    try:
        summary = rerun(target_id, model_version_or_error(request.form.get("model_version_id")), g.user)
        flash(f"Re-run with {summary['model']}: {summary['queued']} image(s) queued, {summary['skipped']} already done or waiting.", "info")
    except RerunError as exc:
        flash(exc.message, "error")


@bp.post("/cases/rerun")
@role_required(*UPLOAD_ROLES)
def rerun_selection():
    """Re-runs every case that matches the list's filters (sent in the query string)."""
    try:
        filters = parse_filters(request.args)
        summary = rerun_filtered(filters, model_version_or_error(request.form.get("model_version_id")), g.user)
        flash(f"Re-run with {summary['model']}: {summary['queued']} image(s) queued, {summary['skipped']} already done or waiting.", "info")
    except (RerunError, FilterError) as exc:
        flash(exc.message, "error")
    return redirect(url_for("cases.index", **{k: v for k, v in request.args.items() if k != "cursor"}))


# --- export ---------------------------------------------------------------------------------------

def csv_response(args, user) -> Response:
    filters = parse_filters(args)
    response = Response(stream_with_context(export_csv(filters, user)), mimetype="text/csv")
    response.headers["Content-Disposition"] = 'attachment; filename="cases.csv"'
    response.headers["X-Disclaimer"] = "Research use only - not a diagnostic device."
    return response


@bp.get("/cases/export.csv")
@login_required
def export_cases_csv():
    try:
        return csv_response(request.args, g.user)
    except FilterError as exc:
        abort(400, description=exc.message)


# --- review -----------------------------------------------------------------------------------------

def _skipped() -> list[int]:
    return [int(i) for i in session.get("review_skip", [])][-SKIP_MAX:]


@bp.get("/review/next")
@role_required(*REVIEW_ROLES)
def review_next():
    batch = request.args.get("batch", type=int)
    case = next_case_for(g.user, _skipped(), batch)
    if case is None:
        return render_template("review/done.html", batch=batch)
    return redirect(url_for("portal.review_case", case_id=case.id, queue=1, **({"batch": batch} if batch else {})))


@bp.post("/review/skip/<int:case_id>")
@role_required(*REVIEW_ROLES)
def review_skip(case_id: int):
    session["review_skip"] = (_skipped() + [case_id])[-SKIP_MAX:]
    batch = request.args.get("batch", type=int)
    return redirect(url_for("portal.review_next", **({"batch": batch} if batch else {})))


@bp.route("/cases/<int:case_id>/review", methods=("GET", "POST"))
@role_required(*REVIEW_ROLES)
def review_case(case_id: int):
    case = _case_or_404(case_id)
    in_queue = request.args.get("queue") == "1"
    batch = request.args.get("batch", type=int)
    if request.method == "POST":
        try:
            _, created = save_review(case, g.user, request.form)
        except ReviewError as exc:
            flash(exc.message, "error")
            return _review_page(case, in_queue, batch, request.form), 400
        flash(f"Review of case #{case.id} {'saved' if created else 'updated'}.", "info")
        if in_queue:
            return redirect(url_for("portal.review_next", **({"batch": batch} if batch else {})))
        return redirect(url_for("cases.show", case_id=case.id))
    return _review_page(case, in_queue, batch, None)


def _review_page(case: Case, in_queue: bool, batch: int | None, form):
    from .models import Review

    mine = db.session.scalar(select(Review).where(Review.case_id == case.id, Review.reviewer_id == g.user.id))
    return render_template("review/form.html", case=case, data=case_dict(case), mine=mine, form=form,
                           in_queue=in_queue, batch=batch, diagnoses=REVIEW_DIAGNOSES, dx_names=DX_LONG_NAMES,
                           confidence_levels=CONFIDENCE_LEVELS)


# --- dashboard --------------------------------------------------------------------------------------

@bp.get("/dashboard")
@login_required
def dashboard():
    model_version = request.args.get("model_version", type=int)
    return render_template("dashboard.html", data=dashboard_data(model_version), dx_names=DX_LONG_NAMES)


__all__ = ["bp", "can_review", "csv_response"]
