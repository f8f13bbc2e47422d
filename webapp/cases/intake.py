"""How an image enters the portal: validate, store, commit the case, its image and a queued job.

`store_image` is the one way in (single uploads from the page, the API, folder uploads and the CLI
import all call it); `create_case` adds sending the task at once, for a single upload.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from .. import queue
from ..db import db
from ..imaging import UploadError, check_filename, process_upload
from ..models import DX_CLASSES, DX_TYPES, SEXES, SITES, Batch, BatchItem, Case, Image, Job, User
from ..queue import ANALYSE_TASK, PREDICT_QUEUE
from ..states import JobKind, JobStatus
from ..storage import image_key, storage_from_settings

log = logging.getLogger(__name__)
REF_MAX = 64


class FieldError(ValueError):
    """A case field (age, sex, site, references) is invalid; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class DuplicateImage(ValueError):
    """The same image (same normalised pixels) is already stored: `image`, of case `case_id`."""

    def __init__(self, image: Image):
        super().__init__(f"This image was already uploaded as case {image.case_id}.")
        self.image, self.case_id = image, image.case_id
        self.message = str(self)


@dataclass(frozen=True)
class StoredImage:
    """What one accepted image became: its case, the image row, the queued analysis job and, in a
    folder upload, its batch item."""

    case: Case
    image: Image
    job: Job
    item: BatchItem | None = None


@dataclass(frozen=True)
class CaseFields:
    age: int | None = None
    sex: str | None = None
    site: str | None = None
    patient_ref: str | None = None
    lesion_ref: str | None = None
    reference_dx: str | None = None
    reference_dx_type: str | None = None


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def parse_case_fields(form: Mapping[str, Any]) -> CaseFields:
    """Reads the optional case fields from a form; empty strings count as absent.

    Raises:
        FieldError: age not an integer in 0-120, sex or site outside their vocabularies,
            a reference longer than 64 characters.
    """
    values: dict[str, Any] = {}
    age = form.get("age")
    if not _blank(age):
        try:
            values["age"] = int(str(age).strip())
        except ValueError:
            raise FieldError("age", f"age must be a whole number of years, got {age!r}.") from None
        if not 0 <= values["age"] <= 120:
            raise FieldError("age", f"age must be between 0 and 120, got {values['age']}.")
    sex = form.get("sex")
    if not _blank(sex):
        sex = str(sex).strip().lower()
        if sex not in SEXES:
            raise FieldError("sex", f"sex must be one of {', '.join(SEXES)}, got {sex!r}.")
        values["sex"] = sex
    site = form.get("site")
    if not _blank(site):
        site = " ".join(str(site).strip().lower().replace("_", " ").split())
        if site not in SITES:
            raise FieldError("site", f"site must be one of {', '.join(SITES)}, got {site!r}.")
        values["site"] = site
    for name in ("patient_ref", "lesion_ref"):
        ref = form.get(name)
        if not _blank(ref):
            ref = str(ref).strip()
            if len(ref) > REF_MAX:
                raise FieldError(name, f"{name} must be at most {REF_MAX} characters.")
            if ref[0] in "=+-@" or not ref.isprintable():  # a spreadsheet would run it as a formula
                raise FieldError(name, f"{name} must not start with = + - @ or contain control characters.")
            values[name] = ref
    values.update(_reference(form))
    return CaseFields(**values)


def _reference(form: Mapping[str, Any]) -> dict[str, str]:
    """The reference diagnosis known to the uploader (one of the seven classes) and how it was made."""
    values = {}
    for name, choices in (("reference_dx", DX_CLASSES), ("reference_dx_type", DX_TYPES)):
        raw = form.get(name)
        if _blank(raw):
            continue
        value = str(raw).strip().lower()
        if value not in choices:
            raise FieldError(name, f"{name} must be one of {', '.join(choices)}, got {value[:20]!r}.")
        values[name] = value
    if "reference_dx_type" in values and "reference_dx" not in values:
        raise FieldError("reference_dx", "reference_dx_type needs a reference_dx (the diagnosis it describes).")
    return values


def _raise_if_stored(column, value: str) -> None:
    existing = db.session.scalar(select(Image).where(column == value).limit(1))
    if existing is not None:
        raise DuplicateImage(existing)


def store_image(
    data: bytes,
    filename: str,
    fields: Mapping[str, Any],
    uploader: User | None,
    batch: Batch | None = None,
    item_name: str | None = None,
    item: BatchItem | None = None,
) -> StoredImage:
    """Validates and stores one image, then commits its case, image and queued job together.

    The task is not sent here: the caller sends it once the commit is done (a folder upload sends
    a whole chunk's jobs at once). With `batch`, the batch item (named `item_name`) is committed in
    the same transaction, so a file is either wholly stored or not at all; a pending `item` (an
    archive entry, worker.ingest) is filled in instead of a new one.

    Raises:
        UploadError: the bytes are not an acceptable image.
        DuplicateImage: the same image is already stored (also when another request stored it a
            moment ago).
    """
    config = current_app.config
    source_hash = hashlib.sha256(data).hexdigest()
    _raise_if_stored(Image.source_hash, source_hash)  # the same file again: no decoding
    processed = process_upload(data, config["MAX_UPLOAD_MB"] * 1024 * 1024, config["MAX_IMAGE_PIXELS"])
    _raise_if_stored(Image.content_hash, processed.content_hash)  # the same pixels in another file
    key = image_key(processed.content_hash, processed.extension)
    storage_from_settings(current_app.extensions["settings"]).save(key, processed.data)  # content-addressed
    case = Case(uploader=uploader, batch_id=batch.id if batch is not None else None, **fields)
    image = Image(
        case=case,
        content_hash=processed.content_hash,
        source_hash=source_hash,
        storage_key=key,
        width=processed.width,
        height=processed.height,
        original_filename=filename,
    )
    job = Job(kind=JobKind.ANALYSE, status=JobStatus.QUEUED, image=image)
    db.session.add_all([case, image, job])
    if batch is not None:
        db.session.flush()  # ids for the item: inserted with them, not updated after
        item = item or BatchItem(batch_id=batch.id, filename=item_name)
        item.case_id, item.image_id, item.job_id, item.pending = case.id, image.id, job.id, False
        db.session.add(item)
    try:
        db.session.commit()
    except IntegrityError:  # the same image committed by a concurrent request a moment ago
        db.session.rollback()
        _raise_if_stored(Image.content_hash, processed.content_hash)
        raise
    return StoredImage(case, image, job, item)


def create_case(data: bytes, filename: str | None, fields: CaseFields, uploader: User | None) -> tuple[Case, Job]:
    """A single upload: stores the image (`store_image`), then sends its analysis task.

    Raises:
        UploadError: the file name or the file is not acceptable.
        DuplicateImage: the same image is already stored.
    """
    stored = store_image(data, check_filename(filename), asdict(fields), uploader)
    # Committed first: if the broker is down the job simply stays queued.
    queue.send(ANALYSE_TASK, stored.job.id, queue=PREDICT_QUEUE)
    return stored.case, stored.job


__all__ = [
    "CaseFields",
    "DuplicateImage",
    "FieldError",
    "StoredImage",
    "UploadError",
    "create_case",
    "parse_case_fields",
    "store_image",
]
