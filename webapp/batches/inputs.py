"""What a folder upload brings from outside, checked before anything is stored.

- The metadata CSV (`image_id, lesion_id, dx, dx_type, age, sex, localization`; extra columns are
  ignored) must be UTF-8, have those columns, and every row must be valid: vocabularies for dx,
  dx_type, sex and localization, age 0-120, cells at most 64 characters, and no cell that a
  spreadsheet would run as a formula (starting with = + - @, tab or carriage return). One bad row
  rejects the whole file with a per-row list of errors, so no case gets half its metadata.
- A zip archive is refused as a whole when its central directory shows an absolute or `..` entry, a
  symlink, an encrypted entry, a nested archive, too many entries, an entry larger than the image
  limit, a total uncompressed size over the limit, or a compression ratio that only a zip bomb has.
  Entries are then read one at a time with a cap, so a lying size header cannot inflate memory.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from flask import current_app

from ..imaging import UploadError
from ..models import DX_CLASSES, DX_TYPES, SEXES, SITES
from ..security import looks_like_formula, neutralise

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ARCHIVE_EXTENSIONS = (".zip", ".7z", ".rar", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".jar")
CSV_COLUMNS = ("image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization")
MAX_CELL = 64
# Limits; each can be overridden through the Flask config (create_app overrides or app.config).
LIMITS = {
    "BATCH_MAX_CSV_BYTES": 20 * 1024 * 1024,
    "BATCH_MAX_CSV_ROWS": 20_000,  # HAM10000 has 10,015; a batch's CSV is also capped by its files
    "BATCH_MAX_ZIP_ENTRIES": 5_000,
    "BATCH_MAX_ZIP_TOTAL_BYTES": 4 * 1024**3,
    "BATCH_MAX_ZIP_RATIO": 100,
    "BATCH_MAX_REQUEST_MB": 64,  # a chunk: the browser sends at most 16 MB (or one image) per request
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
        summary: the message without the rows' reasons, for where `rows` is shown beside it (the
            upload page's table, the CLI's list), so that no row is listed twice.
    """

    def __init__(
        self, message: str, status: int = 400, rows: list[dict[str, Any]] | None = None, summary: str | None = None
    ):
        super().__init__(message)
        self.message, self.status, self.rows = message, status, rows or []
        self.summary = summary or message


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


def parse_metadata_csv(data: bytes, files: int | None = None) -> dict[str, dict[str, Any]]:
    """Parses a HAM10000 metadata CSV into case fields by image_id.

    Args:
        files: how many files the batch has or announces: at most one row per file (and never more
            than BATCH_MAX_CSV_ROWS) is read; a longer CSV is refused before it is stored.

    Raises:
        BatchInputError: not UTF-8, too large, missing columns, or any invalid row (all listed).
    """
    reader = csv.reader(io.StringIO(_csv_text(data), newline=""))
    try:
        header = _csv_header(next(reader, None))
        max_rows = min(limit("BATCH_MAX_CSV_ROWS"), files if files is not None else limit("BATCH_MAX_CSV_ROWS"))
        rows, errors = _csv_rows(reader, header, max_rows)
    except csv.Error as exc:
        raise BatchInputError(f"The metadata CSV could not be read as CSV: {exc}.") from None
    if errors:
        counted = f"The metadata CSV has {len(errors)} invalid row(s); nothing was stored."
        shown = "; ".join(f"row {e['row']}: {e['error']}" for e in errors[:3])
        raise BatchInputError(
            f"{counted} {shown}", rows=errors[:100], summary=f"{counted} The rows to fix are listed below."
        )
    if not rows:
        raise BatchInputError("The metadata CSV has a header but no data rows.")
    return rows


