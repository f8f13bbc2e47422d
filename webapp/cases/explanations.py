"""Explanation maps (Grad-CAM, Grad-CAM++, SHAP): their storage keys, requesting them, the case page's panels.

The worker computes and stores them (worker/explain.py, `store_explanation`); this module only reads
rows and stored files and enqueues tasks by name, so the web process stays free of ml/ and TensorFlow.
Files are served only through the access-checked routes of `explanation_routes` (session login or
API token), never as static files.
"""

from __future__ import annotations

import re
from typing import Any

from flask import url_for
from sqlalchemy import select

from .. import queue
from ..db import db
from ..models import EXPLANATION_METHODS, Analysis, Case, Explanation
from ..presenters import explanation_dict
from ..queue import EXPLAIN_QUEUE, PREDICT_QUEUE
from ..states import AnalysisStatus, ExplanationStatus
from ..storage import check_key

SHAP_TASK = "worker.tasks.explain_shap"  # args: analysis_id; computes every queued SHAP row of it
GRADCAM_TASK = "worker.tasks.explain_gradcam"  # args: explanation_id
METHOD_ALIASES = {
    "gradcam": "gradcam",
    "grad-cam": "gradcam",
    "gradcam++": "gradcam++",
    "gradcampp": "gradcam++",
    "grad-cam++": "gradcam++",
    "shap": "shap",
}
METHOD_SLUGS = {"gradcam": "gradcam", "gradcam++": "gradcampp", "shap": "shap"}  # storage keys allow no '+'


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
            if analysis.status != AnalysisStatus.SUCCEEDED:
                continue
            mv = analysis.model_version
            rows = [explanation_dict(e) for e in analysis.explanations]
            classes = sorted(
                {r["class"] for r in rows},
                key=lambda c: (c != analysis.top_class, -(analysis.probabilities or {}).get(c, 0.0)),
            )
            by_class = {c: {"gradcam": None, "shap": None} for c in classes}
            for r in rows:
                slot = "shap" if r["method"] == "shap" else "gradcam"
                current = by_class[r["class"]][slot]
                # Grad-CAM and Grad-CAM++ share a slot: a finished map wins over a pending one.
                if current is None or (
                    current["status"] != ExplanationStatus.DONE and r["status"] == ExplanationStatus.DONE
                ):
                    by_class[r["class"]][slot] = r
            panels.append(
                {
                    "analysis_id": analysis.id,
                    "image_url": url_for("cases.stored_file", key=image.storage_key),
                    "width": image.width,
                    "height": image.height,
                    "model": {
                        "name": mv.name,
                        "version": mv.version,
                        "trained": mv.trained,
                        "trained_on": mv.trained_on,
                    },
                    "top_class": analysis.top_class,
                    "class_names": list(mv.class_names),
                    "class_long_names": mv.class_long_names,
                    "classes": classes,
                    "maps": by_class,
                    "rows": rows,
                }
            )
    return panels


# --- requesting ---------------------------------------------------------------------------------


def _pick_analysis(case: Case, analysis_id: Any) -> Analysis:
    finished = [a for im in case.images for a in im.analyses if a.status == AnalysisStatus.SUCCEEDED]
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
        raise ExplanationRequestError(
            409, f"Case {case.id} has no finished analysis yet; explanations follow the prediction."
        )
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
    row = db.session.scalar(
        select(Explanation).where(
            Explanation.image_id == analysis.image_id,
            Explanation.model_version_id == mv.id,
            Explanation.method == method_key,
            Explanation.class_name == class_name,
        )
    )
    if row is not None and row.status in (ExplanationStatus.RUNNING, ExplanationStatus.DONE):
        return row, False
    if row is None:
        row = Explanation(
            analysis=analysis,
            image_id=analysis.image_id,
            model_version_id=mv.id,
            method=method_key,
            class_name=class_name,
            status=ExplanationStatus.QUEUED,
        )
        db.session.add(row)
    else:  # failed (asked again: try again) or queued (its message may have been lost: send again)
        row.status, row.error, row.attempts, row.started_at, row.finished_at = (
            ExplanationStatus.QUEUED,
            None,
            0,
            None,
            None,
        )
    db.session.commit()
    if method_key == "shap":
        queue.send(SHAP_TASK, analysis.id, queue=EXPLAIN_QUEUE)
    else:
        # A requested Grad-CAM (~0.1 s) goes to the predict queue, which SHAP never fills: on the
        # explain queue it waited behind every SHAP message of a batch (worker.priority).
        queue.send(GRADCAM_TASK, row.id, queue=PREDICT_QUEUE)
    return row, True
