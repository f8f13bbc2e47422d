"""One instance in one archive: the database's consistent copy and every stored file, with checksums.

The archive (an uncompressed tar: images are compressed already) holds the database copy
(databases.SQLITE_FILE or POSTGRES_FILE), every file of the storage folder under `files/<key>`,
and `manifest.json` last: format, engine, Alembic revision, row counts, the SHA-256 of the database
copy and of every file. It is written as PATH.partial and renamed when complete, so a backup that
was cut short never carries the final name.

Consistency while uploads continue: an upload saves its file before it commits its rows
(cases.intake.store_image), so every file that a row of the database copy names already exists
when it is read afterwards. The archive holds exactly those files (images, explanation maps):
files of uploads committed after the copy are left out with their rows, and so are files that no
row names. A named file that is missing stops the backup.

Restore checks the whole archive before it changes anything, refuses an instance that holds data
unless forced, writes the files, then replaces the database in one transaction; if that fails the
files it added are removed again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlalchemy as sa

from ..models import Explanation, Image, utcnow
from ..storage import LocalStorage, StorageError, check_key
from . import databases
from .databases import BackupError

FORMAT = 1
MANIFEST = "manifest.json"
FILES = "files/"
# The columns whose values are storage keys: a backup holds exactly the files they name.
STORAGE_KEY_COLUMNS = (Image.storage_key, Explanation.raw_key, Explanation.overlay_key)


@dataclass
class Report:
    """What a backup or a restore did, printed as JSON by the CLI."""

    path: str
    engine: str
    revision: str | None
    rows: dict[str, int]
    files: int
    bytes: int
    seconds: float = 0.0
    removed_files: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def create_backup(engine: sa.Engine, storage: LocalStorage, path: Path) -> Report:
    """Writes the database and the storage folder to the archive `path` (which must not exist yet)."""
    started = time.monotonic()
    path = Path(path).resolve()
    if path.exists():
        raise BackupError(f"{path} exists already; a backup never overwrites one (choose a new name).")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".backup-") as tmp:
        with databases.dumped(engine, Path(tmp)) as (dump, conn):
            revision, rows, referenced = _read_state(conn)
        try:
            report = _write_archive(partial, dump, storage, referenced)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    manifest_info = {"engine": databases.engine_kind(engine), "revision": revision, "rows": rows}
    os.replace(partial, path)
    return Report(str(path), **manifest_info, **report, seconds=round(time.monotonic() - started, 3))


def _read_state(conn: sa.Connection) -> tuple[str | None, dict[str, int], set[str]]:
    """The copy's revision, rows per table and the storage keys its rows name."""
    tables = sa.inspect(conn).get_table_names()
    rows = {t: conn.execute(sa.select(sa.func.count()).select_from(sa.table(t))).scalar_one() for t in tables}
    revision = None
    if "alembic_version" in tables:
        revision = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    keys = set()
    for column in STORAGE_KEY_COLUMNS:
        keys.update(k for k in conn.scalars(sa.select(column)) if k)
    rows.pop("alembic_version", None)
    return revision, rows, keys


def _write_archive(partial: Path, dump: Path, storage: LocalStorage, referenced: set[str]) -> dict:
    checksums: dict[str, str] = {}
    size = 0
    with tarfile.open(partial, "w") as tar:
        data = dump.read_bytes()
        _add(tar, dump.name, data)
        database = {"file": dump.name, "sha256": _sha256(data)}
        for key in sorted(referenced):
            try:
                with storage.open(key) as f:
                    data = f.read()
            except StorageError:
                raise BackupError(f"{key} is named by a row but missing from storage; nothing was written.") from None
            _add(tar, FILES + key, data)
            checksums[key] = _sha256(data)
            size += len(data)
        manifest = {"format": FORMAT, "created_at": utcnow().isoformat(), "database": database, "files": checksums}
        _add(tar, MANIFEST, json.dumps(manifest, indent=1).encode())
    return {"files": len(checksums), "bytes": size}


