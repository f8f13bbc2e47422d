"""The request and response schemas of /api/v1: spectree validates them and builds the OpenAPI document from them.

The schemas say what type each field has; the rules on values (vocabularies, ranges, the class names
of a model version) stay in the services that pages, API and CLI share, so each rule is written once.
Form fields are strings on the wire: their rules live in `parse_case_fields`, `parse_filters` and the
batch service alone. Response schemas name the fields the API promises and allow more.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from ..cases.explanations import METHOD_ALIASES
from ..cases.listing import AGREEMENTS, DEFAULT_PER_PAGE, MAX_PER_PAGE, REVIEW_STATES, SORTS, STATUSES
from ..models import CONFIDENCE_LEVELS, DX_CLASSES, REVIEW_DIAGNOSES, SEXES
from ..security import ID_MAX

File = Annotated[Any, WithJsonSchema({"type": "string", "format": "binary"})]


def _as_list(value: Any) -> Any:
    # A form with one file gives the file itself; a FileStorage is iterable (its lines), so pydantic
    # would turn it into a list of lines and read the upload up before the route sees it.
    return value if isinstance(value, list | tuple) else [value]


Files = Annotated[list[File], BeforeValidator(_as_list)]


def _text(description: str) -> Any:
    return Field(None, description=description)


class Open(BaseModel):
    """A response body: the fields named here are promised, more may come."""

    model_config = ConfigDict(extra="allow")


# --- requests ------------------------------------------------------------------------------------


class CaseUpload(BaseModel):
    model_config = ConfigDict(json_schema_extra={"required": ["image"]})

    image: File = Field(None, description="one JPEG or PNG dermoscopic image")
    age: str | None = _text("whole number of years, 0-120")
    sex: str | None = _text(" | ".join(SEXES))
    site: str | None = _text("HAM10000 localization, e.g. 'upper extremity'")
    patient_ref: str | None = _text("at most 64 characters")
    lesion_ref: str | None = _text("at most 64 characters")
    reference_dx: str | None = _text("the reference diagnosis, if known: " + " | ".join(DX_CLASSES))
    reference_dx_type: str | None = _text("how it was made: histo | follow_up | consensus | confocal")


class BatchUpload(BaseModel):
    images: Files = Field([], description="the images (many)")
    metadata: File = Field(None, description="HAM10000 CSV: image_id, lesion_id, dx, dx_type, age, sex, localization")
    archive: File = Field(None, description="one .zip of images (and optionally the CSV)")
    name: str | None = _text("the batch's name")
    expected_files: str | None = _text("whole number: the batch is finished once this many files arrived")


class BatchFiles(BaseModel):
    images: Files = Field([], description="a chunk of the batch's images")


class CaseFilters(BaseModel):
    """The case-list filters; `parse_filters` checks their values (400 naming the bad one)."""

    q: str | None = _text(
        "text anywhere (any letter case) in a lesion or patient reference or a file name; '#123' for a case id"
    )
    predicted: str | None = _text("predicted top class (e.g. mel), by any model version or by `model_version`")
    model_version: str | None = _text("model version id")
    reference: str | None = _text(f"reference diagnosis: {' | '.join(DX_CLASSES)} | any | none")
    review: str | None = _text(" | ".join(REVIEW_STATES))
    agreement: str | None = _text(" | ".join(AGREEMENTS))
    status: str | None = _text(f"{' | '.join(STATUSES)} (analysis jobs)")
    date_from: str | None = _text("uploaded on or after (YYYY-MM-DD)")
    date_to: str | None = _text("uploaded on or before (YYYY-MM-DD)")
    age_min: str | None = _text("0-120")
    age_max: str | None = _text("0-120")
    sex: str | None = _text(" | ".join(SEXES))
    site: str | None = _text("HAM10000 localization")
    batch: str | None = _text("batch id")
    uploader: str | None = _text("user id")
    sort: str | None = _text(" | ".join(SORTS))
    per_page: str | None = _text(f"1-{MAX_PER_PAGE} (default {DEFAULT_PER_PAGE})")
    cursor: str | None = _text("the `next_cursor` of the previous page")


class DashboardQuery(BaseModel):
    model_version: int | None = Field(
        None, ge=1, le=ID_MAX, description="model version id (default: the one with most results)"
    )


class ExplanationRequest(BaseModel):
    method: str | None = _text(" | ".join(METHOD_ALIASES))
    class_: str | None = Field(None, alias="class", description="a class name of the analysis' model version")
    analysis_id: int | None = Field(
        None, ge=1, le=ID_MAX, description="a finished analysis of the case (default: the latest)"
    )


class ReviewRequest(BaseModel):
    diagnosis: str | None = _text(" | ".join(REVIEW_DIAGNOSES))
    agrees_with_model: bool | str | None = _text("true | false, or agree | disagree")
    confidence: int | str | None = _text(f"1-5 ({', '.join(CONFIDENCE_LEVELS.values())}) or low | medium | high")
    notes: str | None = _text("free text")


class RerunRequest(BaseModel):
    model_version_id: int = Field(ge=1, le=ID_MAX, description="a registered model version")


class DeletionRequest(BaseModel):
    reason: str | None = _text("required, in the query or the JSON body: why (3-500 characters, no patient data)")


# --- responses -----------------------------------------------------------------------------------


class ErrorBody(Open):
    error: str
    status: int
    field: str | None = Field(None, description="the request field that was refused, where one was")


class CaseQueued(Open):
    id: int
    url: str
    status: str
    job_id: int
    disclaimer: str


class CaseBody(Open):
    id: int
    status: str
    created: str | None
    age: int | None
    sex: str | None
    site: str | None
    reviews: list[dict[str, Any]]
    images: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    analyses: list[dict[str, Any]]
    explanations_pending: bool
    disclaimer: str


class CasePage(Open):
    cases: list[dict[str, Any]]
    total: int
    per_page: int
    next_cursor: str | None
    next: str | None
    filters: dict[str, Any]
    disclaimer: str


class ExplanationBody(Open):
    id: int
    method: str
    class_: str = Field(alias="class")
    status: str
    url: str | None
    raw_url: str | None
    case_url: str
    disclaimer: str


class ReviewBody(Open):
    id: int
    reviewer: str | None
    diagnosis: str | None
    agrees_with_model: bool | None
    confidence: int | None
    notes: str | None
    created: str | None
    updated: str | None


class ReviewList(Open):
    case_id: int
    reviews: list[ReviewBody]


class FileError(BaseModel):
    file: str | None
    error: str


class BatchCreated(Open):
    id: int
    url: str
    received: int
    stored: int
    pending: int = Field(0, description="zip entries stored, to be decoded by the worker")
    duplicates: int
    errors: list[FileError]


class BatchProgress(Open):
    id: int
    url: str
    total: int
    expected: int | None
    counts: dict[str, int] = Field(description="pending (zip entries not yet decoded), queued, running, done, failed")
    explanations: dict[str, int] = Field(
        description="explanation maps of the batch's images: queued, running, done, failed"
    )
    predictions_finished: bool = Field(description="every file is analysed (or failed); maps may still be computed")
    finished: bool = Field(description="predictions finished and no explanation map queued or running")
    case_ids: list[int]
    errors: list[FileError]


class DeletionResult(Open):
    deleted: str = Field(description="case | batch")
    id: int
    case_ids: list[int] = Field(description="the cases deleted")
    counts: dict[str, int] = Field(description="rows removed: cases, images, jobs, jobs_cancelled, explanations, ...")
    files_removed: int
    files_kept: int = Field(description="stored files another row still holds")
    audit_id: int


class ModelVersionBody(Open):
    id: int
    name: str
    version: str
    trained: bool
    trained_on: str | None
    class_names: list[str]
    created: str


class ModelVersionList(Open):
    model_versions: list[ModelVersionBody]


class RerunResult(Open):
    model_version_id: int
    model: str
    images: int
    queued: int
    skipped: int


class Health(Open):
    status: str = Field(description="ok | degraded")
    web: dict[str, Any]
    database: dict[str, Any]
    broker: dict[str, Any]
    worker: dict[str, Any]
    elapsed_ms: float


class Dashboard(Open):
    disclaimer: str
