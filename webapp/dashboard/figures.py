"""Agreement figures computed in the web process (plain Python: no numpy/sklearn needed here).

- `confusion_matrix`, `sensitivity`, `balanced_accuracy`: the model against a reference diagnosis.
- `cohen_kappa`: agreement between two raters beyond chance, kappa = (p_o - p_e) / (1 - p_e), where
  p_o is the observed agreement and p_e the agreement expected from each rater's label frequencies.
- `wilson_interval`, `proportion`: every figure comes with its n and a 95 % confidence interval.
- `dashboard`: those figures from the database, against the data set's reference diagnosis and,
  apart, against the reviewers' consensus (cases with at least two reviewers); model versions
  compared on the same images only (paired); kappa for every pair of reviewers on the cases both
  reviewed.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from itertools import combinations
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import aliased

from ..cases.listing import consensus
from ..db import db
from ..models import DX_CLASSES, Analysis, Case, Image, ModelVersion, Review, User
from ..states import AnalysisStatus

Z95 = 1.959964  # the standard normal quantile of a two-sided 95 % interval
CONSENSUS_MIN_REVIEWERS = 2


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


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion: unlike p +- z*se it stays inside [0, 1] and is not
    of zero width at 0/n or n/n, so "sensitivity 1.00 from one case" reads as 1.00 (0.21-1.00)."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, n: int) -> dict[str, Any]:
    """A figure as the pages and the API show it: value, k of n, and its 95 % Wilson interval."""
    interval = wilson_interval(successes, n)
    return {
        "value": successes / n if n else None,
        "k": successes,
        "n": n,
        "low": interval[0] if interval else None,
        "high": interval[1] if interval else None,
    }


def mean_of_proportions(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Balanced accuracy (the mean of per-class sensitivities) with a conservative 95 % interval: the
    mean of the classes' Wilson bounds. A normal approximation collapses to zero width when every
    class is at 0 or 1 (0.00-0.00 from three cases); these bounds never do, and with one class they
    are that class's Wilson interval."""
    if not parts:
        return {"value": None, "n": 0, "classes": 0, "low": None, "high": None}
    k = len(parts)
    return {
        "value": sum(p["value"] for p in parts) / k,
        "n": sum(p["n"] for p in parts),
        "classes": k,
        "low": sum(p["low"] for p in parts) / k,
        "high": sum(p["high"] for p in parts) / k,
    }


def kappa_interval(a: Sequence[Hashable], b: Sequence[Hashable]) -> list[float] | None:
    """An approximate 95 % interval of Cohen's kappa: the Wilson interval of the observed agreement
    carried through kappa = (p_o - p_e) / (1 - p_e), with p_e held fixed. Unlike kappa +- z*se it is
    not of zero width when the reviewers agreed on every case."""
    kappa = cohen_kappa(a, b)
    if kappa is None:
        return None
    n = len(a)
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[k] * count_b[k] for k in set(count_a) | set(count_b)) / (n * n)
    low, high = wilson_interval(sum(1 for x, y in zip(a, b) if x == y), n)
    return [(low - expected) / (1 - expected), (high - expected) / (1 - expected)]


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


def _reference_figures(pairs: list[tuple[str, str]], classes: list[str]) -> dict[str, Any]:
    """Confusion matrix, accuracy, per-class sensitivity and balanced accuracy, each with n and a 95 % CI."""
    matrix = confusion_matrix(pairs, classes)
    correct = sum(matrix[i][i] for i in range(len(classes)))
    total = sum(map(sum, matrix))
    per_class = {c: proportion(matrix[i][i], sum(matrix[i])) for i, c in enumerate(classes)}
    return {
        "n": total,
        "matrix": matrix,
        "accuracy": proportion(correct, total),
        "sensitivity": per_class,
        "balanced_accuracy": mean_of_proportions([v for v in per_class.values() if v["n"]]),
    }


def _mv_dict(mv: ModelVersion) -> dict[str, Any]:
    return {"id": mv.id, "name": mv.name, "version": mv.version, "trained": mv.trained, "trained_on": mv.trained_on}


def _succeeded(model_version_id: int):
    return (Analysis.model_version_id == model_version_id, Analysis.status == AnalysisStatus.SUCCEEDED)


