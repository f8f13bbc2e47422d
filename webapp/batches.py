"""Batch uploads: a folder (sent in chunks), a zip archive or a server-side folder, with HAM10000 metadata.

Everything that comes from outside is checked before anything is stored:

- The metadata CSV (`image_id, lesion_id, dx, dx_type, age, sex, localization`; extra columns are
  ignored) must be UTF-8, have those columns, and every row must be valid: vocabularies for dx,
  dx_type, sex and localization, age 0-120, cells at most 64 characters, and no cell that a
  spreadsheet would run as a formula (starting with = + - @, tab or carriage return). One bad row
  rejects the whole file with a per-row list of errors, so no case gets half its metadata.
- A zip archive is refused as a whole when its central directory shows an absolute or `..` entry, a
  symlink, an encrypted entry, a nested archive, too many entries, an entry larger than the image
  limit, a total uncompressed size over the limit, or a compression ratio that only a zip bomb has.
  Entries are then read one at a time with a cap, so a lying size header cannot inflate memory.
- One bad image is a per-file error on the batch (a `BatchItem` with `error`), never a failed batch.
  Each file is committed on its own (case, image, job and item together), so nothing is half-stored.

A file whose normalised pixels are already stored is linked: its item points at the existing case
and image instead of storing it twice.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, BinaryIO, Iterable, Iterator

from flask import current_app
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from . import cases as cases_module
from .db import db
from .imaging import UploadError, process_upload
from .models import DX_CLASSES, DX_TYPES, SEXES, SITES, Batch, BatchItem, Case, Image, Job, User
from .queue import ANALYSE_TASK, PREDICT_QUEUE
from .storage import image_key, storage_from_settings

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ARCHIVE_EXTENSIONS = (".zip", ".7z", ".rar", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".jar")
CSV_COLUMNS = ("image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
MAX_CELL = 64
# Limits; each can be overridden through the Flask config (create_app overrides or app.config).
LIMITS = {
    "BATCH_MAX_CSV_BYTES": 20 * 1024 * 1024,
    "BATCH_MAX_CSV_ROWS": 200_000,
    "BATCH_MAX_ZIP_ENTRIES": 5_000,
    "BATCH_MAX_ZIP_TOTAL_BYTES": 4 * 1024 ** 3,
    "BATCH_MAX_ZIP_RATIO": 100,
    "BATCH_MAX_REQUEST_MB": 1024,
    "BATCH_MAX_FILES_PER_REQUEST": 500,
}


def limit(name: str) -> int:
    return int(current_app.config.get(name, LIMITS[name]))


class BatchInputError(ValueError):
    """The request as a whole is refused (bad CSV, hostile archive); nothing was stored.

    Attributes:
        message: a sentence saying what is wrong and how to fix it.
        status: the HTTP status (400, 413).
        rows: per-row errors of a metadata CSV, `{"row", "image_id", "error"}`.
    """

    def __init__(self, message: str, status: int = 400, rows: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.message, self.status, self.rows = message, status, rows or []


# --- spreadsheet safety -----------------------------------------------------------------------

def looks_like_formula(value: str) -> bool:
    return bool(value) and value.startswith(FORMULA_START)


def neutralise(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: strings starting with = + - @ tab CR get a `'`."""
    if isinstance(value, str) and looks_like_formula(value):
        return "'" + value
    return value


# --- metadata CSV -----------------------------------------------------------------------------

def _normalise_site(value: str) -> str:
    return " ".join(value.lower().replace("_", " ").split())


