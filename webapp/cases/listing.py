"""The case list: filters, keyset pagination, and page summaries without N+1 queries.

One query fetches the page (LIMIT per_page + 1, ordered by an indexed key, continued from a cursor
instead of an OFFSET), one counts the matches, and four fetch what the page's rows show (their
images and analyses, jobs, reviews and uploaders) for all of the page's case ids at once. Filters on
related tables are `cases.id IN (SELECT case_id ...)` subqueries that start from an indexed column (analyses.top_class,
jobs.status, reviews.reviewer_id, batch_items.batch_id), so they stay fast at 100,000 cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import and_, func, not_, or_, select

from ..db import db
from ..models import (
    DX_CLASSES,
    DX_LONG_NAMES,
    SEXES,
    SITES,
    Analysis,
    BatchItem,
    Case,
    Image,
    Job,
    ModelVersion,
    Review,
    User,
)
from ..presenters import STATUS_ORDER, iso, model_dict, out_of_distribution, review_dict
from ..review import blind
from ..security import ID_MAX
from ..states import AnalysisStatus, JobStatus

SORTS = ("newest", "oldest", "age", "-age")
REVIEW_STATES = ("unreviewed", "reviewed", "reviewed_by_me", "not_reviewed_by_me")
AGREEMENTS = ("agree", "disagree", "matches_reference", "differs_from_reference")
STATUSES = tuple(JobStatus)
MAX_PER_PAGE = 200
DEFAULT_PER_PAGE = 50


class FilterError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


@dataclass(frozen=True)
class CaseFilters:
    q: str = ""
    predicted: str = ""
    model_version: int | None = None
    reference: str = ""  # a dx, "any" (has one) or "none"
    review: str = ""
    agreement: str = ""
    status: str = ""
    date_from: date | None = None
    date_to: date | None = None
    age_min: int | None = None
    age_max: int | None = None
    sex: str = ""
    site: str = ""
    batch: int | None = None
    uploader: int | None = None
    sort: str = "newest"
    per_page: int = DEFAULT_PER_PAGE
    cursor: str = ""

    def query_args(self, **changes: Any) -> dict[str, str]:
        """The non-default filters as URL query arguments (for links, exports and the next page)."""
        values = {**asdict(self), **changes}
        out = {}
        for f in fields(self):
            value = values[f.name]
            if (
                value in (None, "")
                or (f.name == "sort" and value == "newest")
                or (f.name == "per_page" and value == DEFAULT_PER_PAGE)
            ):
                continue
            out[f.name] = value.isoformat() if isinstance(value, date) else str(value)
        return out

    @property
    def active(self) -> bool:
        return bool(set(self.query_args()) - {"sort", "per_page", "cursor"})


def _int(args: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = (args.get(name) or "").strip()
    if not raw:
        return None
    if not raw.lstrip("-").isdigit() or not low <= int(raw) <= high:
        raise FilterError(name, f"{name} must be a whole number between {low} and {high}, got {raw[:20]!r}.")
    return int(raw)


def _date(args: Mapping[str, str], name: str) -> date | None:
    raw = (args.get(name) or "").strip()
    if not raw:
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise FilterError(name, f"{name} must be a date like 2026-01-31, got {raw[:20]!r}.") from None


def _choice(args: Mapping[str, str], name: str, choices, default: str = "") -> str:
    raw = (args.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise FilterError(name, f"{name} must be one of {', '.join(choices)}, got {raw[:30]!r}.")
    return raw


def parse_filters(args: Mapping[str, str]) -> CaseFilters:
    """Reads the filters from query arguments. Raises FilterError naming the bad argument."""
    site = " ".join((args.get("site") or "").strip().lower().replace("_", " ").split())
    if site and site not in SITES:
        raise FilterError("site", f"site must be one of {', '.join(SITES)}, got {site[:30]!r}.")
    f = CaseFilters(
        q=(args.get("q") or "").strip()[:100],
        predicted=(args.get("predicted") or "").strip().lower()[:20],
        model_version=_int(args, "model_version", 1, ID_MAX),
        reference=_choice(args, "reference", DX_CLASSES + ("any", "none")),
        review=_choice(args, "review", REVIEW_STATES),
        agreement=_choice(args, "agreement", AGREEMENTS),
        status=_choice(args, "status", STATUSES),
        date_from=_date(args, "date_from"),
        date_to=_date(args, "date_to"),
        age_min=_int(args, "age_min", 0, 120),
        age_max=_int(args, "age_max", 0, 120),
        sex=_choice(args, "sex", SEXES),
        site=site,
        batch=_int(args, "batch", 1, ID_MAX),
        uploader=_int(args, "uploader", 1, ID_MAX),
        sort=_choice(args, "sort", SORTS, "newest"),
        per_page=_int(args, "per_page", 1, MAX_PER_PAGE) or DEFAULT_PER_PAGE,
        cursor=(args.get("cursor") or "").strip()[:40],
    )
    if f.predicted and not f.predicted.replace("_", "").isalnum():
        raise FilterError("predicted", "predicted must be a class name such as mel or nv.")
    # A reversed range is refused, not swapped: the caller learns which bound was wrong.
    if f.date_from and f.date_to and f.date_from > f.date_to:
        raise FilterError("date_to", f"date_to ({f.date_to}) is before date_from ({f.date_from}).")
    if f.age_min is not None and f.age_max is not None and f.age_min > f.age_max:
        raise FilterError("age_max", f"age_max ({f.age_max}) is below age_min ({f.age_min}).")
    return f


def _analyses_of(f: CaseFilters, *conditions):
    # top_class is set only when an analysis succeeded, so the (top_class, model_version_id, image_id)
    # indexes answer this without reading the analyses rows.
    query = (
        select(Image.case_id)
        .join(Analysis, Analysis.image_id == Image.id)
        .where(Analysis.top_class.is_not(None), *conditions)
    )
    if f.model_version:
        query = query.where(Analysis.model_version_id == f.model_version)
    return query


def _contains(column, pattern: str):
    # SQLite's LIKE already ignores ASCII letter case, and its ILIKE is lower(x) LIKE lower(y): half
    # as fast for the same answer. PostgreSQL's LIKE is case-sensitive, so it gets ILIKE.
    if db.session.get_bind().dialect.name == "sqlite":
        return column.like(pattern, escape="\\")
    return column.ilike(pattern, escape="\\")


def _text_search(q: str):
    """`q` anywhere in the lesion or patient reference or the file name, in any letter case (researchers
    look for "0024" in "ISIC_0024306"); digits alone also match that case id. No index serves a
    substring: each search scans the three columns (measured at 100,000 cases on SQLite, 2 busy
    cores: about 0.2 s per scan, and a page of results makes two, its rows and their count)."""
    pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    matches = [
        _contains(Case.lesion_ref, pattern),
        _contains(Case.patient_ref, pattern),
        Case.id.in_(select(Image.case_id).where(_contains(Image.original_filename, pattern))),
    ]
    if q.isdigit() and len(q) < 10:
        matches.append(Case.id == int(q))
    return or_(*matches)


def conditions(f: CaseFilters, user: User | None) -> list:
    """The SQL conditions on `cases` for the filters (without the cursor)."""
    return [
        *_search_conditions(f),
        *_model_conditions(f, user),
        *_reference_conditions(f),
        *_review_conditions(f, user),
        *_field_conditions(f),
    ]


def _search_conditions(f: CaseFilters) -> list:
    if not f.q:
        return []
    text = f.q.lstrip("#")
    if f.q.startswith("#") and text.isdigit() and int(text) <= ID_MAX:
        return [Case.id == int(text)]
    return [_text_search(f.q)]


def _model_conditions(f: CaseFilters, user: User | None) -> list:
    """The predicted class, the model version, and how the model's answer compares with the reviews
    or the reference diagnosis."""
    where: list = []
    if f.predicted:
        where.append(Case.id.in_(_analyses_of(f, Analysis.top_class == f.predicted)))
    elif f.model_version and f.agreement not in ("matches_reference", "differs_from_reference"):  # those imply it
        where.append(Case.id.in_(_analyses_of(f)))
    if f.agreement in ("agree", "disagree"):
        where.append(Case.id.in_(select(Review.case_id).where(Review.agrees_with_model.is_(f.agreement == "agree"))))
    elif f.agreement in ("matches_reference", "differs_from_reference"):
        # Correlated EXISTS, not IN: SQLite then walks the page's cases in index order and checks
        # each one's analyses, instead of first joining every analysis with every labelled case.
        compare = (
            Analysis.top_class == Case.reference_dx
            if f.agreement == "matches_reference"
            else Analysis.top_class != Case.reference_dx
        )
        where.append(Case.reference_dx.is_not(None))
        where.append(_analyses_of(f, compare).where(Image.case_id == Case.id).correlate(Case).exists())
    reviewed_only = blind.only_reviewed_by(user)
    if (f.predicted or f.agreement) and reviewed_only is not None:
        # Matching on the model's answer would give it away for the cases a blinded reviewer has not reviewed.
        where.append(reviewed_only)
    return where


def _reference_conditions(f: CaseFilters) -> list:
    if f.reference == "any":
        return [Case.reference_dx.is_not(None)]
    if f.reference == "none":
        return [Case.reference_dx.is_(None)]
    return [Case.reference_dx == f.reference] if f.reference else []


def _review_conditions(f: CaseFilters, user: User | None) -> list:
    reviewed, mine = (
        select(Review.case_id),
        select(Review.case_id).where(Review.reviewer_id == (user.id if user else -1)),
    )
    return {
        "unreviewed": [not_(Case.id.in_(reviewed))],
        "reviewed": [Case.id.in_(reviewed)],
        "reviewed_by_me": [Case.id.in_(mine)],
        "not_reviewed_by_me": [not_(Case.id.in_(mine))],
    }.get(f.review, [])


def _field_conditions(f: CaseFilters) -> list:
    """The job status, and the case's own fields: upload dates, age, sex, site, batch, uploader."""
    where: list = []
    if f.status:
        analysed = select(Image.case_id).join(Job, Job.image_id == Image.id)
        where.append(Case.id.in_(analysed.where(Job.status == f.status, Job.kind == "analyse")))
    if f.date_from:
        where.append(Case.created_at >= datetime.combine(f.date_from, time.min, UTC))
    if f.date_to:
        where.append(Case.created_at < datetime.combine(f.date_to + timedelta(days=1), time.min, UTC))
    if f.age_min is not None:
        where.append(Case.age >= f.age_min)
    if f.age_max is not None:
        where.append(Case.age <= f.age_max)
    if f.sex:
        where.append(Case.sex == f.sex)
    if f.site:
        where.append(Case.site == f.site)
    if f.batch:
        where.append(Case.id.in_(select(BatchItem.case_id).where(BatchItem.batch_id == f.batch)))
    if f.uploader:
        where.append(Case.uploader_id == f.uploader)
    return where


