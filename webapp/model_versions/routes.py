"""Model version pages: the versions and their model cards; re-running a case, a batch or the list's
selection with another version."""

from __future__ import annotations

from flask import Blueprint, flash, g, redirect, render_template, request, url_for
from flask_login import login_required

from ..auth.sessions import role_required
from ..cases.listing import FilterError, parse_filters
from ..errors import get_or_404
from ..models import UPLOAD_ROLES, Batch, Case
from .cards import card_html
from .service import (
    RerunError,
    model_version_or_error,
    rerun_batch,
    rerun_case,
    rerun_filtered,
    versions_with_counts,
)

bp = Blueprint("model_versions", __name__)


@bp.post("/batches/<int:batch_id>/rerun")
@role_required(*UPLOAD_ROLES)
def rerun_batch_page(batch_id: int):
    get_or_404(Batch, batch_id)
    _rerun_and_flash(rerun_batch, batch_id)
    return redirect(url_for("batches.show_batch", batch_id=batch_id))


@bp.post("/cases/<int:case_id>/rerun")
@role_required(*UPLOAD_ROLES)
def rerun_case_page(case_id: int):
    get_or_404(Case, case_id)
    _rerun_and_flash(rerun_case, case_id)
    return redirect(url_for("cases.show", case_id=case_id))


def _rerun_and_flash(rerun, target_id: int) -> None:
    """Runs a case or batch re-run with the form's model version and flashes what it queued."""
    try:
        summary = rerun(target_id, model_version_or_error(request.form.get("model_version_id")), g.user)
        flash(
            f"Re-run with {summary['model']}: {summary['queued']} image(s) queued, {summary['skipped']} already done or waiting.",
            "info",
        )
    except RerunError as exc:
        flash(exc.message, "error")


@bp.post("/cases/rerun")
@role_required(*UPLOAD_ROLES)
def rerun_selection():
    """Re-runs every case that matches the list's filters (sent in the query string)."""
    try:
        filters = parse_filters(request.args)
        summary = rerun_filtered(filters, model_version_or_error(request.form.get("model_version_id")), g.user)
        flash(
            f"Re-run with {summary['model']}: {summary['queued']} image(s) queued, {summary['skipped']} already done or waiting.",
            "info",
        )
    except (RerunError, FilterError) as exc:
        flash(exc.message, "error")
    return redirect(url_for("cases.index", **{k: v for k, v in request.args.items() if k != "cursor"}))


@bp.get("/models")
@login_required
def index():
    """Every model version with its results count and its model card (`?version=ID` opens that one)."""
    versions = [(mv, n, card_html(mv)) for mv, n in versions_with_counts()]
    return render_template("model_versions/index.html", versions=versions, chosen=request.args.get("version", type=int))