def _row_fields(record: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Validates one CSV row; returns (image_id, case fields). Raises ValueError with the reason."""
    for column in CSV_COLUMNS:
        raw = record.get(column) or ""
        if looks_like_formula(raw) or looks_like_formula(raw.strip()):
            raise ValueError(
                f"{column} {raw[:20]!r} starts with {raw.strip()[:1] or raw[:1]!r}, which a spreadsheet runs as a "
                "formula; cells may not start with = + - @, tab or carriage return."
            )
        if len(raw.strip()) > MAX_CELL:
            raise ValueError(f"{column} is longer than {MAX_CELL} characters.")
    value = {c: (record.get(c) or "").strip() for c in CSV_COLUMNS}
    image_id = value["image_id"]
    if not image_id:
        raise ValueError("image_id is empty.")
    if "/" in image_id or "\\" in image_id or "\x00" in image_id:
        raise ValueError("image_id must be a file name stem, without folders.")
    fields: dict[str, Any] = {}
    if value["lesion_id"]:
        fields["lesion_ref"] = value["lesion_id"]
    dx = value["dx"].lower()
    if dx:
        if dx not in DX_CLASSES:
            raise ValueError(f"dx {value['dx']!r} is not one of {', '.join(DX_CLASSES)}.")
        fields["reference_dx"] = dx
    dx_type = value["dx_type"].lower()
    if dx_type:
        if dx_type not in DX_TYPES:
            raise ValueError(f"dx_type {value['dx_type']!r} is not one of {', '.join(DX_TYPES)}.")
        fields["reference_dx_type"] = dx_type
    if value["age"] and value["age"].lower() not in ("nan", "na"):
        try:
            age = float(value["age"])
        except ValueError:
            raise ValueError(f"age {value['age']!r} is not a number.") from None
        if age != int(age) or not 0 <= age <= 120:
            raise ValueError(f"age {value['age']!r} must be a whole number between 0 and 120.")
        fields["age"] = int(age)
    sex = value["sex"].lower()
    if sex:
        if sex not in SEXES:
            raise ValueError(f"sex {value['sex']!r} is not one of {', '.join(SEXES)}.")
        fields["sex"] = sex
    site = _normalise_site(value["localization"])
    if site:
        if site not in SITES:
            raise ValueError(f"localization {value['localization']!r} is not one of {', '.join(SITES)}.")
        fields["site"] = site
    return image_id, fields


def parse_metadata_csv(data: bytes) -> dict[str, dict[str, Any]]:
    """Parses a HAM10000 metadata CSV into case fields by image_id.

    Raises:
        BatchInputError: not UTF-8, too large, missing columns, or any invalid row (all listed).
    """
    if len(data) > limit("BATCH_MAX_CSV_BYTES"):
        raise BatchInputError(f"The metadata CSV is larger than {limit('BATCH_MAX_CSV_BYTES') // 1024 // 1024} MB.", 413)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BatchInputError(
            f"The metadata CSV is not UTF-8 text (invalid byte at position {exc.start}); save it as 'CSV UTF-8'."
        ) from None
    if "\x00" in text:
        raise BatchInputError("The metadata CSV contains NUL bytes; it is not a text CSV file.")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: dict[str, dict[str, Any]] = {}
    errors: list[dict[str, Any]] = []
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise BatchInputError("The metadata CSV is empty; it needs a header row: " + ", ".join(CSV_COLUMNS) + ".")
        header = [h.strip().lower() for h in header]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise BatchInputError(
                f"The metadata CSV lacks the column(s) {', '.join(missing)}; the HAM10000 format has the header "
                f"{','.join(CSV_COLUMNS)}."
            )
        if len(set(header)) != len(header):
            raise BatchInputError("The metadata CSV has a column name twice in its header.")
        max_rows = limit("BATCH_MAX_CSV_ROWS")
        for lineno, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(rows) + len(errors) >= max_rows:
                raise BatchInputError(f"The metadata CSV has more than {max_rows} rows.", 413)
            image_id = (row[header.index("image_id")] if len(row) > header.index("image_id") else "").strip()[:MAX_CELL]
            if len(row) != len(header):
                errors.append({"row": lineno, "image_id": neutralise(image_id),
                               "error": f"the row has {len(row)} cells, the header {len(header)}."})
                continue
            try:
                image_id, fields = _row_fields(dict(zip(header, row)))
            except ValueError as exc:
                errors.append({"row": lineno, "image_id": neutralise(image_id), "error": str(exc)})
                continue
            if image_id in rows:
                errors.append({"row": lineno, "image_id": neutralise(image_id), "error": "image_id appears twice."})
                continue
            rows[image_id] = fields
    except csv.Error as exc:
        raise BatchInputError(f"The metadata CSV could not be read as CSV: {exc}.") from None
    if errors:
        shown = "; ".join(f"row {e['row']}: {e['error']}" for e in errors[:3])
        raise BatchInputError(
            f"The metadata CSV has {len(errors)} invalid row(s); nothing was stored. {shown}", rows=errors[:100]
        )
    if not rows:
        raise BatchInputError("The metadata CSV has a header but no data rows.")
    return rows


# --- zip archives -----------------------------------------------------------------------------

@dataclass
class Archive:
    """A checked zip archive: image entries to read one by one, files skipped, and the metadata CSV."""

    zf: zipfile.ZipFile
    images: list[zipfile.ZipInfo] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # not an image: a per-file error each
    metadata_csv: bytes | None = None
    metadata_name: str | None = None

    def read(self, info: zipfile.ZipInfo, cap: int) -> bytes:
        """The entry's bytes, reading at most `cap` (+1 to notice more). Raises UploadError."""
        allowed = min(info.file_size, cap)
        try:
            with self.zf.open(info) as f:
                data = f.read(allowed + 1)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
            raise UploadError(f"The archive entry could not be extracted ({exc.__class__.__name__}: {exc}).") from None
        if len(data) > allowed:
            raise UploadError("The archive entry is larger than its header declares or than the image limit.", 413)
        return data


def _entry_parts(name: str) -> list[str]:
    if "\x00" in name:
        raise BatchInputError(f"The archive entry {name!r} has a NUL byte in its name.")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise BatchInputError(f"The archive entry {name!r} is an absolute path; only relative paths are allowed.")
    parts = [p for p in re.split(r"[/\\]+", name) if p not in ("", ".")]
    if ".." in parts:
        raise BatchInputError(f"The archive entry {name!r} leaves the archive's folder ('..'); refused.")
    return parts


def open_archive(stream: BinaryIO, max_image_bytes: int) -> Archive:
    """Checks a zip archive's central directory before anything is extracted.

    Raises:
        BatchInputError: not a zip, or hostile (see the module docstring).
    """
    try:
        zf = zipfile.ZipFile(stream)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise BatchInputError(f"The archive is not a readable zip file ({exc.__class__.__name__}).") from None
    if len(infos) > limit("BATCH_MAX_ZIP_ENTRIES"):
        raise BatchInputError(
            f"The archive has {len(infos)} entries, more than the limit of {limit('BATCH_MAX_ZIP_ENTRIES')}; "
            "upload the folder from the browser (sent in chunks) or split the archive.", 413)
    archive = Archive(zf)
    total = 0
    csvs: list[zipfile.ZipInfo] = []
    for info in infos:
        parts = _entry_parts(info.filename)
        mode = info.external_attr >> 16
        if mode and stat.S_ISLNK(mode):
            raise BatchInputError(f"The archive entry {info.filename!r} is a symbolic link; refused.")
        if info.flag_bits & 0x1:
            raise BatchInputError(f"The archive entry {info.filename!r} is encrypted; upload an unencrypted zip.")
        if info.is_dir() or not parts:
            continue
        if parts[0] == "__MACOSX" or parts[-1].startswith("."):
            continue  # Finder's resource forks and hidden files
        lower = parts[-1].lower()
        if lower.endswith(ARCHIVE_EXTENSIONS):
            raise BatchInputError(f"The archive entry {info.filename!r} is itself an archive; nested archives are refused.")
        total += info.file_size
        if total > limit("BATCH_MAX_ZIP_TOTAL_BYTES"):
            raise BatchInputError("The archive declares more uncompressed data than the limit allows; refused.", 413)
        if info.file_size > 1024 * 1024 and info.file_size > limit("BATCH_MAX_ZIP_RATIO") * max(info.compress_size, 1):
            raise BatchInputError(
                f"The archive entry {info.filename!r} expands {info.file_size // max(info.compress_size, 1)}-fold; "
                "images do not compress like that (zip bomb?); refused.", 413)
        if lower.endswith(".csv"):
            if info.file_size > limit("BATCH_MAX_CSV_BYTES"):
                raise BatchInputError(f"The archive's CSV {info.filename!r} is too large.", 413)
            csvs.append(info)
        elif lower.endswith(IMAGE_EXTENSIONS):
            if info.file_size > max_image_bytes:
                raise BatchInputError(
                    f"The archive entry {info.filename!r} declares {info.file_size} bytes, more than the image limit "
                    f"of {max_image_bytes}; refused.", 413)
            archive.images.append(info)
        else:
            archive.other.append("/".join(parts))
    if len(csvs) == 1:
        archive.metadata_name = csvs[0].filename
        try:
            archive.metadata_csv = archive.read(csvs[0], limit("BATCH_MAX_CSV_BYTES"))
        except UploadError as exc:
            raise BatchInputError(f"The archive's CSV could not be read: {exc.message}") from None
    elif len(csvs) > 1:
        archive.other.extend(c.filename for c in csvs)
    return archive


# --- storing ----------------------------------------------------------------------------------

def clean_filename(name: str | None) -> str:
    """The relative path as sent (folders kept for the record), without control characters."""
    name = "".join(ch for ch in (name or "") if ch.isprintable()).replace("\\", "/").strip().lstrip("/")
    return (name or "unnamed")[-255:]


def file_stem(name: str) -> str:
    base = PurePosixPath(name).name
    return base.rsplit(".", 1)[0] if "." in base else base


def create_batch(user: User | None, *, source: str, name: str | None = None, expected_files: int | None = None,
                 metadata: dict[str, dict[str, Any]] | None = None, metadata_filename: str | None = None) -> Batch:
    batch = Batch(created_by=user, source=source, name=(name or "").strip()[:200] or None,
                  expected_files=expected_files, metadata_rows=metadata,
                  metadata_filename=clean_filename(metadata_filename) if metadata_filename else None)
    db.session.add(batch)
    db.session.commit()
    return batch


def _latest_job_id(image_id: int) -> int | None:
    return db.session.scalar(
        select(func.max(Job.id)).where(Job.image_id == image_id, Job.kind == "analyse")
    )


def _link_duplicate(batch: Batch, filename: str, image: Image) -> BatchItem:
    item = BatchItem(batch_id=batch.id, filename=filename, case_id=image.case_id, image_id=image.id,
                     job_id=_latest_job_id(image.id), duplicate=True)
    db.session.add(item)
    db.session.commit()
    return item


def _error_item(batch: Batch, filename: str, message: str) -> BatchItem:
    item = BatchItem(batch_id=batch.id, filename=filename, error=message)
    db.session.add(item)
    db.session.commit()
    return item


def add_file(batch: Batch, filename: str, data: bytes | None, user: User | None,
             error: str | None = None) -> tuple[BatchItem, int | None]:
    """Stores one file of the batch; returns its item and the id of the job to send (None if none).

    A bad file becomes an item with `error`; a duplicate an item linked to the existing case.
    """
    filename = clean_filename(filename)
    if error is None and not filename.lower().endswith(IMAGE_EXTENSIONS):
        error = "Skipped: not a .jpg, .jpeg or .png file."
    if error is not None:
        return _error_item(batch, filename, error), None
    config = current_app.config
    try:
        processed = process_upload(data or b"", config["MAX_UPLOAD_MB"] * 1024 * 1024, config["MAX_IMAGE_PIXELS"])
    except UploadError as exc:
        return _error_item(batch, filename, exc.message), None
    existing = db.session.scalar(select(Image).where(Image.content_hash == processed.content_hash))
    if existing is not None:
        return _link_duplicate(batch, filename, existing), None

    key = image_key(processed.content_hash, processed.extension)
    storage_from_settings(current_app.extensions["settings"]).save(key, processed.data)
    fields = dict((batch.metadata_rows or {}).get(file_stem(filename)) or {})
    case = Case(uploader=user, batch_id=batch.id, **fields)
    image = Image(case=case, content_hash=processed.content_hash, storage_key=key, width=processed.width,
                  height=processed.height, original_filename=PurePosixPath(filename).name[:255])
    job = Job(kind="analyse", status="queued", image=image)
    db.session.add_all([case, image, job])
    db.session.flush()  # ids for the item: inserted with them, not updated after
    item = BatchItem(batch_id=batch.id, filename=filename, case_id=case.id, image_id=image.id, job_id=job.id)
    db.session.add(item)
    try:
        db.session.commit()
    except IntegrityError:  # the same image committed by a concurrent request a moment ago
        db.session.rollback()
        existing = db.session.scalar(select(Image).where(Image.content_hash == processed.content_hash))
        if existing is None:
            raise
        return _link_duplicate(batch, filename, existing), None
    return item, job.id


def send_jobs(job_ids: Iterable[int]) -> int:
    """Sends the committed jobs; stops at the first failed publish (the broker is down: the jobs stay
    queued for the sweep, and the upload does not wait a second per file). Returns how many were sent."""
    sent = 0
    for job_id in job_ids:
        # Through the cases module, so that tests that record `webapp.cases.send` see these too.
        if cases_module.send(ANALYSE_TASK, job_id, queue=PREDICT_QUEUE) is None:
            break
        sent += 1
    return sent


def add_files(batch: Batch, files: Iterable[tuple[str, bytes | None, str | None]], user: User | None) -> list[BatchItem]:
    """Stores (filename, bytes, error) triples one by one (a commit each), then sends their jobs."""
    items, job_ids = [], []
    session = db.session()
    # The rows committed here are exactly as written: expiring them at each commit would reload the
    # batch, the user and every item with one SELECT each (a third of an upload's time in profiles).
    expire_on_commit, session.expire_on_commit = session.expire_on_commit, False
    try:
        for filename, data, error in files:
            item, job_id = add_file(batch, filename, data, user, error)
            items.append(item)
            if job_id is not None:
                job_ids.append(job_id)
    finally:
        session.expire_on_commit = expire_on_commit
    send_jobs(job_ids)
    return items


def archive_files(archive: Archive) -> Iterator[tuple[str, bytes | None, str | None]]:
    cap = int(current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024)
    for info in archive.images:
        try:
            yield info.filename, archive.read(info, cap), None
        except UploadError as exc:
            yield info.filename, None, exc.message
    for name in archive.other:
        yield name, None, "Skipped: not a .jpg, .jpeg or .png file."


# --- progress ---------------------------------------------------------------------------------

def item_state(error: str | None, job_status: str | None) -> str:
    if error:
        return "failed"
    if job_status in (None, "succeeded"):
        return "done"
    return {"failed": "failed", "running": "running"}.get(job_status, "queued")


def batch_progress(batch: Batch) -> dict[str, Any]:
    """The batch's counts, cases and per-file errors (one query over its items and their jobs)."""
    rows = db.session.execute(
        select(BatchItem.filename, BatchItem.case_id, BatchItem.error, BatchItem.duplicate, Job.status, Job.error)
        .outerjoin(Job, Job.id == BatchItem.job_id)
        .where(BatchItem.batch_id == batch.id)
        .order_by(BatchItem.id)
    ).all()
    counts = {"queued": 0, "running": 0, "done": 0, "failed": 0}
    case_ids: list[int] = []
    errors: list[dict[str, str]] = []
    duplicates = 0
    for filename, case_id, error, duplicate, job_status, job_error in rows:
        state = item_state(error, job_status)
        counts[state] += 1
        duplicates += bool(duplicate)
        if case_id is not None and case_id not in case_ids:
            case_ids.append(case_id)
        if state == "failed":
            errors.append({"file": filename, "error": error or f"Analysis failed: {job_error or 'unknown error'}"})
    total = len(rows)
    expected = batch.expected_files
    finished = counts["queued"] == 0 and counts["running"] == 0 and (expected is None or total >= expected)
    return {
        "id": batch.id,
        "url": f"/api/v1/batches/{batch.id}",
        "name": batch.name,
        "source": batch.source,
        "created": batch.created_at.isoformat() if batch.created_at else None,
        "total": total,
        "expected": expected,
        "counts": counts,
        "duplicates": duplicates,
        "finished": finished,
        "metadata_rows": len(batch.metadata_rows or {}),
        "case_ids": case_ids,
        "errors": errors,
    }


# --- from a multipart request (API and pages) --------------------------------------------------

def _uploaded_images(request) -> list:
    images = [f for f in request.files.getlist("images") if f and f.filename]
    if len(images) > limit("BATCH_MAX_FILES_PER_REQUEST"):
        raise BatchInputError(
            f"{len(images)} files in one request; send at most {limit('BATCH_MAX_FILES_PER_REQUEST')} per request "
            "(add the rest with POST .../files).", 413)
    return images


def _image_triples(images) -> Iterator[tuple[str, bytes | None, str | None]]:
    cap = int(current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024)
    for upload in images:
        yield upload.filename, upload.stream.read(cap + 1), None  # process_upload refuses the +1


def batch_from_request(request, user: User, source: str) -> tuple[Batch, list[BatchItem]]:
    """Creates a batch from multipart fields `images` (many), `metadata` (CSV), `archive` (zip),
    `name` and `expected_files`. The CSV and the archive are checked before anything is stored.

    Raises:
        BatchInputError: a bad CSV, a hostile or unreadable archive, too many files.
    """
    images = _uploaded_images(request)
    metadata, metadata_name = None, None
    meta_file = request.files.get("metadata")
    if meta_file is not None and meta_file.filename:
        metadata, metadata_name = parse_metadata_csv(meta_file.stream.read(limit("BATCH_MAX_CSV_BYTES") + 1)), meta_file.filename
    archive_file = request.files.get("archive")
    archive = None
    if archive_file is not None and archive_file.filename:
        if not archive_file.filename.lower().endswith(".zip"):
            raise BatchInputError("The archive must be a .zip file.", 415)
        archive = open_archive(archive_file.stream, int(current_app.config["MAX_UPLOAD_MB"] * 1024 * 1024))
        if metadata is None and archive.metadata_csv is not None:
            metadata, metadata_name = parse_metadata_csv(archive.metadata_csv), archive.metadata_name
    expected = request.form.get("expected_files", "").strip()
    if expected:
        if not expected.isdigit() or int(expected) > 10_000_000:
            raise BatchInputError("expected_files must be a whole number of files.")
    name = request.form.get("name") or (archive_file.filename if archive is not None else None)
    batch = create_batch(user, source="zip" if archive is not None else source, name=name,
                         expected_files=int(expected) if expected else None,
                         metadata=metadata, metadata_filename=metadata_name)
    items = add_files(batch, _image_triples(images), user)
    if archive is not None:
        items += add_files(batch, archive_files(archive), user)
    return batch, items


def chunk_from_request(request, batch: Batch, user: User) -> list[BatchItem]:
    """Adds the request's `images` to an existing batch."""
    return add_files(batch, _image_triples(_uploaded_images(request)), user)


def items_summary(items: list[BatchItem]) -> dict[str, Any]:
    return {
        "received": len(items),
        "stored": sum(1 for i in items if i.error is None and not i.duplicate),
        "duplicates": sum(1 for i in items if i.duplicate),
        "errors": [{"file": i.filename, "error": i.error} for i in items if i.error],
    }