def _sort(f: CaseFilters):
    """(order_by clauses, cursor condition builder, cursor value of a row)."""
    if f.sort in ("newest", "oldest"):
        descending = f.sort == "newest"
        order = [Case.id.desc() if descending else Case.id.asc()]

        def after(cursor: str):
            if not cursor.isdigit() or int(cursor) > ID_MAX:
                raise FilterError("cursor", "cursor is not one this list handed out.")
            return Case.id < int(cursor) if descending else Case.id > int(cursor)

        return order, after, lambda case: str(case.id)
    descending = f.sort == "-age"
    age = func.coalesce(Case.age, -1)
    order = [age.desc(), Case.id.desc()] if descending else [age.asc(), Case.id.asc()]

    def after_age(cursor: str):
        try:
            value, case_id = (int(part) for part in cursor.split(":"))
        except ValueError:
            raise FilterError("cursor", "cursor is not one this list handed out.") from None
        if max(abs(value), case_id) > ID_MAX:
            raise FilterError("cursor", "cursor is not one this list handed out.")
        if descending:
            return or_(age < value, and_(age == value, Case.id < case_id))
        return or_(age > value, and_(age == value, Case.id > case_id))

    return order, after_age, lambda case: f"{case.age if case.age is not None else -1}:{case.id}"


