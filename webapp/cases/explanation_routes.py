"""Explanation maps on the case page: the "compute" form, and their overlay and raw files.

Files are served only through these access-checked routes (session login or API token), never
as static files.
"""

from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, g, redirect, request, send_file, url_for

from ..auth.sessions import viewer_or_refusal
from ..db import db
from ..errors import get_or_404
from ..models import Case, Explanation
from ..presenters import METHOD_LABELS
from ..review import blind
from ..security import explain_limit
from ..states import ExplanationStatus
from ..storage import StorageError, storage_from_settings
from .explanations import METHOD_SLUGS, ExplanationRequestError, explanation_panels, request_explanation
from .progress import case_progress

bp = Blueprint("explanations", __name__)


def _stored_explanation(case_id: int, explanation_id: int, user) -> Explanation:
    if blind.is_blinded(user, case_id):
        abort(403, description=blind.NOTE)
    row = db.session.get(Explanation, explanation_id)
    if row is None or row.image.case_id != case_id:
        abort(404, description=f"Case {case_id} has no explanation {explanation_id}.")
    if row.status != ExplanationStatus.DONE or not row.overlay_key or not row.raw_key:
        abort(404, description=f"Explanation {explanation_id} is {row.status}; its maps are not stored yet.")
    return row


def _send_stored(key: str, mimetype: str, download_name: str | None = None):
    storage = storage_from_settings(current_app.extensions["settings"])
    try:
        handle = storage.open(key)
    except StorageError:
        abort(404, description="The stored map is missing.")
    # Cache-Control "private, no-store" and nosniff: webapp.security, as on every patient file
    return send_file(handle, mimetype=mimetype, as_attachment=download_name is not None, download_name=download_name)


@bp.get("/cases/<int:case_id>/explanations/<int:explanation_id>/overlay.png")
def overlay(case_id: int, explanation_id: int):
    user, response = viewer_or_refusal()
    if user is None:
        return response
    row = _stored_explanation(case_id, explanation_id, user)
    return _send_stored(row.overlay_key, "image/png")


@bp.get("/cases/<int:case_id>/explanations/<int:explanation_id>/raw.npy")
def raw(case_id: int, explanation_id: int):
    user, response = viewer_or_refusal()
    if user is None:
        return response
    row = _stored_explanation(case_id, explanation_id, user)
    name = f"case{case_id}-{METHOD_SLUGS[row.method]}-{row.class_name}.npy"
    return _send_stored(row.raw_key, "application/octet-stream", download_name=name)


@bp.post("/cases/<int:case_id>/explanations")
@explain_limit
def request_from_page(case_id: int):
    """The case page's "compute" form (session login and CSRF, like every page form)."""
    if g.get("user") is None:
        return redirect(url_for("auth.login", next=f"/cases/{case_id}"))
    case = get_or_404(Case, case_id)
    shown: dict[str, object] = {}
    try:
        if blind.is_blinded(g.user, case_id):
            raise ExplanationRequestError(403, blind.NOTE)
        row, queued = request_explanation(
            case, request.form.get("method"), request.form.get("class"), request.form.get("analysis_id")
        )
    except ExplanationRequestError as exc:
        flash(exc.message, "error")
    else:
        # the page opens on the class asked for, not the predicted one, while its map is computed
        shown = {"show_analysis": row.analysis_id, "show_class": row.class_name}
        label = f"{METHOD_LABELS[row.method]} for {row.class_name}"
        g.explanation_queued = queued  # counted by explain_limit
        flash(
            f"{label} is queued; it appears here when ready." if queued else f"{label} is already {row.status}.", "info"
        )
    return redirect(url_for("cases.show", case_id=case_id, **shown) + "#explanations")


@bp.app_template_global("explanation_panels")
def _explanation_panels_global(case_id: int):
    return explanation_panels(case_id)


@bp.app_template_global("case_progress")
def _case_progress_global(case_id: int):
    return case_progress(case_id)
