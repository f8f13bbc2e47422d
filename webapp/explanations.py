"""Explanation maps (Grad-CAM, Grad-CAM++, SHAP): requesting them, serving their files, presenting them.

The worker computes and stores them (worker/explain_tasks.py); this module only reads rows and
stored files and enqueues tasks by name, so the web process stays free of ml/ and TensorFlow.
Files are served only through the access-checked routes below (session login or API token), never
as static files.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, abort, current_app, flash, g, jsonify, redirect, request, send_file, url_for
from sqlalchemy import select

from .auth import user_from_bearer
from .db import db
from .models import EXPLANATION_METHODS, Analysis, Case, Explanation
from .queue import EXPLAIN_QUEUE, send
from .storage import StorageError, check_key, storage_from_settings

SHAP_TASK = "worker.tasks.explain_shap"  # args: analysis_id; computes every queued SHAP row of it
GRADCAM_TASK = "worker.tasks.explain_gradcam"  # args: explanation_id
METHOD_ALIASES = {"gradcam": "gradcam", "grad-cam": "gradcam", "gradcam++": "gradcam++", "gradcampp": "gradcam++",
                  "grad-cam++": "gradcam++", "shap": "shap"}
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "shap": "SHAP"}
METHOD_SLUGS = {"gradcam": "gradcam", "gradcam++": "gradcampp", "shap": "shap"}  # storage keys allow no '+'

bp = Blueprint("explanations", __name__)


class ExplanationRequestError(ValueError):
    """A request for an explanation that cannot be served; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def explanation_keys(content_hash: str, model_version_id: int, method: str, class_name: str) -> tuple[str, str]:
    """Storage keys (raw .npy, overlay .png) of one explanation, next to nothing else of the image."""
    slug = METHOD_SLUGS[method]
    cls = re.sub(r"[^a-z0-9_-]", "_", class_name.lower())
    base = f"explanations/{content_hash[:2]}/{content_hash[2:4]}/{content_hash}/m{model_version_id}-{slug}-{cls}"
    return check_key(base + ".npy"), check_key(base + ".png")


# --- presenting ---------------------------------------------------------------------------------

def explanation_dict(e: Explanation) -> dict[str, Any]:
    """The API/page representation; `url`/`raw_url` are set once the maps are stored (status done)."""
    done = e.status == "done" and e.overlay_key and e.raw_key
    case_id = e.image.case_id
    d: dict[str, Any] = {
        "id": e.id,
        "method": e.method,
        "method_label": METHOD_LABELS.get(e.method, e.method),
        "class": e.class_name,
        "class_name": e.model_version.class_long_names.get(e.class_name, e.class_name),
        "status": e.status,
        "url": url_for("explanations.overlay", case_id=case_id, explanation_id=e.id) if done else None,
        "raw_url": url_for("explanations.raw", case_id=case_id, explanation_id=e.id) if done else None,
        "model": {"name": e.model_version.name, "version": e.model_version.version, "trained": e.model_version.trained},
        "params": e.params or {},
        "timings_ms": e.timings or {},
        "attempts": e.attempts,
        "created": e.created_at.isoformat() if e.created_at else None,
        "finished": e.finished_at.isoformat() if e.finished_at else None,
    }
    if e.error:
        d["error"] = e.error
    return d


def explanations_pending(case: Case) -> bool:
    return any(e.pending for im in case.images for a in im.analyses for e in a.explanations)


def explanation_panels(case_id: int) -> list[dict[str, Any]]:
    """What templates/cases/_explanations.html draws: one panel per finished analysis of the case.

    Each panel has the original image, the classes that have any explanation (top class first),
    and per class the Grad-CAM (or Grad-CAM++) and SHAP explanation dicts.
    """
    case = db.session.get(Case, case_id)
    if case is None:
        return []
    panels = []
    for image in case.images:
        for analysis in image.analyses:
            if analysis.status != "succeeded":
                continue
            mv = analysis.model_version
            rows = [explanation_dict(e) for e in analysis.explanations]
            classes = sorted({r["class"] for r in rows}, key=lambda c: (c != analysis.top_class, -(analysis.probabilities or {}).get(c, 0.0)))
            by_class = {c: {"gradcam": None, "shap": None} for c in classes}
            for r in rows:
                slot = "shap" if r["method"] == "shap" else "gradcam"
                current = by_class[r["class"]][slot]
                # Grad-CAM and Grad-CAM++ share a slot: a finished map wins over a pending one.
                if current is None or (current["status"] != "done" and r["status"] == "done"):
                    by_class[r["class"]][slot] = r
            panels.append({
                "analysis_id": analysis.id,
                "image_url": url_for("cases.stored_file", key=image.storage_key),
                "width": image.width,
                "height": image.height,
                "model": {"name": mv.name, "version": mv.version, "trained": mv.trained, "trained_on": mv.trained_on},
                "top_class": analysis.top_class,
                "class_names": list(mv.class_names),
                "class_long_names": mv.class_long_names,
                "classes": classes,
                "maps": by_class,
                "rows": rows,
            })
    return panels


# --- requesting ---------------------------------------------------------------------------------

