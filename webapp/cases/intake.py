"""How an image enters the portal: validate, store, commit the case, its image and a queued job.

`Intake.stage_all` is the one way in: a single upload from the page or the API is an intake of one
(`store_image`; `create_case` adds sending the task at once), a chunk of a folder upload, the CLI
import and an archive entry go through webapp.batches.service.store_files, which stages each file
and commits the chunk in one transaction.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from .. import queue
from ..db import db
from ..imaging import ProcessedImage, UploadError, check_filename, process_upload
from ..models import DX_CLASSES, DX_TYPES, SEXES, SITES, Batch, Case, Image, Job, User
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
    """The same image (same normalised pixels) is already stored: `image`, of case `case_id` (None
    for an image staged earlier in the same upload, not yet committed)."""

    def __init__(self, image: Image):
        where = f"as case {image.case_id}" if image.case_id is not None else "earlier in this upload"
        super().__init__(f"This image was already uploaded {where}.")
        self.image, self.case_id = image, image.case_id
        self.message = str(self)


@dataclass(frozen=True)
class StoredImage:
    """What one accepted image became: its case, the image row and the queued analysis job."""

    case: Case
    image: Image
    job: Job


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


class Intake:
    """Images stored in one transaction: each validated and saved on its own, all committed at once.

    A folder-upload chunk is one transaction (one commit, one bulk INSERT per table) rather than one
    per file; a single upload is an intake of one. `stage_all` gives, per file, its stored image or
    why it was not stored (a bad or duplicate file adds nothing), so the caller reports that file and
    goes on with the next. The session is never flushed while staging: duplicates within the intake
    are found by hash here, and those of stored images with one query per hash column for the whole
    intake (`look_up`), not one per file; every row goes in at the final flush.
    """

    def __init__(self) -> None:
        self.staged: dict[str, Image] = {}  # source and content hashes of the images staged so far
        self.saved: dict[str, float] = {}  # storage key -> when this intake wrote it
        # (column name, hash) -> the stored image with it, or None: looked up in the database already
        self.stored: dict[tuple[str, str], Image | None] = {}

    def look_up(self, column, values: Iterable[str]) -> None:
        """Finds the stored images with any of these hashes (`Image.source_hash` or
        `Image.content_hash`) in one query per LOOKUP_CHUNK hashes, for `check_new`."""
        new = sorted({value for value in values if (column.key, value) not in self.stored})
        for start in range(0, len(new), LOOKUP_CHUNK):
            part = new[start : start + LOOKUP_CHUNK]
            self.stored.update({(column.key, value): None for value in part})
            with db.session.no_autoflush:
                for image in db.session.scalars(select(Image).where(column.in_(part))):
                    self.stored[column.key, getattr(image, column.key)] = image

    def check_new(self, column, value: str) -> None:
        """Raises DuplicateImage when an image with this hash is stored or staged already."""
        staged = self.staged.get(value)
        if staged is not None:
            raise DuplicateImage(staged)
        self.look_up(column, [value])
        existing = self.stored[column.key, value]
        if existing is not None:
            raise DuplicateImage(existing)

    def stage_all(
        self, uploads: Sequence[Upload], uploader: User | None, batch: Batch | None = None
    ) -> list[StoredImage | UploadError | DuplicateImage]:
        """Validates the files, saves each new image's file and adds its case, image and queued job
        to the session; per file, in order, what it became.

        A file is a duplicate (DuplicateImage) when its bytes or its normalised pixels are those of
        a stored image or of an earlier file of the intake; a file whose bytes are a stored image's
        is not decoded, nor are the bytes of an earlier file decoded twice.
        """
        config = current_app.config
        sources = [hashlib.sha256(upload.data).hexdigest() for upload in uploads]
        self.look_up(Image.source_hash, sources)  # the same file again: no decoding
        decoded: dict[str, ProcessedImage | UploadError] = {}
        for upload, source in zip(uploads, sources, strict=True):
            if source not in decoded and self.stored[Image.source_hash.key, source] is None:
                decoded[source] = _decode(upload.data, config)
        self.look_up(Image.content_hash, [p.content_hash for p in decoded.values() if isinstance(p, ProcessedImage)])
        return [
            self._stage(upload, source, decoded, uploader, batch)
            for upload, source in zip(uploads, sources, strict=True)
        ]

    def _stage(
        self,
        upload: Upload,
        source_hash: str,
        decoded: Mapping[str, ProcessedImage | UploadError],
        uploader: User | None,
        batch: Batch | None,
    ) -> StoredImage | UploadError | DuplicateImage:
        """One file of `stage_all`; `decoded` holds what each new file's bytes decoded to."""
        try:
            self.check_new(Image.source_hash, source_hash)
            processed = decoded[source_hash]
            if isinstance(processed, UploadError):
                return processed
            self.check_new(Image.content_hash, processed.content_hash)  # the same pixels in another file
        except DuplicateImage as exc:
            return exc
        return self._add(upload, source_hash, processed, uploader, batch)

    def _add(
        self, upload: Upload, source_hash: str, processed: ProcessedImage, uploader: User | None, batch: Batch | None
    ) -> StoredImage:
        """Saves a new image's file and adds its case, image and queued job to the session."""
        key = image_key(processed.content_hash, processed.extension)
        storage_from_settings(current_app.extensions["settings"]).save(key, processed.data)  # content-addressed
        self.saved[key] = time.time()
        # Every case field set, absent ones to None: rows with the same columns share one INSERT.
        fields = {**NO_FIELDS, **upload.fields}
        case = Case(uploader=uploader, batch_id=batch.id if batch is not None else None, **fields)
        image = Image(
            case=case,
            content_hash=processed.content_hash,
            source_hash=source_hash,
            storage_key=key,
            width=processed.width,
            height=processed.height,
            original_filename=upload.filename,
        )
        job = Job(kind=JobKind.ANALYSE, status=JobStatus.QUEUED, image=image)
        db.session.add_all([case, image, job])
        self.staged[source_hash] = self.staged[processed.content_hash] = image
        return StoredImage(case, image, job)

    def commit(self) -> None:
        """Commits the session. A failed commit is rolled back and leaves no file that no row names.

        Raises:
            DuplicateImage: a single staged image was committed by a concurrent request a moment ago.
            Whatever the commit raised otherwise (IntegrityError for a chunk: the caller stages it again).
        """
        try:
            db.session.commit()
        except BaseException:
            db.session.rollback()
            self.remove_unnamed_files()
            raise
        self.saved.clear()

    def remove_unnamed_files(self) -> None:
        """Deletes the files this intake wrote that no image row names (after a rollback), unless
        written again since (the same image uploaded at this moment by another request)."""
        if not self.saved:
            return
        storage = storage_from_settings(current_app.extensions["settings"])
        try:
            named = set(db.session.scalars(select(Image.storage_key).where(Image.storage_key.in_(list(self.saved)))))
        except Exception:  # the database itself failed: none of this intake's rows exists
            log.warning("Could not read which stored images are named; removing this upload's files.", exc_info=True)
            named = set()
        for key, saved_at in self.saved.items():
            modified = storage.modified(key)
            if key not in named and modified is not None and modified <= saved_at:
                storage.delete(key)
        db.session.rollback()  # the read above: no transaction is left open
        self.saved.clear()


