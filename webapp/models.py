"""The portal's tables as typed SQLAlchemy 2.0 models.

Created by the Alembic migrations in `migrations/versions/`; a test checks that the migrations and
these models agree. The web app and the worker both import this module, so it imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime
from typing import Any

from flask_login import UserMixin
from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship
from werkzeug.security import check_password_hash, generate_password_hash

from .db import db
from .states import AnalysisStatus, ExplanationMethod, ExplanationStatus, JobKind, JobStatus

ROLES = ("admin", "researcher", "reviewer")
UPLOAD_ROLES = ("admin", "researcher")
# HAM10000's vocabularies, as ml.metadata and ml.model hold them too (webapp may not import ml):
# tests/test_boundaries.py keeps the two sides equal.
SEXES = ("male", "female", "unknown")
# The HAM10000 `localization` vocabulary.
SITES = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "upper extremity",
    "unknown",
)
JOB_STATUSES = tuple(JobStatus)
JOB_KINDS = tuple(JobKind)
ANALYSIS_STATUSES = tuple(AnalysisStatus)
EXPLANATION_METHODS = tuple(ExplanationMethod)
EXPLANATION_STATUSES = tuple(ExplanationStatus)
TOKEN_PREFIX = "dp_"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive ones otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("Store timezone-aware datetimes (use webapp.models.utcnow()).")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


class User(UserMixin, db.Model):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(20), default="researcher")
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Part of every session's id (get_id): raising it ends all of this user's signed-in sessions,
    # since a signed cookie cannot be called back (logout, password or role change, deactivation).
    session_generation: Mapped[int] = mapped_column(default=0, server_default="0")

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", cascade="all, delete-orphan")

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)

    def get_id(self) -> str:  # Flask-Login keeps this in the session; load_user checks it
        return f"{self.id}:{self.session_generation}"

    def end_sessions(self) -> None:
        self.session_generation = (self.session_generation or 0) + 1

    @property
    def is_active(self) -> bool:  # Flask-Login: a deactivated account cannot sign in
        return self.active

    @property
    def can_upload(self) -> bool:
        return self.role in UPLOAD_ROLES

    def __repr__(self) -> str:
        return f"<User {self.email} {self.role}>"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ApiToken(db.Model):
    """An API token; only its SHA-256 is stored, the token itself is shown once when created."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship(back_populates="tokens")

    @classmethod
    def issue(cls, user: User, label: str | None = None) -> tuple[ApiToken, str]:
        """A new token row for `user` and the plain token (which is not stored anywhere)."""
        plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
        return cls(user=user, token_hash=hash_token(plain), label=label), plain


