"""Migrations keep data: every revision, populated, upgraded to head and one step down and up again.

For each revision in migrations/versions and each engine (SQLite, PostgreSQL), a database is
migrated to that revision and filled with rows in every table that exists there (users, tokens,
model versions, batches, cases, images with their stored files, analyses, explanations with their
maps, jobs, batch items, reviews, audit rows). It is upgraded to head; every row must still be
there with the values it had, and every stored file must be readable through the rows at head.
Then head goes one step down and up again, with the same checks. `pytest -s` prints the matrix.

A SQLite batch rebuild with foreign keys on fires ON DELETE CASCADE and deletes children (0003
rebuilding `cases` once deleted every image and job): migrations/env.py turns them off around
the run, and these tests fail without that.
"""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from portal_helpers import IMAGES, SMALL_IMAGES
from sqlalchemy import inspect

from webapp import create_app
from webapp.config import REPO_ROOT
from webapp.db import db

SCRIPTS = ScriptDirectory(str(REPO_ROOT / "migrations"))
REVISIONS = [script.revision for script in reversed(list(SCRIPTS.walk_revisions()))]
HEAD = SCRIPTS.get_current_head()
T0 = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)


def test_upgrade_matches_models_and_downgrade_empties(tmp_path):
    from flask_migrate import downgrade, upgrade

    app = create_app({"TESTING": True, "INSTANCE_DIR": tmp_path, "DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}"})
    with app.app_context():
        upgrade()
        tables = set(inspect(db.engine).get_table_names())
        assert {"users", "api_tokens", "cases", "images", "model_versions", "analyses", "jobs"} <= tables
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, db.metadata) == []
        downgrade(revision="base")
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        db.engine.dispose()


def test_there_is_one_head_and_a_linear_history():
    assert SCRIPTS.get_heads() == [HEAD]
    assert REVISIONS[-1] == HEAD and len(set(REVISIONS)) == len(REVISIONS)


# --- the rows a populated database holds -----------------------------------------------------


def _image_files() -> list[tuple[bytes, str]]:
    files = []
    for name in SMALL_IMAGES[:2]:
        data = (IMAGES / name).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        files.append((data, digest))
    return files


def _rows() -> dict[str, list[dict]]:
    """Two rows per table, every column of head; tables and columns a revision lacks are left out."""
    (img1, h1), (img2, h2) = _image_files()
    manifest = {"class_names": ["mel", "nv"], "malignant_classes": ["mel"], "input_size": [120, 160]}
    probs = {"mel": 0.7, "nv": 0.3}
    return {
        "users": [
            {"id": 1, "email": "admin@example.org", "password_hash": "pbkdf2:x", "role": "admin", "active": True},
            {"id": 2, "email": "rev@example.org", "password_hash": "pbkdf2:y", "role": "reviewer", "active": False},
        ],
        "api_tokens": [
            {"id": 1, "user_id": 1, "token_hash": "a" * 64, "label": "ci", "last_used_at": T0},
            {"id": 2, "user_id": 2, "token_hash": "b" * 64, "label": None, "revoked_at": T0},
        ],
        "model_versions": [
            {
                "id": 1,
                "name": "net",
                "version": "1",
                "trained": True,
                "trained_on": "HAM10000",
                "artifact_path": "/m/1",
            },
            {"id": 2, "name": "net", "version": "2", "trained": False, "trained_on": None, "artifact_path": None},
        ],
        "batches": [
            {"id": 1, "name": "folder", "source": "cli", "created_by_id": 1, "expected_files": 2},
            {"id": 2, "name": None, "source": "zip", "created_by_id": 2, "metadata_rows": {"ISIC_1": {"dx": "mel"}}},
        ],
        "cases": [
            {"id": 1, "patient_ref": "P1", "lesion_ref": "L1", "age": 52, "sex": "male", "site": "back"},
            {"id": 2, "patient_ref": "P2", "age": 30, "sex": "female", "site": "face", "reference_dx": "mel"},
        ],
        "images": [
            {"id": 1, "case_id": 1, "content_hash": h1, "storage_key": f"images/{h1[:2]}/{h1[2:4]}/{h1}.jpg"},
            {"id": 2, "case_id": 2, "content_hash": h2, "storage_key": f"images/{h2[:2]}/{h2[2:4]}/{h2}.jpg"},
        ],
        "analyses": [
            {"id": 1, "image_id": 1, "model_version_id": 1, "status": "succeeded", "probabilities": probs},
            {"id": 2, "image_id": 2, "model_version_id": 1, "status": "failed", "error": "boom"},
        ],
        "explanations": [
            {"id": 1, "analysis_id": 1, "image_id": 1, "method": "gradcam", "status": "done"},
            {"id": 2, "analysis_id": 1, "image_id": 1, "method": "shap", "status": "queued"},
        ],
        "jobs": [
            {"id": 1, "kind": "analyse", "status": "succeeded", "image_id": 1, "analysis_id": 1, "attempts": 1},
            {"id": 2, "kind": "explain", "status": "queued", "image_id": 2, "model_version_id": 1, "attempts": 0},
        ],
        "batch_items": [
            {"id": 1, "batch_id": 1, "filename": "a.jpg", "case_id": 1, "image_id": 1, "job_id": 1},
            {"id": 2, "batch_id": 1, "filename": "b.jpg", "case_id": 2, "image_id": 2, "job_id": 2, "duplicate": True},
        ],
        "reviews": [
            {"id": 1, "case_id": 1, "reviewer_id": 2, "diagnosis": "mel", "confidence": 4, "analysis_id": 1},
            {"id": 2, "case_id": 2, "reviewer_id": 1, "diagnosis": "nv", "confidence": 2, "notes": "flat"},
        ],
        "audit_log": [
            {"id": 1, "user_id": 1, "action": "review.create", "entity": "review", "entity_id": 1, "case_id": 1},
            {"id": 2, "user_id": 2, "action": "user.update", "entity": "user", "entity_id": 2, "new": {"role": "x"}},
        ],
    } | {"_files": {"images": [img1, img2], "manifest": manifest}}