NO_FIELDS = {name: None for name in CaseFields.__dataclass_fields__}
LOOKUP_CHUNK = 500  # hashes per duplicate query: far below every engine's limit on bound parameters


@dataclass(frozen=True)
class Upload:
    """One file to stage: its bytes, its file name as stored, and its case fields."""

    data: bytes
    filename: str | None
    fields: Mapping[str, Any]


def _decode(data: bytes, config: Mapping[str, Any]) -> ProcessedImage | UploadError:
    """The checked, normalised image, or why it was refused."""
    try:
        return process_upload(data, config["MAX_UPLOAD_MB"] * 1024 * 1024, config["MAX_IMAGE_PIXELS"])
    except UploadError as exc:
        return exc


def store_image(data: bytes, filename: str, fields: Mapping[str, Any], uploader: User | None) -> StoredImage:
    """Validates and stores one image, then commits its case, image and queued job together.

    The task is not sent here: the caller sends it once the commit is done.

    Raises:
        UploadError: the bytes are not an acceptable image.
        DuplicateImage: the same image is already stored (also when another request stored it a
            moment ago).
    """
    intake = Intake()
    (stored,) = intake.stage_all([Upload(data, filename, fields)], uploader)
    if isinstance(stored, (UploadError, DuplicateImage)):
        raise stored
    try:
        intake.commit()
    except IntegrityError:  # the same image committed by a concurrent request a moment ago
        Intake().check_new(Image.content_hash, stored.image.content_hash)  # asks the database again
        raise
    return stored


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
    "Intake",
    "StoredImage",
    "Upload",
    "UploadError",
    "create_case",
    "parse_case_fields",
    "store_image",
]