@dataclass
class CasePage:
    rows: list[dict[str, Any]]
    total: int
    next_cursor: str | None
    filters: CaseFilters


def fetch_page(f: CaseFilters, user: User | None, with_reviews: bool = False, count: bool = True) -> CasePage:
    where = conditions(f, user)
    order, after, cursor_of = _sort(f)
    # Ids first (sorting a few thousand integers is cheap, whole rows are not), then the page's rows.
    query = select(Case.id).where(*where)
    if f.cursor:
        query = query.where(after(f.cursor))
    ids = db.session.scalars(query.order_by(*order).limit(f.per_page + 1)).all()
    by_id = {c.id: c for c in db.session.scalars(select(Case).where(Case.id.in_(ids)))} if ids else {}
    cases = [by_id[i] for i in ids]
    more = len(cases) > f.per_page
    cases = cases[: f.per_page]
    total = db.session.scalar(select(func.count()).select_from(Case).where(*where)) if count else -1
    rows = summarise(cases, f, user, with_reviews=with_reviews)
    return CasePage(rows, total, cursor_of(cases[-1]) if more and cases else None, f)


def page_json(page: CasePage, next_url: str | None, disclaimer: str) -> dict[str, Any]:
    """A page of the list as JSON: the same body for the API (token) and the page's export (session)."""
    return {
        "cases": page.rows,
        "total": page.total,
        "per_page": page.filters.per_page,
        "next_cursor": page.next_cursor,
        "next": next_url,
        "filters": page.filters.query_args(cursor=""),
        "disclaimer": disclaimer,
    }