def dataset_pairs(model_version_id: int) -> list[tuple[str, str]]:
    """(the data set's reference diagnosis, the prediction) of every analysed image that has one."""
    pairs: list[tuple[str, str]] = []
    for reference, predicted, n in db.session.execute(
        select(Case.reference_dx, Analysis.top_class, func.count())
        .join(Image, Image.case_id == Case.id)
        .join(Analysis, Analysis.image_id == Image.id)
        .where(*_succeeded(model_version_id), Case.reference_dx.is_not(None))
        .group_by(Case.reference_dx, Analysis.top_class)
    ):
        pairs.extend([(reference, predicted)] * n)
    return pairs


def consensus_pairs(model_version_id: int, min_reviewers: int = CONSENSUS_MIN_REVIEWERS) -> list[tuple[str, str]]:
    """(the reviewers' consensus, the prediction) for cases reviewed by at least `min_reviewers`: one
    reviewer's opinion is not a consensus."""
    votes: dict[int, list[str]] = defaultdict(list)
    for case_id, diagnosis in db.session.execute(select(Review.case_id, Review.diagnosis)):
        votes[case_id].append(diagnosis)
    agreed = {case_id: dx for case_id, d in votes.items() if len(d) >= min_reviewers and (dx := consensus(d))}
    ids, pairs = list(agreed), []
    for start in range(0, len(ids), 500):
        for case_id, predicted in db.session.execute(
            select(Image.case_id, Analysis.top_class)
            .join(Analysis, Analysis.image_id == Image.id)
            .where(*_succeeded(model_version_id), Image.case_id.in_(ids[start : start + 500]))
        ):
            pairs.append((agreed[case_id], predicted))
    return pairs


def model_against_reference(model_version_id: int) -> dict[str, Any]:
    """The model against the data set's reference and, apart, against the reviewers' consensus."""
    mv = db.session.get(ModelVersion, model_version_id)
    classes = list(mv.class_names) if mv else list(DX_CLASSES)
    return {
        "model_version": _mv_dict(mv) if mv else None,
        "classes": classes,
        "dataset": _reference_figures(dataset_pairs(model_version_id), classes),
        "consensus": _reference_figures(consensus_pairs(model_version_id), classes),
        "consensus_min_reviewers": CONSENSUS_MIN_REVIEWERS,
    }


def paired_comparison(model_version_id: int, versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chosen version against each other version on the same images only (both analysed, with
    the data set's reference): n, each one's accuracy and balanced accuracy there, and the
    discordant images (one right, the other wrong), the counts McNemar's test reads."""
    mv = db.session.get(ModelVersion, model_version_id)
    classes = list(mv.class_names) if mv else list(DX_CLASSES)
    other = aliased(Analysis)
    out = []
    for v in versions:
        if v["id"] == model_version_id:
            continue
        triples: list[tuple[str, str, str]] = []
        for reference, mine, theirs, n in db.session.execute(
            select(Case.reference_dx, Analysis.top_class, other.top_class, func.count())
            .join(Image, Image.case_id == Case.id)
            .join(Analysis, Analysis.image_id == Image.id)
            .join(other, other.image_id == Image.id)
            .where(*_succeeded(model_version_id), Case.reference_dx.is_not(None))
            .where(other.model_version_id == v["id"], other.status == AnalysisStatus.SUCCEEDED)
            .group_by(Case.reference_dx, Analysis.top_class, other.top_class)
        ):
            triples.extend([(reference, mine, theirs)] * n)
        chosen = _reference_figures([(r, a) for r, a, _ in triples], classes)
        compared = _reference_figures([(r, b) for r, _, b in triples], classes)
        out.append(
            {
                "other": v,
                "n": len(triples),
                "chosen": {k: chosen[k] for k in ("accuracy", "balanced_accuracy")},
                "compared": {k: compared[k] for k in ("accuracy", "balanced_accuracy")},
                "only_chosen_right": sum(1 for r, a, b in triples if a == r != b),
                "only_compared_right": sum(1 for r, a, b in triples if b == r != a),
            }
        )
    return out


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
        agreed = proportion(sum(x == y for x, y in zip(a, b)), len(shared))
        kappa = cohen_kappa(a, b)
        out.append(
            {
                "reviewers": [emails.get(r1), emails.get(r2)],
                "shared_cases": len(shared),
                "observed_agreement": agreed["value"],
                "observed_agreement_ci": [agreed["low"], agreed["high"]],
                "kappa": kappa,
                "kappa_ci": kappa_interval(a, b),
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
        "paired": paired_comparison(model_version_id, versions) if model_version_id else [],
        "reviewer_agreement": reviewer_agreement(),
    }