class Case(db.Model):
    __tablename__ = "cases"
    __table_args__ = (
        CheckConstraint("age IS NULL OR (age >= 0 AND age <= 120)", name="age_range"),
        CheckConstraint(f"sex IS NULL OR {_in('sex', SEXES)}", name="sex"),
        CheckConstraint(f"site IS NULL OR {_in('site', SITES)}", name="site"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_ref: Mapped[str | None] = mapped_column(String(64))
    lesion_ref: Mapped[str | None] = mapped_column(String(64))
    age: Mapped[int | None] = mapped_column(Integer)
    sex: Mapped[str | None] = mapped_column(String(10))
    site: Mapped[str | None] = mapped_column(String(32))
    uploader_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # Research portal (migration 0003): the dataset's reference diagnosis and the batch it came in.
    reference_dx: Mapped[str | None] = mapped_column(String(20), index=True)
    reference_dx_type: Mapped[str | None] = mapped_column(String(20))
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id", ondelete="SET NULL"), index=True)

    uploader: Mapped[User | None] = relationship()
    images: Mapped[list[Image]] = relationship(back_populates="case", order_by="Image.id", cascade="all, delete-orphan")


class Image(db.Model):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    # SHA-256 of the normalised pixels (webapp.imaging.pixel_hash), not of the stored file.
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # SHA-256 of the bytes as uploaded: the same file again is refused before it is decoded (a zip of
    # large PNGs once cost the web process tens of seconds of CPU, and again for each repeat).
    source_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    storage_key: Mapped[str] = mapped_column(String(255))
    width: Mapped[int]
    height: Mapped[int]
    original_filename: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    case: Mapped[Case] = relationship(back_populates="images")
    analyses: Mapped[list[Analysis]] = relationship(back_populates="image", order_by="Analysis.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="image", order_by="Job.id")


class ModelVersion(db.Model):
    """One model artifact, registered by the worker from the predictor's manifest."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[str] = mapped_column(String(50))
    trained: Mapped[bool]
    trained_on: Mapped[str | None] = mapped_column(Text)
    class_names: Mapped[list[str]] = mapped_column(JSON)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Research portal (migration 0003): the artifact folder a worker loads for re-runs with this version.
    artifact_path: Mapped[str | None] = mapped_column(String(500))

    @property
    def class_long_names(self) -> dict[str, str]:
        names = self.manifest.get("class_long_names") or {}
        return {c: names.get(c, c) for c in self.class_names}

    @property
    def malignant_classes(self) -> list[str]:
        return list(self.manifest.get("malignant_classes") or [])


class Analysis(db.Model):
    """The result of one model version on one image; kept once succeeded, never overwritten."""

    __tablename__ = "analyses"
    __table_args__ = (
        UniqueConstraint("image_id", "model_version_id"),
        CheckConstraint(_in("status", ANALYSIS_STATUSES), name="status"),
        Index("ix_analyses_model_version_finished", "model_version_id", "finished_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), default=AnalysisStatus.RUNNING)
    probabilities: Mapped[dict[str, float] | None] = mapped_column(JSON)
    top_class: Mapped[str | None] = mapped_column(String(20))
    # True when the version's metadata head combined the case's age, sex and site with the image.
    metadata_used: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)  # milliseconds per step
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The image's embedding (float16, ml.retrieval) and out-of-distribution verdict (ml.ood), from
    # the prediction pass; None for analyses stored before they existed (a re-run fills them).
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    ood_score: Mapped[float | None] = mapped_column(Float)
    ood_flagged: Mapped[bool | None] = mapped_column(Boolean)

    image: Mapped[Image] = relationship(back_populates="analyses")
    model_version: Mapped[ModelVersion] = relationship()
    explanations: Mapped[list[Explanation]] = relationship(back_populates="analysis", order_by="Explanation.id")

    @property
    def malignant_probability(self) -> float | None:
        if not self.probabilities:
            return None
        return float(sum(self.probabilities.get(c, 0.0) for c in self.model_version.malignant_classes))


class Explanation(db.Model):
    """One explanation map of an analysis: per (image, model version, method, class), stored once.

    The raw map (float32 .npy at the stored image's height and width; Grad-CAM in [0, 1], SHAP
    signed) and the overlay (RGBA PNG: the colour map with its own alpha, drawn over the original
    by the page) are storage keys. `params` records how it was made (e.g. max_evals, vmax).
    """

    __tablename__ = "explanations"
    __table_args__ = (
        UniqueConstraint("image_id", "model_version_id", "method", "class_name"),
        CheckConstraint(_in("method", EXPLANATION_METHODS), name="method"),
        CheckConstraint(_in("status", EXPLANATION_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    method: Mapped[str] = mapped_column(String(20))
    class_name: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default=ExplanationStatus.QUEUED, index=True)
    raw_key: Mapped[str | None] = mapped_column(String(255))
    overlay_key: Mapped[str | None] = mapped_column(String(255))
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)  # milliseconds per step
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    analysis: Mapped[Analysis] = relationship(back_populates="explanations")
    image: Mapped[Image] = relationship()
    model_version: Mapped[ModelVersion] = relationship()

    @property
    def pending(self) -> bool:
        return ExplanationStatus(self.status).pending


class Job(db.Model):
    """A unit of background work; committed (queued) before its task is sent to the broker."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint(_in("kind", JOB_KINDS), name="kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), default=JobKind.ANALYSE)
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.QUEUED, index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    analysis_id: Mapped[int | None] = mapped_column(ForeignKey("analyses.id", ondelete="SET NULL"))
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # "host:pid" of the process that claimed the latest attempt (worker.recovery.worker_identity):
    # lets the sweep re-queue at once a job whose process is gone, instead of after the time limit.
    claimed_by: Mapped[str | None] = mapped_column(String(255))

    image: Mapped[Image] = relationship(back_populates="jobs")
    model_version: Mapped[ModelVersion | None] = relationship()
    analysis: Mapped[Analysis | None] = relationship()

    @property
    def finished(self) -> bool:
        return JobStatus(self.status).finished


# --- Research portal (migration 0003): batches, reviews, audit log -----------------------------

# The HAM10000 diagnosis vocabulary (`dx`), the reference a dataset row or a reviewer gives. It is the
# data set's vocabulary, not a model's: each model version still brings its own class names.
DX_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
DX_LONG_NAMES = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
DX_TYPES = ("histo", "follow_up", "consensus", "confocal")
REVIEW_DIAGNOSES = DX_CLASSES + ("other", "uncertain")
REVIEW_ROLES = ("admin", "reviewer")
CONFIDENCE_LEVELS = {1: "very low", 2: "low", 3: "medium", 4: "high", 5: "very high"}
BATCH_SOURCES = ("browser", "api", "zip", "cli")


class Batch(db.Model):
    """A set of uploaded files (a folder, a zip, a server-side import); files arrive in chunks."""

    __tablename__ = "batches"
    __table_args__ = (CheckConstraint(_in("source", BATCH_SOURCES), name="source"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(20), default="api")
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    expected_files: Mapped[int | None] = mapped_column(Integer)  # announced by the browser before the chunks
    # HAM10000 metadata rows by image_id (file stem), validated when the batch was created.
    metadata_rows: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metadata_filename: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    created_by: Mapped[User | None] = relationship()


class BatchItem(db.Model):
    """One file of a batch: the case it created (or the existing case it duplicates), or why it failed."""

    __tablename__ = "batch_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id", ondelete="SET NULL"), index=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    duplicate: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)
    # An entry of a stored zip archive not yet decoded by the ingest task (worker.ingest).
    pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Review(db.Model):
    """A reviewer's current opinion on a case (one per reviewer, editable; changes go to the audit log)."""

    __tablename__ = "reviews"
    __table_args__ = (
        UniqueConstraint("case_id", "reviewer_id"),
        CheckConstraint(_in("diagnosis", REVIEW_DIAGNOSES), name="diagnosis"),
        CheckConstraint("confidence >= 1 AND confidence <= 5", name="confidence"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    diagnosis: Mapped[str] = mapped_column(String(20))
    agrees_with_model: Mapped[bool | None]
    confidence: Mapped[int] = mapped_column(Integer)
    notes: Mapped[str | None] = mapped_column(Text)
    # The prediction the reviewer saw (the case's latest analysis when the review was saved).
    analysis_id: Mapped[int | None] = mapped_column(ForeignKey("analyses.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    reviewer: Mapped[User] = relationship()
    analysis: Mapped[Analysis | None] = relationship()


class AuditEntry(db.Model):
    """Who changed what and when: the old and new values as JSON (reviews, users, tokens, re-runs)."""

    __tablename__ = "audit_log"
    __table_args__ = (db.Index("ix_audit_log_entity", "entity", "entity_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    action: Mapped[str] = mapped_column(String(50))
    entity: Mapped[str] = mapped_column(String(30))
    entity_id: Mapped[int | None] = mapped_column(Integer)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    old: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    new: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    user: Mapped[User | None] = relationship()


# Indexes for the case list's filters at 100,000 cases (migration 0003), declared here so that the
# foundation's classes stay as they were.
db.Index("ix_cases_age", Case.age)
db.Index("ix_cases_sex", Case.sex)
db.Index("ix_cases_site", Case.site)
db.Index("ix_cases_lesion_ref", Case.lesion_ref)
db.Index("ix_cases_patient_ref", Case.patient_ref)
db.Index("ix_images_original_filename", Image.original_filename)
# Covering indexes for "predicted class X (by version V)": top_class is set only on succeeded analyses.
db.Index("ix_analyses_top_class_model_version_id", Analysis.top_class, Analysis.model_version_id, Analysis.image_id)
db.Index("ix_analyses_model_version_id_top_class", Analysis.model_version_id, Analysis.top_class, Analysis.image_id)
db.Index("ix_reviews_diagnosis", Review.diagnosis)
# The foreign keys that ON DELETE SET NULL follows when a case is deleted (migration 0007): without
# an index each deleted row scans the whole table.
db.Index("ix_jobs_analysis_id", Job.analysis_id)
db.Index("ix_batch_items_image_id", BatchItem.image_id)
db.Index("ix_batch_items_job_id", BatchItem.job_id)
db.Index("ix_reviews_analysis_id", Review.analysis_id)