# --- what a row shows ---------------------------------------------------------------------------


def _prediction(analysis: Analysis, mv: ModelVersion) -> dict[str, Any]:
    probs = analysis.probabilities or {}
    malignant = sum(float(probs.get(c, 0.0)) for c in mv.malignant_classes)
    return {
        "analysis_id": analysis.id,
        "model_version_id": mv.id,
        "model": model_dict(mv, analysis.metadata_used),
        "metadata_used": bool(analysis.metadata_used),
        "out_of_distribution": out_of_distribution(analysis),
        "top_class": analysis.top_class,
        "top_class_name": mv.class_long_names.get(analysis.top_class, analysis.top_class),
        "probability": float(probs.get(analysis.top_class, 0.0)) if analysis.top_class else None,
        "malignant_probability": round(malignant, 6) if probs else None,
        "probabilities": {c: float(probs[c]) for c in mv.class_names if c in probs},
    }


def consensus(diagnoses: list[str]) -> str | None:
    """The reviewers' consensus: the one diagnosis among the seven classes with the most votes (a tie,
    or only 'other'/'uncertain', gives none)."""
    votes: dict[str, int] = {}
    for dx in diagnoses:
        if dx in DX_CLASSES:
            votes[dx] = votes.get(dx, 0) + 1
    if not votes:
        return None
    ranked = sorted(votes.items(), key=lambda kv: -kv[1])
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


@dataclass
class _PageRelations:
    """What the rows of a page show beyond its cases, fetched for all of its case ids at once."""

    analyses: dict[int, list[tuple[Analysis, ModelVersion]]]  # succeeded analyses per case, oldest first
    filenames: dict[int, str | None]  # of each case's first image
    thumbnails: dict[int, str]
    jobs: dict[int, dict[tuple[int, str], str]]  # per case: (image id, kind) -> the newest job's status
    reviews: dict[int, list[tuple[Review, str]]]  # per case: (review, reviewer's email), oldest first
    uploaders: dict[int, str]  # user id -> email