def _explanation_keys(row: dict, content_hash: str) -> dict:
    base = f"explanations/{content_hash[:2]}/{content_hash[2:4]}/{content_hash}/m1-{row['method']}-mel"
    return {"raw_key": f"{base}.npy", "overlay_key": f"{base}.png"}


def _complete(table: sa.Table, row: dict, extra: dict) -> dict:
    """The row with the columns `table` has at this revision, the rest of them filled generically."""
    values = {}
    for column in table.columns:
        name = column.name
        if name in row or name in extra:
            values[name] = row.get(name, extra.get(name))
        elif isinstance(column.type, sa.DateTime) or name.endswith("_at") or name == "at":
            values[name] = T0
        elif not column.nullable and column.server_default is None:
            values[name] = _filler(column)
    return values


def _filler(column: sa.Column):
    if isinstance(column.type, sa.Boolean):
        return False
    if isinstance(column.type, sa.Integer):
        return 0
    if isinstance(column.type, sa.JSON):
        return {}
    raise AssertionError(
        f"No test value for the required column {column.table.name}.{column.name}: add one to _rows()."
    )


def populate(engine: sa.Engine, storage_dir: Path) -> int:
    """Fills every known table that exists at the database's revision; stores the files; returns files."""
    spec = _rows()
    files = spec.pop("_files")
    meta = sa.MetaData()
    meta.reflect(engine)
    hashes = {row["id"]: row["content_hash"] for row in spec["images"]}
    extras = {
        "model_versions": {"class_names": ["mel", "nv"], "manifest": files["manifest"]},
        "explanations": {"model_version_id": 1, "class_name": "mel", "attempts": 0},
        "reviews": {"updated_at": T0},
    }
    stored = 0
    with engine.begin() as conn:
        for name, rows in spec.items():
            if name not in meta.tables:
                continue
            table = meta.tables[name]
            for row in rows:
                extra = dict(extras.get(name, {}))
                if name == "explanations":
                    extra |= _explanation_keys(row, hashes[row["image_id"]])
                if name == "images":
                    extra |= {"width": 600, "height": 450, "original_filename": f"case{row['id']}.jpg"}
                conn.execute(table.insert().values(**_complete(table, row, extra)))
            if name == "images":
                for row, data in zip(rows, files["images"], strict=True):
                    stored += _store(storage_dir, row["storage_key"], data)
            if name == "explanations":
                for row in rows:
                    for key in _explanation_keys(row, hashes[row["image_id"]]).values():
                        stored += _store(storage_dir, key, _map_bytes(key))
    assert sum(len(rows) for name, rows in spec.items() if name in meta.tables) > 0
    return stored


