"""Blind review (BLIND_REVIEW): a reviewer sees the model's answer to a case only after saving their
own review of it, so that the reviewers' diagnoses, which the dashboard compares the model with, are
not anchored on that model.

The rule is written here once and applied wherever a reviewer can read a case: the case page and
its polling JSON, the explanation maps, the case list with its filters and exports, and the API.
What is hidden: the prediction, the probabilities, the explanation maps and the similar cases (the
model's embedding), and the other reviewers' reviews and review history (each says whether its
author agreed with the model, which gives its answer away). Admins and researchers see everything:
they run and study the model, and their reviews (admins may review) are not blinded on the case
page; the review form itself hides the answer from anyone who has not reviewed (templates/review).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flask import current_app, url_for
from sqlalchemy import select

from ..db import db
from ..models import Case, Review, User

BLINDED_ROLES = ("reviewer",)
NOTE = (
    "Blind review: the model's answer to this case (prediction, probabilities, explanation maps, similar "
    "cases) and the other reviewers' reviews are hidden until you save your own review of it."
)
MARK = "hidden until you review this case (blind review)"  # the CSV's cell where the prediction would be
# An analysis dict's entries (webapp.presenters.analysis_dict) that carry the model's answer.
ANSWER_KEYS = (
    "probabilities",
    "class_long_names",
    "top_class",
    "top_class_name",
    "malignant_classes",
    "malignant_probability",
    "top_class_malignant",
)


def applies_to(user: User | None) -> bool:
    """Whether blind review is on and `user` is one whom it blinds."""
    return bool(current_app.config.get("BLIND_REVIEW")) and user is not None and user.role in BLINDED_ROLES


def blinded_cases(user: User | None, case_ids: Iterable[int]) -> set[int]:
    """Of `case_ids`, those whose model answer `user` may not see yet (one query)."""
    ids = set(case_ids)
    if not ids or not applies_to(user):
        return set()
    reviewed = db.session.scalars(select(Review.case_id).where(Review.reviewer_id == user.id, Review.case_id.in_(ids)))
    return ids - set(reviewed)


def is_blinded(user: User | None, case_id: int) -> bool:
    return bool(blinded_cases(user, [case_id]))


def only_reviewed_by(user: User | None):
    """A condition on cases for filters that match on the model's answer (predicted class, agreement):
    for a blinded reviewer they match only the cases already reviewed; None when no one is blinded."""
    if not applies_to(user):
        return None
    return Case.id.in_(select(Review.case_id).where(Review.reviewer_id == user.id))


def notice(case_id: int) -> dict[str, Any]:
    """What replaces the answer: why it is hidden and what reveals it."""
    return {"hidden": True, "note": NOTE, "review_url": url_for("review.review_case", case_id=case_id)}


def hide_from(user: User | None, data: dict[str, Any]) -> dict[str, Any]:
    """A case dict (webapp.presenters.case_dict, similar cases added) as `user` may see it: for a
    blinded reviewer without the model's answer and the other reviews, with `blind_review` saying why."""
    if not is_blinded(user, data["id"]):
        return data
    for analysis in data["analyses"]:
        for key in ANSWER_KEYS:
            analysis.pop(key, None)
        analysis["explanations"], analysis["similar_cases"] = [], []
    data["reviews"] = []
    data["blind_review"] = notice(data["id"])
    return data


def hide_in_row(row: dict[str, Any]) -> None:
    """A case-list row (webapp.cases.listing.summarise) without the model's answer and the other reviews."""
    row["prediction"], row["predictions"], row["differs_from_reference"] = None, [], False
    summary = row["review_summary"]
    summary["consensus"] = summary["agree"] = summary["disagree"] = None
    if "reviews" in row:
        row["reviews"] = []
    row["blind_review"] = notice(row["id"])