def stored_keys(storage: LocalStorage) -> list[str]:
    """Every object in the storage folder (temporary files of writes in progress left out): what
    makes an instance non-empty, and what a forced restore removes when the backup lacks it."""
    keys = []
    for path in sorted(storage.root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        key = path.relative_to(storage.root).as_posix()
        try:
            keys.append(check_key(key))
        except StorageError:
            continue  # ".tmp-..." files of LocalStorage.save, or anything that is not an object
    return keys


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
    tar.addfile(info, io.BytesIO(data))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- restore ---------------------------------------------------------------------------------


def restore_backup(engine: sa.Engine, storage: LocalStorage, path: Path, *, force: bool = False) -> Report:
    """Replaces the instance's database and stored files by the archive's.

    Raises:
        BackupError: the archive is not a complete, intact backup; its engine is not this
            instance's; or the instance holds data and `force` is not set. Nothing has changed then.
    """
    started = time.monotonic()
    kind = databases.engine_kind(engine)
    storage.root.mkdir(parents=True, exist_ok=True)
    # Unpacked next to the storage folder: the same file system, and not a small /tmp.
    with tempfile.TemporaryDirectory(prefix=".restore-", dir=storage.root.parent) as tmp:
        manifest, dump = _unpack_verified(Path(path), Path(tmp))
        if manifest["database"]["file"] != _dump_name(kind):
            raise BackupError(f"{path} is a backup of another database engine; this instance uses {kind}.")
        held = instance_contents(engine, storage)
        if held and not force:
            raise BackupError(f"The instance is not empty ({held}); restore into a fresh one or pass --force.")
        added = _put_files(storage, Path(tmp) / "files", manifest["files"])
        try:
            databases.restore(engine, dump)
        except BaseException:
            for key in added:
                storage.delete(key)
            raise
    removed = _remove_others(storage, manifest["files"]) if force else 0
    with engine.connect() as conn:
        revision, rows, _ = _read_state(conn)
    total = _size(storage, manifest["files"])
    seconds = round(time.monotonic() - started, 3)
    return Report(str(path), kind, revision, rows, len(manifest["files"]), total, seconds, removed)


def _dump_name(kind: str) -> str:
    return databases.SQLITE_FILE if kind == "sqlite" else databases.POSTGRES_FILE


def _unpack_verified(path: Path, into: Path) -> tuple[dict, Path]:
    """Extracts the archive into `into` and checks its manifest and every checksum."""
    try:
        with tarfile.open(path, "r:") as tar:
            names = _extract(tar, into)
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"{path} is not a readable backup archive: {exc}") from None
    if MANIFEST not in names:
        raise BackupError(f"{path} has no {MANIFEST}: it is not a complete backup.")
    manifest = json.loads((into / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path} has backup format {manifest.get('format')!r}; this portal reads {FORMAT}.")
    expected = {manifest["database"]["file"]: manifest["database"]["sha256"]}
    expected |= {FILES + key: digest for key, digest in manifest["files"].items()}
    if set(expected) != names - {MANIFEST}:
        raise BackupError(f"{path} does not hold exactly the files its manifest lists.")
    for name, digest in expected.items():
        if _sha256((into / name).read_bytes()) != digest:
            raise BackupError(f"{path}: {name} does not match its checksum; the archive is damaged.")
    return manifest, into / manifest["database"]["file"]


def _extract(tar: tarfile.TarFile, into: Path) -> set[str]:
    names = set()
    for member in tar:
        name = member.name
        allowed = name in (MANIFEST, databases.SQLITE_FILE, databases.POSTGRES_FILE) or (
            name.startswith(FILES) and _is_key(name[len(FILES) :])
        )
        if not member.isfile() or not allowed:
            raise BackupError(f"Unexpected entry {name!r} in the archive: it is not a backup of this portal.")
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(tar.extractfile(member).read())
        names.add(name)
    return names


def _is_key(key: str) -> bool:
    try:
        check_key(key)
    except StorageError:
        return False
    return True


def instance_contents(engine: sa.Engine, storage: LocalStorage) -> str:
    """ "" when the database has no rows (migrations alone are fine) and storage no files; else what it holds."""
    with engine.connect() as conn:
        tables = [t for t in sa.inspect(conn).get_table_names() if t != "alembic_version"]
        rows = sum(conn.execute(sa.select(sa.func.count()).select_from(sa.table(t))).scalar_one() for t in tables)
    files = len(stored_keys(storage)) if storage.root.exists() else 0
    return f"{rows} rows, {files} files" if rows or files else ""


def _put_files(storage: LocalStorage, source: Path, files: dict[str, str]) -> list[str]:
    """Saves each file (atomic writes); returns the keys that were not there before."""
    added = []
    for key in files:
        if not storage.exists(key):
            added.append(key)
        storage.save(key, (source / key).read_bytes())
    return added


def _remove_others(storage: LocalStorage, files: dict[str, str]) -> int:
    others = [key for key in stored_keys(storage) if key not in files]
    for key in others:
        storage.delete(key)
    return len(others)


def _size(storage: LocalStorage, files: dict[str, str]) -> int:
    return sum(storage.path(key).stat().st_size for key in files)
