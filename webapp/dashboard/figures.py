"""Agreement figures computed in the web process (plain Python: no numpy/sklearn needed here).

- `confusion_matrix`, `sensitivity`, `balanced_accuracy`: the model against a reference diagnosis.
- `cohen_kappa`: agreement between two raters beyond chance, kappa = (p_o - p_e) / (1 - p_e), where
  p_o is the observed agreement and p_e the agreement expected from each rater's label frequencies.
- `dashboard`: those figures from the database (reference = the dataset's dx where given, else the
  reviewers' consensus), and kappa for every pair of reviewers on the cases both reviewed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from itertools import combinations
from typing import Any

from sqlalchemy import func, select

from ..cases.listing import consensus
from ..db import db
from ..models import DX_CLASSES, Analysis, Case, Image, ModelVersion, Review, User
from ..states import AnalysisStatus


def confusion_matrix(pairs: Sequence[tuple[str, str]], classes: Sequence[str]) -> list[list[int]]:
    """Rows: reference class; columns: predicted class (pairs outside `classes` are ignored)."""
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for reference, predicted in pairs:
        if reference in index and predicted in index:
            matrix[index[reference]][index[predicted]] += 1
    return matrix


def sensitivity(matrix: list[list[int]], classes: Sequence[str]) -> dict[str, float | None]:
    """Per-class recall: correct / cases of that reference class (None where there are none)."""
    out = {}
    for i, c in enumerate(classes):
        support = sum(matrix[i])
        out[c] = matrix[i][i] / support if support else None
    return out


def balanced_accuracy(matrix: list[list[int]], classes: Sequence[str]) -> float | None:
    """The mean sensitivity over the classes that occur in the reference."""
    values = [v for v in sensitivity(matrix, classes).values() if v is not None]
    return sum(values) / len(values) if values else None


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two raters' labels for the same items.

    Returns None for no items, or when chance agreement is total (both raters always gave the same
    single label: kappa is 0/0 there).
    """
    if len(a) != len(b):
        raise ValueError(f"The raters labelled {len(a)} and {len(b)} items; kappa needs the same items.")
    n = len(a)
    if n == 0:
        return None
    observed = sum(1 for x, y in zip(a, b) if x == y) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[k] * count_b[k] for k in set(count_a) | set(count_b)) / (n * n)
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def model_versions_with_results() -> list[dict[str, Any]]:
    rows = db.session.execute(
        select(ModelVersion, func.count(Analysis.id))
        .join(Analysis, Analysis.model_version_id == ModelVersion.id)
        .where(Analysis.status == AnalysisStatus.SUCCEEDED)
        .group_by(ModelVersion.id)
        .order_by(ModelVersion.id)
    ).all()
    return [
        {
            "id": mv.id,
            "name": mv.name,
            "version": mv.version,
            "trained": mv.trained,
            "trained_on": mv.trained_on,
            "analyses": n,
        }
        for mv, n in rows
    ]


def model_against_reference(model_version_id: int) -> dict[str, Any]:
    mv = db.session.get(ModelVersion, model_version_id)
    classes = list(mv.class_names) if mv else list(DX_CLASSES)
    pairs: list[tuple[str, str]] = []
    # Cases with a dataset diagnosis: counted in SQL.
    for reference, predicted, n in db.session.execute(
        select(Case.reference_dx, Analysis.top_class, func.count())
        .join(Image, Image.case_id == Case.id)
        .join(Analysis, Analysis.image_id == Image.id)
        .where(
            Analysis.model_version_id == model_version_id,
            Analysis.status == AnalysisStatus.SUCCEEDED,
            Case.reference_dx.is_not(None),
        )
        .group_by(Case.reference_dx, Analysis.top_class)
    ):
        pairs.extend([(reference, predicted)] * n)
    from_dataset = len(pairs)
    # Cases without one: the reviewers' consensus.
    votes: dict[int, list[str]] = defaultdict(list)
    for case_id, diagnosis in db.session.execute(
        select(Review.case_id, Review.diagnosis)
        .join(Case, Case.id == Review.case_id)
        .where(Case.reference_dx.is_(None))
    ):
        votes[case_id].append(diagnosis)
    agreed = {case_id: dx for case_id, d in votes.items() if (dx := consensus(d))}
    ids = list(agreed)
    for start in range(0, len(ids), 500):
        for case_id, predicted in db.session.execute(
            select(Image.case_id, Analysis.top_class)
            .join(Analysis, Analysis.image_id == Image.id)
            .where(
                Analysis.model_version_id == model_version_id,
                Analysis.status == AnalysisStatus.SUCCEEDED,
                Image.case_id.in_(ids[start : start + 500]),
            )
        ):
            pairs.append((agreed[case_id], predicted))
    matrix = confusion_matrix(pairs, classes)
    correct = sum(matrix[i][i] for i in range(len(classes)))
    total = sum(map(sum, matrix))
    return {
        "model_version": {
            "id": mv.id,
            "name": mv.name,
            "version": mv.version,
            "trained": mv.trained,
            "trained_on": mv.trained_on,
        }
        if mv
        else None,
        "classes": classes,
        "matrix": matrix,
        "n": total,
        "n_dataset_reference": from_dataset,
        "n_consensus_reference": total - from_dataset,
        "accuracy": correct / total if total else None,
        "sensitivity": sensitivity(matrix, classes),
        "balanced_accuracy": balanced_accuracy(matrix, classes),
    }


def reviewer_agreement(min_shared: int = 2) -> list[dict[str, Any]]:
    """Cohen's kappa for each pair of reviewers over the cases both reviewed (at least `min_shared`)."""
    by_reviewer: dict[int, dict[int, str]] = defaultdict(dict)
    for case_id, reviewer_id, diagnosis in db.session.execute(
        select(Review.case_id, Review.reviewer_id, Review.diagnosis)
    ):
        by_reviewer[reviewer_id][case_id] = diagnosis
    emails = (
        dict(db.session.execute(select(User.id, User.email).where(User.id.in_(list(by_reviewer)))).all())
        if by_reviewer
        else {}
    )
    out = []
    for r1, r2 in combinations(sorted(by_reviewer), 2):
        shared = sorted(set(by_reviewer[r1]) & set(by_reviewer[r2]))
        if len(shared) < min_shared:
            continue
        a = [by_reviewer[r1][c] for c in shared]
        b = [by_reviewer[r2][c] for c in shared]
        out.append(
            {
                "reviewers": [emails.get(r1), emails.get(r2)],
                "shared_cases": len(shared),
                "observed_agreement": sum(x == y for x, y in zip(a, b)) / len(shared),
                "kappa": cohen_kappa(a, b),
            }
        )
    return out


def dashboard(model_version_id: int | None = None) -> dict[str, Any]:
    versions = model_versions_with_results()
    if model_version_id is None and versions:
        model_version_id = max(versions, key=lambda v: v["analyses"])["id"]
    counts = {
        "cases": db.session.scalar(select(func.count()).select_from(Case)),
        "with_reference": db.session.scalar(
            select(func.count()).select_from(Case).where(Case.reference_dx.is_not(None))
        ),
        "reviewed": db.session.scalar(select(func.count(func.distinct(Review.case_id)))),
        "reviews": db.session.scalar(select(func.count()).select_from(Review)),
    }
    return {
        "counts": counts,
        "model_versions": versions,
        "model": model_against_reference(model_version_id) if model_version_id else None,
        "reviewer_agreement": reviewer_agreement(),
    }
