"""`flask backup create` while uploads continue, `flask backup restore` into a fresh instance.

Threads upload distinct images through the API (the real upload path: checks, storage, commit)
while the backup is taken; the backup's file copy waits until more uploads have been acknowledged
after the database copy, so rows and files written in that window are part of every run. The
archive is restored into a fresh instance: every case acknowledged before the backup began must be
there with its images, and every restored file must equal the original, on SQLite and PostgreSQL.
`pytest tests/test_backup.py -s` prints the figures.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image as PILImage
from portal_helpers import make_token, make_user

UPLOADERS = 3
MORE_DURING_BACKUP = 6  # uploads acknowledged between the database copy and the file copy


@pytest.fixture(params=["sqlite", "postgresql"])
def database_urls(request, tmp_path):
    """Two empty databases of one engine: the running instance's and the fresh one restored into."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'live.db'}", f"sqlite:///{tmp_path / 'fresh.db'}"
    make = request.getfixturevalue("new_postgres_database")
    return make(), make()


def instance(url: str, folder: Path):
    from flask_migrate import upgrade

    from webapp import create_app

    app = create_app(
        {
            "TESTING": True,
            "INSTANCE_DIR": folder / "instance",
            "DATABASE_URL": url,
            "STORAGE_DIR": folder / "storage",
            "MODEL_DIR": folder / "no-model",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "BROKER_TIMEOUT": 0.5,
            "UPLOAD_RATE_LIMIT": "100000 per minute",
        }
    )
    with app.app_context():
        upgrade()
    return app


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


