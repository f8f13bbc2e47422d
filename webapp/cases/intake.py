"""Creating a case from an upload: validate, store, commit, then enqueue. Shared by pages and API."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..db import db
from ..imaging import UploadError, check_filename, process_upload
from ..models import SEXES, SITES, Case, Image, Job, User
from ..queue import ANALYSE_TASK, PREDICT_QUEUE, send
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
    """The same image (same normalised pixels) is already stored, in `case_id`."""

    def __init__(self, case_id: int):
        super().__init__(f"This image was already uploaded as case {case_id}.")
        self.case_id = case_id
        self.message = str(self)


@dataclass(frozen=True)
class CaseFields:
    age: int | None = None
    sex: str | None = None
    site: str | None = None
    patient_ref: str | None = None
    lesion_ref: str | None = None


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
    return CaseFields(**values)


def create_case(data: bytes, filename: str | None, fields: CaseFields, uploader: User | None) -> tuple[Case, Job]:
    """Validates and stores the image, commits the case, image and a queued job, then sends the task.

    Raises:
        UploadError: the file is not an acceptable image.
        DuplicateImage: the same image is already stored.
    """
    config = current_app.config
    filename = check_filename(filename)
    processed = process_upload(data, config["MAX_UPLOAD_MB"] * 1024 * 1024, config["MAX_IMAGE_PIXELS"])
    existing = db.session.scalar(select(Image).where(Image.content_hash == processed.content_hash))
    if existing is not None:
        raise DuplicateImage(existing.case_id)

    storage = storage_from_settings(current_app.extensions["settings"])
    key = image_key(processed.content_hash, processed.extension)
    storage.save(key, processed.data)  # content-addressed: saving twice is harmless

    case = Case(uploader=uploader, **fields.__dict__)
    image = Image(
        case=case,
        content_hash=processed.content_hash,
        storage_key=key,
        width=processed.width,
        height=processed.height,
        original_filename=filename,
    )
    job = Job(kind="analyse", status="queued", image=image)
    db.session.add_all([case, image, job])
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        existing = db.session.scalar(select(Image).where(Image.content_hash == processed.content_hash))
        if existing is not None:
            raise DuplicateImage(existing.case_id) from None
        raise
    # Committed first: if the broker is down the job simply stays queued.
    send(ANALYSE_TASK, job.id, queue=PREDICT_QUEUE)
    return case, job


__all__ = ["CaseFields", "DuplicateImage", "FieldError", "UploadError", "create_case", "parse_case_fields"]