def _csv_text(data: bytes) -> str:
    if len(data) > limit("BATCH_MAX_CSV_BYTES"):
        raise BatchInputError(
            f"The metadata CSV is larger than {limit('BATCH_MAX_CSV_BYTES') // 1024 // 1024} MB.", 413
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BatchInputError(
            f"The metadata CSV is not UTF-8 text (invalid byte at position {exc.start}); save it as 'CSV UTF-8'."
        ) from None
    if "\x00" in text:
        raise BatchInputError("The metadata CSV contains NUL bytes; it is not a text CSV file.")
    return text


def _csv_header(header: list[str] | None) -> list[str]:
    """The header's column names, lower-case; refused without HAM10000's columns or with one twice."""
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
    return header


def _csv_rows(
    reader: Iterator[list[str]], header: list[str], max_rows: int
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """(case fields by image_id, every invalid row with its line number and reason); blank lines are
    skipped, and more than `max_rows` rows refuse the whole file."""
    rows: dict[str, dict[str, Any]] = {}
    errors: list[dict[str, Any]] = []
    id_column = header.index("image_id")
    for lineno, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(rows) + len(errors) >= max_rows:
            raise BatchInputError(
                f"The metadata CSV has more than {max_rows} rows: at most one row per file of the batch "
                f"(announce the folder's size with expected_files), and at most {limit('BATCH_MAX_CSV_ROWS')}.",
                413,
            )
        image_id = (row[id_column] if len(row) > id_column else "").strip()[:MAX_CELL]
        try:
            if len(row) != len(header):
                raise ValueError(f"the row has {len(row)} cells, the header {len(header)}.")
            image_id, fields = _row_fields(dict(zip(header, row)))
            if image_id in rows:
                raise ValueError("image_id appears twice.")
        except ValueError as exc:
            errors.append({"row": lineno, "image_id": neutralise(image_id), "error": str(exc)})
            continue
        rows[image_id] = fields
    return rows, errors


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
            "upload the folder from the browser (sent in chunks) or split the archive.",
            413,
        )
    archive = Archive(zf)
    total = 0
    csvs: list[zipfile.ZipInfo] = []
    for info in infos:
        parts = _entry_parts(info.filename)
        _refuse_link_or_encrypted(info)
        if info.is_dir() or not parts or parts[0] == "__MACOSX" or parts[-1].startswith("."):
            continue  # folders, Finder's resource forks and hidden files
        total += info.file_size
        lower = parts[-1].lower()
        _refuse_nested_or_bomb(info, lower, total)
        if lower.endswith(".csv"):
            if info.file_size > limit("BATCH_MAX_CSV_BYTES"):
                raise BatchInputError(f"The archive's CSV {info.filename!r} is too large.", 413)
            csvs.append(info)
        elif lower.endswith(IMAGE_EXTENSIONS):
            if info.file_size > max_image_bytes:
                raise BatchInputError(
                    f"The archive entry {info.filename!r} declares {info.file_size} bytes, more than the image limit "
                    f"of {max_image_bytes}; refused.",
                    413,
                )
            archive.images.append(info)
        else:
            archive.other.append("/".join(parts))
    _attach_metadata(archive, csvs)
    return archive


def _refuse_link_or_encrypted(info: zipfile.ZipInfo) -> None:
    mode = info.external_attr >> 16
    if mode and stat.S_ISLNK(mode):
        raise BatchInputError(f"The archive entry {info.filename!r} is a symbolic link; refused.")
    if info.flag_bits & 0x1:
        raise BatchInputError(f"The archive entry {info.filename!r} is encrypted; upload an unencrypted zip.")


def _refuse_nested_or_bomb(info: zipfile.ZipInfo, name: str, total: int) -> None:
    """Refuses a nested archive (`name`: the entry's file name, lower-case), an archive whose entries
    so far (`total` bytes) expand past the limit, and an entry that expands more than images do."""
    if name.endswith(ARCHIVE_EXTENSIONS):
        raise BatchInputError(f"The archive entry {info.filename!r} is itself an archive; nested archives are refused.")
    if total > limit("BATCH_MAX_ZIP_TOTAL_BYTES"):
        raise BatchInputError("The archive declares more uncompressed data than the limit allows; refused.", 413)
    if info.file_size > 1024 * 1024 and info.file_size > limit("BATCH_MAX_ZIP_RATIO") * max(info.compress_size, 1):
        raise BatchInputError(
            f"The archive entry {info.filename!r} expands {info.file_size // max(info.compress_size, 1)}-fold; "
            "images do not compress like that (zip bomb?); refused.",
            413,
        )


def _attach_metadata(archive: Archive, csvs: list[zipfile.ZipInfo]) -> None:
    """The archive's one CSV becomes its metadata; several are listed as files that are not images."""
    if len(csvs) == 1:
        archive.metadata_name = csvs[0].filename
        try:
            archive.metadata_csv = archive.read(csvs[0], limit("BATCH_MAX_CSV_BYTES"))
        except UploadError as exc:
            raise BatchInputError(f"The archive's CSV could not be read: {exc.message}") from None
    elif len(csvs) > 1:
        archive.other.extend(c.filename for c in csvs)