def _pick_analysis(case: Case, analysis_id: Any) -> Analysis:
    finished = [a for im in case.images for a in im.analyses if a.status == "succeeded"]
    if analysis_id not in (None, ""):
        try:
            wanted = int(analysis_id)
        except (TypeError, ValueError):
            raise ExplanationRequestError(400, f"analysis_id must be a whole number, got {analysis_id!r}.") from None
        for analysis in finished:
            if analysis.id == wanted:
                return analysis
        raise ExplanationRequestError(404, f"Case {case.id} has no finished analysis with id {wanted}.")
    if not finished:
        raise ExplanationRequestError(409, f"Case {case.id} has no finished analysis yet; explanations follow the prediction.")
    return max(finished, key=lambda a: a.id)


def request_explanation(case: Case, method: Any, class_name: Any, analysis_id: Any = None) -> tuple[Explanation, bool]:
    """Creates (or re-queues a failed) explanation row and sends its task to the explain queue.

    Returns:
        `(row, queued)`: queued is False when the row already exists and is queued, running or done.

    Raises:
        ExplanationRequestError: unknown method or class, or no finished analysis to explain.
    """
    method_key = METHOD_ALIASES.get(str(method or "").strip().lower())
    if method_key not in EXPLANATION_METHODS:
        raise ExplanationRequestError(400, f"method must be one of {', '.join(EXPLANATION_METHODS)}, got {method!r}.")
    analysis = _pick_analysis(case, analysis_id)
    mv = analysis.model_version
    class_name = str(class_name or analysis.top_class or "").strip()
    if class_name not in mv.class_names:
        raise ExplanationRequestError(400, f"class must be one of {', '.join(mv.class_names)}, got {class_name!r}.")
    row = db.session.scalar(select(Explanation).where(
        Explanation.image_id == analysis.image_id, Explanation.model_version_id == mv.id,
        Explanation.method == method_key, Explanation.class_name == class_name,
    ))
    if row is not None and row.status in ("running", "done"):
        return row, False
    if row is None:
        row = Explanation(analysis=analysis, image_id=analysis.image_id, model_version_id=mv.id,
                          method=method_key, class_name=class_name, status="queued")
        db.session.add(row)
    else:  # failed (asked again: try again) or queued (its message may have been lost: send again)
        row.status, row.error, row.attempts, row.started_at, row.finished_at = "queued", None, 0, None, None
    db.session.commit()
    if method_key == "shap":
        send(SHAP_TASK, analysis.id, queue=EXPLAIN_QUEUE)
    else:
        send(GRADCAM_TASK, row.id, queue=EXPLAIN_QUEUE)
    return row, True


# --- routes ---------------------------------------------------------------------------------------

def _viewer_or_response():
    """(user, None) for a logged-in user or a valid bearer token, else (None, response)."""
    if g.get("user") is not None:
        return g.user, None
    if request.headers.get("Authorization"):
        user, reason = user_from_bearer()
        if user is None:
            response = jsonify({"error": reason, "status": 401})
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Bearer realm="dermportal"'
            return None, response
        return user, None
    return None, redirect(url_for("auth.login", next=request.path))


def _stored_explanation(case_id: int, explanation_id: int) -> Explanation:
    row = db.session.get(Explanation, explanation_id)
    if row is None or row.image.case_id != case_id:
        abort(404, description=f"Case {case_id} has no explanation {explanation_id}.")
    if row.status != "done" or not row.overlay_key or not row.raw_key:
        abort(404, description=f"Explanation {explanation_id} is {row.status}; its maps are not stored yet.")
    return row


def _send_stored(key: str, mimetype: str, download_name: str | None = None):
    storage = storage_from_settings(current_app.extensions["settings"])
    try:
        handle = storage.open(key)
    except StorageError:
        abort(404, description="The stored map is missing.")
    response = send_file(handle, mimetype=mimetype, as_attachment=download_name is not None,
                         download_name=download_name, max_age=3600)
    response.headers["Cache-Control"] = "private, max-age=3600"  # never in shared caches
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/cases/<int:case_id>/explanations/<int:explanation_id>/overlay.png")
def overlay(case_id: int, explanation_id: int):
    user, response = _viewer_or_response()
    if user is None:
        return response
    row = _stored_explanation(case_id, explanation_id)
    return _send_stored(row.overlay_key, "image/png")


@bp.get("/cases/<int:case_id>/explanations/<int:explanation_id>/raw.npy")
def raw(case_id: int, explanation_id: int):
    user, response = _viewer_or_response()
    if user is None:
        return response
    row = _stored_explanation(case_id, explanation_id)
    name = f"case{case_id}-{METHOD_SLUGS[row.method]}-{row.class_name}.npy"
    return _send_stored(row.raw_key, "application/octet-stream", download_name=name)


@bp.post("/cases/<int:case_id>/explanations")
def request_from_page(case_id: int):
    """The case page's "compute" form (session login and CSRF, like every page form)."""
    if g.get("user") is None:
        return redirect(url_for("auth.login", next=f"/cases/{case_id}"))
    case = db.session.get(Case, case_id)
    if case is None:
        abort(404, description=f"No case with id {case_id}.")
    try:
        row, queued = request_explanation(case, request.form.get("method"), request.form.get("class"),
                                          request.form.get("analysis_id"))
    except ExplanationRequestError as exc:
        flash(exc.message, "error")
    else:
        label = f"{METHOD_LABELS[row.method]} for {row.class_name}"
        flash(f"{label} is queued; it appears here when ready." if queued else f"{label} is already {row.status}.", "info")
    return redirect(url_for("cases.show", case_id=case_id) + "#explanations")


@bp.app_template_global("explanation_panels")
def _explanation_panels_global(case_id: int):
    return explanation_panels(case_id)
