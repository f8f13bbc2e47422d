"""/api/v1/cases/<id>/reviews: the reviews of a case, and the caller's own review."""

from __future__ import annotations

from flask import g, jsonify
from spectree import Response
from sqlalchemy import select

from ..db import db
from ..errors import get_or_404
from ..models import Case, Review
from ..presenters import review_dict
from ..review import blind
from ..review.service import ReviewError, can_review, save_review
from .blueprint import bp, error, request_body, spec, token_required
from .schemas import ErrorBody, ReviewBody, ReviewList, ReviewRequest


@bp.get("/cases/<int:case_id>/reviews")
@token_required
@spec.validate(resp=Response(HTTP_200=ReviewList, HTTP_404=ErrorBody))
def list_reviews(case_id: int):
    """The reviews of a case, oldest first."""
    get_or_404(Case, case_id)
    if blind.is_blinded(g.api_user, case_id):  # each review says whether it agreed with the model
        return jsonify({"case_id": case_id, "reviews": [], "blind_review": blind.notice(case_id)})
    reviews = db.session.scalars(select(Review).where(Review.case_id == case_id).order_by(Review.id)).all()
    return jsonify({"case_id": case_id, "reviews": [review_dict(r) for r in reviews]})


@bp.put("/cases/<int:case_id>/reviews")
@token_required
@spec.validate(
    json=ReviewRequest,
    resp=Response(
        HTTP_200=(ReviewBody, "updated"), HTTP_201=(ReviewBody, "created"), HTTP_403=ErrorBody, HTTP_404=ErrorBody
    ),
)
def put_review(case_id: int):
    """Creates or updates the caller's review: JSON {"diagnosis", "agrees_with_model", "confidence", "notes"}."""
    if not can_review(g.api_user):
        return error(403, f"Role {g.api_user.role!r} may not review cases.")
    case = get_or_404(Case, case_id)
    try:
        review, created = save_review(case, g.api_user, request_body())
    except ReviewError as exc:
        return error(400, exc.message, field=exc.field)
    return jsonify(review_dict(review)), 201 if created else 200