class Uploads:
    """Threads that upload until stopped; each acknowledged case with the time of its 202."""

    def __init__(self, app, token: str):
        self.app, self.headers = app, {"Authorization": f"Bearer {token}"}
        self.acked: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(n,)) for n in range(UPLOADERS)]

    def run(self, n: int) -> None:
        client = self.app.test_client()
        seed = n * 1_000_000
        while not self.stop.is_set():
            seed += 1
            data = {"image": (io.BytesIO(png(seed)), f"u{seed}.png"), "age": "40", "site": "back"}
            response = client.post("/api/v1/cases", headers=self.headers, data=data)
            if response.status_code != 202:
                self.errors.append(f"{response.status_code} {response.get_data(as_text=True)[:200]}")
                return
            with self.lock:
                self.acked.append((time.monotonic(), response.json["id"]))

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def wait_for(self, total: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < total:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"only {self.count()} uploads acknowledged"
            time.sleep(0.01)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


@pytest.fixture
def slow_file_copy(monkeypatch):
    """Holds the backup between its database copy and its file copy until `release()` returns."""
    from webapp.backup import service

    hold: dict = {}
    original = service._write_archive

    def write_archive(*args, **kwargs):
        hold["release"]()
        return original(*args, **kwargs)

    monkeypatch.setattr(service, "_write_archive", write_archive)
    return hold


def test_backup_during_uploads_restores_every_acknowledged_case(database_urls, tmp_path, sent_tasks, slow_file_copy):
    live_url, fresh_url = database_urls
    live = instance(live_url, tmp_path / "live")
    make_user(live, "uploader@example.org")
    archive = tmp_path / "backups" / "portal.tar"
    with Uploads(live, make_token(live, "uploader@example.org")) as uploads:
        uploads.wait_for(8)
        began = time.monotonic()
        slow_file_copy["release"] = lambda: uploads.wait_for(uploads.count() + MORE_DURING_BACKUP)
        result = live.test_cli_runner().invoke(args=["backup", "create", str(archive)])
        ended = time.monotonic()
        assert result.exit_code == 0, result.output
    assert not uploads.errors, uploads.errors
    before = {case_id for at, case_id in uploads.acked if at < began}
    during = [case_id for at, case_id in uploads.acked if began <= at <= ended]
    report = json.loads(result.output)
    assert len(during) >= MORE_DURING_BACKUP and report["rows"]["cases"] >= len(before)

    fresh = instance(fresh_url, tmp_path / "fresh")
    restored = fresh.test_cli_runner().invoke(args=["backup", "restore", str(archive)])
    assert restored.exit_code == 0, restored.output
    cases, compared = check_restored(live, fresh, before)
    assert cases == report["rows"]["cases"] and compared == report["files"]
    engine = live_url.split(":")[0].split("+")[0]
    print(
        f"\nbackup {engine}: {len(uploads.acked)} uploads acknowledged, {len(before)} before the backup began, "
        f"{len(during)} during it ({ended - began:.2f} s); {cases} cases restored, all {len(before)} acknowledged "
        f"before it present; {compared} files compared byte for byte"
    )
    dispose(live, fresh)


def check_restored(live, fresh, acknowledged: set[int]) -> tuple[int, int]:
    """Every acknowledged case is in `fresh` with its images; every restored file equals live's."""
    from webapp.db import db
    from webapp.imaging import pixel_hash
    from webapp.models import Case

    with fresh.app_context():
        cases = {
            case.id: [(im.storage_key, im.content_hash) for im in case.images]
            for case in db.session.scalars(sa.select(Case))
        }
        db.session.remove()
    missing = acknowledged - cases.keys()
    assert not missing, f"{len(missing)} acknowledged cases not restored: {sorted(missing)[:5]}"
    live_root = Path(live.extensions["settings"].STORAGE_DIR)
    fresh_root = Path(fresh.extensions["settings"].STORAGE_DIR)
    for images in cases.values():
        assert images, "a restored case without its image"
        for key, digest in images:
            with PILImage.open(fresh_root / key) as stored:  # the content hash is that of the pixels
                assert pixel_hash(stored.size, stored.convert("RGB").tobytes()) == digest, key
    compared = 0
    for path in sorted(p for p in fresh_root.rglob("*") if p.is_file()):
        assert path.read_bytes() == (live_root / path.relative_to(fresh_root)).read_bytes(), path
        compared += 1
    return len(cases), compared


def dispose(*apps) -> None:
    from webapp.db import db

    for app in apps:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


@pytest.fixture
def backed_up(tmp_path, sent_tasks):
    """An instance on SQLite with two uploads, and its backup archive."""
    live = instance(f"sqlite:///{tmp_path / 'live.db'}", tmp_path / "live")
    make_user(live, "uploader@example.org")
    client, headers = live.test_client(), {"Authorization": f"Bearer {make_token(live, 'uploader@example.org')}"}
    for seed in (1, 2):
        response = client.post("/api/v1/cases", headers=headers, data={"image": (io.BytesIO(png(seed)), "a.png")})
        assert response.status_code == 202
    archive = tmp_path / "portal.tar"
    assert live.test_cli_runner().invoke(args=["backup", "create", str(archive)]).exit_code == 0
    yield live, archive
    dispose(live)


def test_restore_refuses_a_non_empty_instance_unless_forced(backed_up, tmp_path):
    live, archive = backed_up
    target = instance(f"sqlite:///{tmp_path / 'target.db'}", tmp_path / "target")
    make_user(target, "someone@example.org")
    stray = Path(target.extensions["settings"].STORAGE_DIR) / "images" / "st" / "ray.png"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not in the backup")
    refused = target.test_cli_runner().invoke(args=["backup", "restore", str(archive)])
    assert refused.exit_code == 1 and "not empty (1 rows, 1 files)" in refused.output and "--force" in refused.output
    assert count_rows(target, "cases") == 0 and stray.exists()
    forced = target.test_cli_runner().invoke(args=["backup", "restore", str(archive), "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.output)["removed_files"] == 1 and not stray.exists()
    assert count_rows(target, "cases") == 2 and count_rows(target, "users") == 1
    assert check_restored(live, target, {1, 2}) == (2, 2)
    dispose(target)


def count_rows(app, table: str) -> int:
    from webapp.db import db

    with app.app_context():
        with db.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(sa.table(table))).scalar_one()


def rewrite(archive: Path, out: Path, change) -> Path:
    """A copy of `archive` with each member passed through `change(name, data)` (None drops it)."""
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for member in src:
            data = change(member.name, src.extractfile(member).read())
            if data is not None:
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    return out


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda name, data: data[:-1] + b"x" if name.startswith("files/") else data, "does not match its checksum"),
        (lambda name, data: None if name == "manifest.json" else data, "has no manifest.json"),
        (lambda name, data: None if name.startswith("files/") else data, "exactly the files its manifest lists"),
        (
            lambda name, data: data.replace(b'"format": 1', b'"format": 9') if name == "manifest.json" else data,
            "format 9",
        ),
    ],
    ids=["damaged file", "no manifest", "files missing", "unknown format"],
)
def test_a_damaged_archive_is_refused_and_nothing_is_written(backed_up, tmp_path, change, message):
    _, archive = backed_up
    bad = rewrite(archive, tmp_path / "bad.tar", change)
    target = instance(f"sqlite:///{tmp_path / 'target.db'}", tmp_path / "target")
    result = target.test_cli_runner().invoke(args=["backup", "restore", str(bad)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert count_rows(target, "cases") == 0
    assert not [p for p in Path(target.extensions["settings"].STORAGE_DIR).rglob("*") if p.is_file()]
    dispose(target)


def test_not_an_archive_and_an_existing_target_are_refused(backed_up, tmp_path):
    live, archive = backed_up
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello")
    result = live.test_cli_runner().invoke(args=["backup", "restore", str(junk)])
    assert result.exit_code == 1 and "not a readable backup archive" in result.output
    again = live.test_cli_runner().invoke(args=["backup", "create", str(archive)])
    assert again.exit_code == 1 and "never overwrites" in again.output
    assert not archive.with_name(archive.name + ".partial").exists()


def test_every_storage_key_column_is_backed_up():
    from webapp.backup.service import STORAGE_KEY_COLUMNS
    from webapp.db import db

    named = {(c.table.name, c.name) for t in db.metadata.tables.values() for c in t.columns if c.name.endswith("_key")}
    assert {(c.table.name, c.name) for c in STORAGE_KEY_COLUMNS} == named


def test_a_backup_of_one_engine_is_not_restored_into_another(backed_up, tmp_path, fresh_postgres_url):
    _, archive = backed_up
    target = instance(fresh_postgres_url, tmp_path / "pg")
    result = target.test_cli_runner().invoke(args=["backup", "restore", str(archive)])
    assert result.exit_code == 1 and "another database engine" in result.output
    dispose(target)
