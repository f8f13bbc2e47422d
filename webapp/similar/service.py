"""The up to ten most similar other cases of an analysis, from the vector index (webapp.similar.index).

Each neighbour is a case the viewer may see, never the query's own case, listed once (its closest
image), nearest first, with a label: the reviewers' consensus when at least
CONSENSUS_MIN_REVIEWERS agree (webapp.cases.listing.consensus), else the reference diagnosis of
the metadata CSV, else none. Cases of the query's lesion (`lesion_ref`) are marked `same_lesion`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flask import current_app, url_for
from sqlalchemy import func, select

from ..cases.listing import consensus
from ..dashboard.figures import CONSENSUS_MIN_REVIEWERS
from ..db import db
from ..models import Analysis, Case, Image, Review, User
from ..states import AnalysisStatus
from . import index as vector_index

MAX_SIMILAR = 10
OVERFETCH = 4  # neighbours asked for per case shown: other images of one case, and deleted rows, drop out


def index_folder() -> Path:
    return Path(current_app.config["INSTANCE_DIR"]) / "similar"


def score(cosine: float) -> float:
    """Cosine similarity [-1, 1] -> the API's score in [0, 1], higher is closer."""
    return round(min(1.0, max(0.0, (1.0 + cosine) / 2.0)), 4)


def visible(query, viewer: User | None):
    """Restricts a query over cases to those the viewer may see: every signed-in user of this portal
    sees every case (as the case list, webapp.cases.listing), so only an anonymous viewer sees none."""
    return query if viewer is not None else query.where(Case.id.is_(None))


def labels(case_ids: list[int], reference: dict[int, str | None]) -> dict[int, tuple[str | None, str | None]]:
    """case id -> (label, label_source) for each of `case_ids` (one query for the reviews)."""
    votes: dict[int, list[str]] = {}
    for case_id, diagnosis in db.session.execute(
        select(Review.case_id, Review.diagnosis).where(Review.case_id.in_(case_ids))
    ):
        votes.setdefault(case_id, []).append(diagnosis)
    out = {}
    for case_id in case_ids:
        agreed = consensus(votes.get(case_id, [])) if len(votes.get(case_id, [])) >= CONSENSUS_MIN_REVIEWERS else None
        if agreed:
            out[case_id] = (agreed, "review_consensus")
        elif reference.get(case_id):
            out[case_id] = (reference[case_id], "reference")
        else:
            out[case_id] = (None, None)
    return out


def _neighbour_rows(analysis_ids: list[int], viewer: User | None):
    query = (
        select(Analysis.id, Image.case_id, Image.storage_key, Case.reference_dx, Case.lesion_ref)
        .join(Image, Image.id == Analysis.image_id)
        .join(Case, Case.id == Image.case_id)
        .where(Analysis.id.in_(analysis_ids), Analysis.status == AnalysisStatus.SUCCEEDED)
    )
    return {row.id: row for row in db.session.execute(visible(query, viewer))}


def _nearest_cases(built, vector: np.ndarray, own_case: int, viewer: User | None, limit: int) -> list[tuple]:
    """(row, cosine) of the nearest other visible cases, one per case, nearest first."""
    k = limit * OVERFETCH + 1
    while True:
        found = built.search(vector, k)
        rows = _neighbour_rows([i for i, _ in found], viewer)
        best: dict[int, tuple] = {}
        for analysis_id, cosine in found:
            row = rows.get(analysis_id)
            if row is not None and row.case_id != own_case and row.case_id not in best:
                best[row.case_id] = (row, cosine)
        if len(best) >= limit or k >= len(built.ids):
            return list(best.values())[:limit]
        k *= 4


def similar_cases(analysis: Analysis, viewer: User | None, limit: int = MAX_SIMILAR) -> list[dict[str, Any]]:
    """The API's `similar_cases` of one analysis (empty when it stored no embedding)."""
    blob = analysis.embedding
    if not blob or analysis.status != AnalysisStatus.SUCCEEDED:
        return []
    built = vector_index.current(analysis.model_version_id, index_folder())
    if built is None or len(blob) != 2 * built.dims:
        return []
    vector = vector_index.vectors_from_blobs([blob])[0]
    own = db.session.get(Image, analysis.image_id).case
    nearest = _nearest_cases(built, vector, own.id, viewer, limit)
    named = labels([row.case_id for row, _ in nearest], {row.case_id: row.reference_dx for row, _ in nearest})
    return [
        {
            "case_id": row.case_id,
            "score": score(cosine),
            "label": named[row.case_id][0],
            "label_source": named[row.case_id][1],
            "same_lesion": bool(own.lesion_ref) and row.lesion_ref == own.lesion_ref,
            "thumbnail_url": url_for("cases.stored_file", key=row.storage_key),
        }
        for row, cosine in nearest
    ]


def add_similar_cases(analyses: list[dict[str, Any]], viewer: User | None) -> None:
    """Sets `similar_cases` on each analysis dict of webapp.presenters.case_dict."""
    for entry in analyses:
        analysis = db.session.get(Analysis, entry["id"])
        entry["similar_cases"] = similar_cases(analysis, viewer) if analysis is not None else []


def rebuild_all() -> dict[int, int]:
    """Rebuilds and saves the index of every model version with stored embeddings: {version id: vectors}."""
    versions = db.session.scalars(
        select(Analysis.model_version_id).where(Analysis.embedding.is_not(None)).group_by(Analysis.model_version_id)
    ).all()
    vector_index.forget()
    counts = {}
    for version_id in versions:
        built = vector_index.rebuild(version_id)
        if built is not None:
            vector_index.save(built, index_folder(), version_id)
            counts[version_id] = len(built.ids)
    return counts


def flagged_counts(analysis_filter) -> int:
    """How many analyses matching `analysis_filter` are flagged out of distribution."""
    return (
        db.session.scalar(
            select(func.count()).select_from(Analysis).where(analysis_filter, Analysis.ood_flagged.is_(True))
        )
        or 0
    )