def _page_relations(cases: list[Case]) -> _PageRelations:
    ids = [c.id for c in cases]
    relations = _PageRelations({}, {}, {}, {}, {}, {})
    for case_id, filename, key, analysis, mv in db.session.execute(
        select(Image.case_id, Image.original_filename, Image.storage_key, Analysis, ModelVersion)
        .outerjoin(Analysis, and_(Analysis.image_id == Image.id, Analysis.status == AnalysisStatus.SUCCEEDED))
        .outerjoin(ModelVersion, ModelVersion.id == Analysis.model_version_id)
        .where(Image.case_id.in_(ids))
        .order_by(Image.id, Analysis.id)
    ):
        relations.filenames.setdefault(case_id, filename)
        relations.thumbnails.setdefault(case_id, f"/files/{key}")
        if analysis is not None:
            relations.analyses.setdefault(case_id, []).append((analysis, mv))
    for case_id, image_id, kind, status in db.session.execute(
        select(Image.case_id, Job.image_id, Job.kind, Job.status)
        .join(Job, Job.image_id == Image.id)
        .where(Image.case_id.in_(ids))
        .order_by(Job.id)
    ):
        relations.jobs.setdefault(case_id, {})[(image_id, kind)] = status
    for review, email in db.session.execute(
        select(Review, User.email)
        .join(User, User.id == Review.reviewer_id)
        .where(Review.case_id.in_(ids))
        .order_by(Review.id)
    ):
        relations.reviews.setdefault(review.case_id, []).append((review, email))
    uploader_ids = {c.uploader_id for c in cases if c.uploader_id}
    if uploader_ids:
        relations.uploaders = dict(
            db.session.execute(select(User.id, User.email).where(User.id.in_(uploader_ids))).all()
        )
    return relations


def summarise(cases: list[Case], f: CaseFilters, user: User | None, with_reviews: bool = False) -> list[dict[str, Any]]:
    """Row dicts for `cases`, with four queries in all (images and analyses, jobs, reviews, uploaders),
    whatever their number."""
    if not cases:
        return []
    relations = _page_relations(cases)
    blinded = blind.blinded_cases(user, [c.id for c in cases])
    rows = []
    for case in cases:
        row = _row(case, relations, f, user)
        if with_reviews:
            row["reviews"] = [review_dict(r, email) for r, email in relations.reviews.get(case.id, [])]
        if case.id in blinded:
            blind.hide_in_row(row)
        rows.append(row)
    return rows


def _row(case: Case, relations: _PageRelations, f: CaseFilters, user: User | None) -> dict[str, Any]:
    preds = [_prediction(a, mv) for a, mv in relations.analyses.get(case.id, [])]
    chosen = [p for p in preds if p["model_version_id"] == f.model_version] if f.model_version else preds
    if f.predicted:  # show the prediction that the filter matched
        chosen = [p for p in chosen if p["top_class"] == f.predicted] or chosen
    statuses = set(relations.jobs.get(case.id, {}).values())
    return {
        "id": case.id,
        "url": f"/api/v1/cases/{case.id}",
        "created": iso(case.created_at),
        "uploader": relations.uploaders.get(case.uploader_id),
        "batch_id": case.batch_id,
        "filename": relations.filenames.get(case.id),
        "image_url": relations.thumbnails.get(case.id),
        "patient_ref": case.patient_ref,
        "lesion_ref": case.lesion_ref,
        "age": case.age,
        "sex": case.sex,
        "site": case.site,
        "reference_dx": case.reference_dx,
        "reference_dx_type": case.reference_dx_type,
        "reference_dx_name": DX_LONG_NAMES.get(case.reference_dx) if case.reference_dx else None,
        "status": next((s for s in STATUS_ORDER if s in statuses), JobStatus.QUEUED),
        "prediction": chosen[-1] if chosen else None,
        "differs_from_reference": bool(chosen and case.reference_dx and chosen[-1]["top_class"] != case.reference_dx),
        "predictions": preds,
        "review_summary": _review_summary(relations.reviews.get(case.id, []), user),
    }


def _review_summary(reviews: list[tuple[Review, str]], user: User | None) -> dict[str, Any]:
    return {
        "count": len(reviews),
        "consensus": consensus([r.diagnosis for r, _ in reviews]),
        "agree": sum(1 for r, _ in reviews if r.agrees_with_model is True),
        "disagree": sum(1 for r, _ in reviews if r.agrees_with_model is False),
        "mine": next((r.diagnosis for r, _ in reviews if user and r.reviewer_id == user.id), None),
    }
