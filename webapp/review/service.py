"""Reviews of cases: one current review per reviewer and case, every change in the audit log; the queue."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, not_, select

from .. import audit
from ..db import db
from ..models import (
    CONFIDENCE_LEVELS,
    REVIEW_DIAGNOSES,
    REVIEW_ROLES,
    Analysis,
    BatchItem,
    Case,
    Image,
    Review,
    User,
    utcnow,
)
from ..states import AnalysisStatus

NOTES_MAX = 4000
CONFIDENCE_WORDS = {"low": 2, "medium": 3, "high": 4}
TRUE_WORDS, FALSE_WORDS = ("agree", "yes", "true", "1", "on"), ("disagree", "no", "false", "0")


class ReviewError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def can_review(user: User | None) -> bool:
    return user is not None and user.role in REVIEW_ROLES


def parse_review(form: Mapping[str, Any]) -> dict[str, Any]:
    """Reads diagnosis, agreement, confidence (1-5 or low/medium/high) and notes. Raises ReviewError."""
    diagnosis = str(form.get("diagnosis") or "").strip().lower()
    if diagnosis not in REVIEW_DIAGNOSES:
        raise ReviewError("diagnosis", f"diagnosis must be one of {', '.join(REVIEW_DIAGNOSES)}.")
    agrees_raw = form.get("agrees_with_model")
    if isinstance(agrees_raw, bool) or agrees_raw is None:
        agrees = agrees_raw
    else:
        word = str(agrees_raw).strip().lower()
        if word in ("", "none", "null", "unsure"):
            agrees = None
        elif word in TRUE_WORDS:
            agrees = True
        elif word in FALSE_WORDS:
            agrees = False
        else:
            raise ReviewError("agrees_with_model", "agrees_with_model must be agree or disagree (or empty).")
    raw = str(form.get("confidence") or "").strip().lower()
    if raw in CONFIDENCE_WORDS:
        confidence = CONFIDENCE_WORDS[raw]
    elif raw.isdigit() and int(raw) in CONFIDENCE_LEVELS:
        confidence = int(raw)
    else:
        raise ReviewError("confidence", "confidence must be 1-5 or low, medium, high.")
    notes = str(form.get("notes") or "").strip()
    if len(notes) > NOTES_MAX:
        raise ReviewError("notes", f"notes must be at most {NOTES_MAX} characters.")
    return {"diagnosis": diagnosis, "agrees_with_model": agrees, "confidence": confidence, "notes": notes or None}


def _snapshot(review: Review) -> dict[str, Any]:
    return {
        "diagnosis": review.diagnosis,
        "agrees_with_model": review.agrees_with_model,
        "confidence": review.confidence,
        "notes": review.notes,
        "analysis_id": review.analysis_id,
    }


def latest_analysis_id(case: Case) -> int | None:
    return db.session.scalar(
        select(func.max(Analysis.id))
        .join(Image, Image.id == Analysis.image_id)
        .where(Image.case_id == case.id, Analysis.status == AnalysisStatus.SUCCEEDED)
    )


def save_review(case: Case, reviewer: User, form: Mapping[str, Any]) -> tuple[Review, bool]:
    """Creates or updates `reviewer`'s review of `case`; returns (review, created). Raises ReviewError."""
    values = parse_review(form)
    review = db.session.scalar(select(Review).where(Review.case_id == case.id, Review.reviewer_id == reviewer.id))
    created = review is None
    old = None if created else _snapshot(review)
    if created:
        review = Review(case_id=case.id, reviewer_id=reviewer.id)
        db.session.add(review)
    for key, value in values.items():
        setattr(review, key, value)
    review.analysis_id = latest_analysis_id(case)
    review.updated_at = utcnow()
    db.session.flush()
    new = _snapshot(review)
    if old != new:
        audit.record(
            "review.create" if created else "review.update",
            "review",
            review.id,
            user=reviewer,
            case_id=case.id,
            old=old,
            new=new,
        )
    db.session.commit()
    return review, created


def next_case_for(reviewer: User, skip: list[int] | None = None, batch_id: int | None = None) -> Case | None:
    """The oldest analysed case that this reviewer has not reviewed (nor skipped in this session)."""
    query = (
        select(Case)
        .where(
            Case.id.in_(
                select(Image.case_id)
                .join(Analysis, Analysis.image_id == Image.id)
                .where(Analysis.status == AnalysisStatus.SUCCEEDED)
            )
        )
        .where(not_(Case.id.in_(select(Review.case_id).where(Review.reviewer_id == reviewer.id))))
    )
    if skip:
        query = query.where(Case.id.not_in(skip))
    if batch_id:
        query = query.where(Case.id.in_(select(BatchItem.case_id).where(BatchItem.batch_id == batch_id)))
    return db.session.scalars(query.order_by(Case.id).limit(1)).first()