def _map_bytes(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest() * 4


def _store(root: Path, key: str, data: bytes) -> int:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return 1


def snapshot(engine: sa.Engine) -> dict[str, dict[int, dict]]:
    """Every row of every table (but alembic_version), by id, as the driver returns it."""
    meta = sa.MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        return {
            name: {row["id"]: dict(row) for row in conn.execute(sa.select(table)).mappings()}
            for name, table in meta.tables.items()
            if name != "alembic_version"
        }


def assert_kept(before: dict, after: dict, *, tables_may_go: bool = False) -> int:
    """Every row of `before` is in `after` with the same value in each column both still have."""
    checked = 0
    for name, rows in before.items():
        if name not in after:
            assert tables_may_go, f"table {name} is gone"
            continue
        assert set(rows) <= set(after[name]), f"{name}: rows {sorted(set(rows) - set(after[name]))} lost"
        for row_id, row in rows.items():
            now = after[name][row_id]
            changed = {c: (v, now[c]) for c, v in row.items() if c in now and now[c] != v}
            assert not changed, f"{name} row {row_id} changed: {changed}"
            checked += 1
    return checked


def assert_files_readable(app) -> int:
    """Every stored image and explanation map named by a row at head opens and has its content."""
    from webapp.models import Explanation, Image
    from webapp.storage import storage_from_settings

    storage = storage_from_settings(app.extensions["settings"])
    read = 0
    for image in db.session.scalars(sa.select(Image)):
        with storage.open(image.storage_key) as f:
            assert hashlib.sha256(f.read()).hexdigest() == image.content_hash, image.storage_key
        read += 1
    for explanation in db.session.scalars(sa.select(Explanation)):
        for key in (explanation.raw_key, explanation.overlay_key):
            with storage.open(key) as f:
                assert f.read() == _map_bytes(key), key
            read += 1
    db.session.remove()
    return read


# --- every revision, on both engines ---------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrate.db'}"
    return request.getfixturevalue("fresh_postgres_url")


def portal_app(url: str, tmp_path: Path):
    return create_app(
        {
            "TESTING": True,
            "INSTANCE_DIR": tmp_path / "instance",
            "DATABASE_URL": url,
            "STORAGE_DIR": tmp_path / "storage",
            "MODEL_DIR": tmp_path / "no-model",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "BROKER_TIMEOUT": 0.5,
        }
    )


@pytest.mark.db_backends
@pytest.mark.parametrize("revision", REVISIONS)
def test_a_populated_database_keeps_every_row_and_file_through_the_migrations(engine_url, revision, tmp_path):
    from flask_migrate import downgrade, upgrade

    app = portal_app(engine_url, tmp_path)
    with app.app_context():
        upgrade(revision=revision)
        files = populate(db.engine, tmp_path / "storage")
        at_revision = snapshot(db.engine)
        upgrade()
        at_head = snapshot(db.engine)
        rows = assert_kept(at_revision, at_head)
        read = assert_files_readable(app)
        assert read == files
        previous = SCRIPTS.get_revision(HEAD).down_revision
        downgrade(revision=previous or "base")
        one_down = snapshot(db.engine)
        assert_kept(at_head, one_down, tables_may_go=True)
        upgrade()
        assert_kept(one_down, snapshot(db.engine))
        assert assert_files_readable(app) == files
        db.engine.dispose()
    engine = engine_url.split(":")[0].split("+")[0]
    print(f"\nmigrations {engine:10} {revision:24} -> {HEAD}: {rows} rows and {read} files kept; down 1 and up again")


def test_foreign_keys_are_on_again_after_a_migration(tmp_path):
    from flask_migrate import upgrade

    app = portal_app(f"sqlite:///{tmp_path / 'fk.db'}", tmp_path)
    with app.app_context():
        upgrade()
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            with pytest.raises(sa.exc.IntegrityError, match="FOREIGN KEY"):
                conn.exec_driver_sql(
                    "INSERT INTO images (case_id, content_hash, storage_key, width, height, created_at) "
                    "VALUES (999, 'x', 'k', 1, 1, '2026-01-01')"
                )
        db.engine.dispose()


def test_a_migration_that_leaves_dangling_references_fails(tmp_path):
    """The foreign_key_check after the run: rows orphaned while the keys were off are not let through."""
    from flask_migrate import upgrade

    app = portal_app(f"sqlite:///{tmp_path / 'dangling.db'}", tmp_path)
    with app.app_context():
        upgrade(revision=REVISIONS[0])
        populate(db.engine, tmp_path / "storage")
        with db.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.exec_driver_sql("DELETE FROM cases WHERE id = 1")
            conn.commit()
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        config = app.extensions["migrate"].migrate.get_config()
        with pytest.raises(RuntimeError, match="reference missing rows"):
            command.upgrade(config, "head")  # alembic's own command: Flask-Migrate turns errors into exit(1)
        db.engine.dispose()


# --- a database made by the last release ------------------------------------------------------

# "Ship 2026.12.01": the portal as it was shipped with that model, the last release whose schema is
# older than head (0004_job_claimed_by; "Ship 2026.12.01.2" changed the model, not the schema). The
# test runs every migration that came after it.
RELEASE = "c314575"
RELEASE_PASSWORD = "correct horse battery"
# Runs inside the release's own code (its webapp/ and migrations/ first on sys.path): migrate, an
# admin, an API token, the test images imported as a batch through its CLI. Prints the token last.
RELEASE_SCRIPT = """
import sys
from webapp import create_app
app = create_app()
assert app.import_name == "webapp" and sys.modules["webapp"].__file__.startswith(sys.argv[1]), "not the release"
cli = app.test_cli_runner()
for args in (["db", "upgrade"], ["users", "create", "admin@example.org", "--role", "admin", "--password", sys.argv[2]],
             ["users", "token", "admin@example.org"], ["batch", "import", sys.argv[3], "--user", "admin@example.org"]):
    result = cli.invoke(args=args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    if args[1] == "token":
        token = result.output.strip().splitlines()[-1]
print(token)
"""


def release_tree(tmp_path: Path) -> Path:
    """The release's webapp/, migrations/, templates/ and static/ from git (no checkout is changed)."""
    import subprocess
    import tarfile

    tree = tmp_path / "release"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", RELEASE, "webapp", "migrations", "templates", "static"],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
    )
    assert archive.returncode == 0, f"git archive {RELEASE} failed (a full clone is needed): {archive.stderr!r}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def make_release_database(tree: Path, url: str, storage: Path, instance: Path) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env |= {
        "PYTHONPATH": str(tree),
        "PORTAL_ENV": "testing",
        "DATABASE_URL": url,
        "STORAGE_DIR": str(storage),
        "INSTANCE_DIR": str(instance),
        "MODEL_DIR": str(instance / "no-model"),
        "REDIS_URL": "redis://127.0.0.1:1/0",  # nothing listens: jobs stay queued, as with a broker down
    }
    result = subprocess.run(
        [sys.executable, "-c", RELEASE_SCRIPT, str(tree), RELEASE_PASSWORD, str(IMAGES)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.db_backends
def test_a_database_of_the_last_release_upgrades_with_its_uploads_and_its_token(engine_url, tmp_path):
    from flask_migrate import upgrade
    from portal_helpers import login

    from webapp.models import Case

    tree = release_tree(tmp_path)
    token = make_release_database(tree, engine_url, tmp_path / "storage", tmp_path / "release-instance")
    assert token.startswith("dp_")
    app = portal_app(engine_url, tmp_path)
    with app.app_context():
        made_by_release = snapshot(db.engine)
        upgrade()
        rows = assert_kept(made_by_release, snapshot(db.engine))
        files = assert_files_readable(app)
        cases = db.session.scalar(sa.select(sa.func.count()).select_from(Case))
        db.session.remove()
    uploads = sorted(IMAGES.glob("*.jpg"))
    assert cases == files == len(uploads) > 0
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    listed = client.get("/api/v1/cases", headers=headers)
    assert listed.status_code == 200, listed.get_json()
    assert listed.json["total"] == len(uploads)
    shown = [client.get(f"/api/v1/cases/{row['id']}", headers=headers).json for row in listed.json["cases"]]
    names = {image["original_filename"] for case in shown for image in case["images"]}
    assert names == {path.name for path in uploads}
    assert client.get("/api/v1/cases", headers={"Authorization": "Bearer dp_not-the-token"}).status_code == 401
    assert login(client, "admin@example.org", RELEASE_PASSWORD).status_code == 302
    with app.app_context():
        db.engine.dispose()
    engine = engine_url.split(":")[0].split("+")[0]
    print(f"\nrelease {RELEASE} on {engine}: {rows} rows, {files} uploads read back, its API token and password work")
