"""The review form of a case and the reviewer's queue of cases to review."""

from __future__ import annotations

from flask import Blueprint, current_app, flash, g, redirect, render_template, request, session, url_for
from sqlalchemy import select

from ..auth.sessions import role_required
from ..db import db
from ..errors import get_or_404
from ..models import CONFIDENCE_LEVELS, DX_LONG_NAMES, REVIEW_DIAGNOSES, REVIEW_ROLES, Case, Review
from ..presenters import case_dict
from ..security import query_id
from .service import ReviewError, next_case_for, save_review

bp = Blueprint("review", __name__)
SKIP_MAX = 500


def _skipped() -> list[int]:
    return [int(i) for i in session.get("review_skip", [])][-SKIP_MAX:]


@bp.get("/review/next")
@role_required(*REVIEW_ROLES)
def review_next():
    batch = request.args.get("batch", type=query_id)
    case = next_case_for(g.user, _skipped(), batch)
    if case is None:
        return render_template("review/done.html", batch=batch)
    return redirect(url_for("review.review_case", case_id=case.id, queue=1, **({"batch": batch} if batch else {})))


@bp.post("/review/skip/<int:case_id>")
@role_required(*REVIEW_ROLES)
def review_skip(case_id: int):
    session["review_skip"] = (_skipped() + [case_id])[-SKIP_MAX:]
    batch = request.args.get("batch", type=query_id)
    return redirect(url_for("review.review_next", **({"batch": batch} if batch else {})))


@bp.route("/cases/<int:case_id>/review", methods=("GET", "POST"))
@role_required(*REVIEW_ROLES)
def review_case(case_id: int):
    case = get_or_404(Case, case_id)
    in_queue = request.args.get("queue") == "1"
    batch = request.args.get("batch", type=query_id)
    if request.method == "POST":
        try:
            _, created = save_review(case, g.user, request.form)
        except ReviewError as exc:
            flash(exc.message, "error")
            return _review_page(case, in_queue, batch, request.form), 400
        flash(f"Review of case #{case.id} {'saved' if created else 'updated'}.", "info")
        if created and current_app.config.get("BLIND_REVIEW"):
            # The reviewer's own diagnosis is stored: now the form shows the model's answer, and
            # whether they agree with it can be added.
            flash("Blind review: the model's answer is now shown below.", "info")
            return redirect(request.full_path.rstrip("?"))
        if in_queue:
            return redirect(url_for("review.review_next", **({"batch": batch} if batch else {})))
        return redirect(url_for("cases.show", case_id=case.id))
    return _review_page(case, in_queue, batch, None)


def _review_page(case: Case, in_queue: bool, batch: int | None, form):
    mine = db.session.scalar(select(Review).where(Review.case_id == case.id, Review.reviewer_id == g.user.id))
    return render_template(
        "review/form.html",
        case=case,
        data=case_dict(case),
        mine=mine,
        form=form,
        in_queue=in_queue,
        batch=batch,
        diagnoses=REVIEW_DIAGNOSES,
        dx_names=DX_LONG_NAMES,
        confidence_levels=CONFIDENCE_LEVELS,
    )
