"""Transactions per unit of work: a folder-upload chunk is stored in ONE transaction (one INSERT per
table), and a worker's micro-batch in ONE transaction after the claim (worker/batching.py).

Every COMMIT the engine sends is recorded with the statements of its transaction (SQLAlchemy
`before_cursor_execute` and `commit` events on the app's engine), so the counts are what the
database saw. The tests run on SQLite and, with --database=postgresql, on PostgreSQL.

Bulk INSERTs are checked on PostgreSQL: there a table's new rows go in as one INSERT ... RETURNING.
SQLite does not promise the order of RETURNING rows, so SQLAlchemy sends them one statement per row
there (in-process calls, in the same single transaction).
"""

from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pytest
from PIL import Image as PILImage
from portal_helpers import make_token, make_user, worker_serving
from sqlalchemy import event
from sqlalchemy.orm import Session

from webapp.db import db
from webapp.models import Analysis, BatchItem, Case, Explanation, Image, Job
from webapp.storage import storage_from_settings


class Transactions:
    """The committed transactions, each as the list of its statements' first words and table
    (e.g. "INSERT INTO analyses", "UPDATE jobs")."""

    def __init__(self, engine):
        self.engine, self.committed, self.current = engine, [], []
        event.listen(engine, "before_cursor_execute", self.statement)
        event.listen(engine, "commit", self.commit)
        event.listen(engine, "rollback", self.rollback)

    def statement(self, conn, cursor, statement, parameters, context, executemany):
        match = re.match(r"\s*(INSERT INTO|UPDATE|DELETE FROM)\s+\"?(\w+)", statement, re.IGNORECASE)
        if match:
            self.current.append(f"{match[1].upper()} {match[2]}")

    def commit(self, conn):
        self.committed.append(self.current)
        self.current = []

    def rollback(self, conn):
        self.current = []

    def start(self):
        self.committed, self.current = [], []

    def close(self):
        event.remove(self.engine, "before_cursor_execute", self.statement)
        event.remove(self.engine, "commit", self.commit)
        event.remove(self.engine, "rollback", self.rollback)


@pytest.fixture
def transactions(app):
    with app.app_context():
        recorder = Transactions(db.engine)
    yield recorder
    recorder.close()


def bulk_inserts(app) -> bool:
    with app.app_context():
        return db.engine.dialect.name == "postgresql"


def png(seed: int, **save_options) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    PILImage.fromarray(pixels).save(buffer, format="PNG", **save_options)
    return buffer.getvalue()


def count(app, model) -> int:
    with app.app_context():
        return db.session.scalar(db.select(db.func.count()).select_from(model))


@pytest.fixture
def headers(app):
    make_user(app, "t@example.org")
    return {"Authorization": f"Bearer {make_token(app, 't@example.org')}"}


def new_batch(client, headers, files) -> int:
    response = client.post("/api/v1/batches", data={"images": files, "expected_files": "9"}, headers=headers)
    assert response.status_code == 202, response.json
    return response.json["id"]


def test_a_chunk_is_stored_in_one_transaction_with_one_insert_per_table(app, client, headers, sent_tasks, transactions):
    batch_id = new_batch(client, headers, [(io.BytesIO(png(0)), "first/a.png")])
    files = [
        (io.BytesIO(png(1)), "second/b.png"),
        (io.BytesIO(png(2)), "second/c.png"),
        (io.BytesIO(png(1)), "second/b-again.png"),  # a duplicate of a file earlier in the same chunk
        (io.BytesIO(png(0)), "second/a-again.png"),  # a duplicate of an image stored before
        (io.BytesIO(b"not an image"), "second/broken.png"),  # refused on its own
        (io.BytesIO(png(3)), "second/d.png"),
        (io.BytesIO(png(2, compress_level=9)), "second/c-other-file.png"),  # c's pixels in other bytes
    ]

    transactions.start()
    response = client.post(f"/api/v1/batches/{batch_id}/files", data={"images": files}, headers=headers)
    assert response.status_code == 202, response.json
    assert (response.json["stored"], response.json["duplicates"], len(response.json["errors"])) == (3, 3, 1)

    assert len(transactions.committed) == 1, transactions.committed
    (writes,) = transactions.committed
    if bulk_inserts(app):
        for table in ("cases", "images", "jobs", "batch_items"):
            assert writes.count(f"INSERT INTO {table}") == 1, writes
    with app.app_context():
        items = db.session.scalars(
            db.select(BatchItem).where(BatchItem.batch_id == batch_id).order_by(BatchItem.id)
        ).all()
        named = {i.filename: i for i in items}
        assert [i.filename for i in items][1:] == [name for _, name in files]  # in the order sent
        b, again = named["second/b.png"], named["second/b-again.png"]
        assert (again.duplicate, again.case_id, again.image_id, again.job_id) == (True, b.case_id, b.image_id, b.job_id)
        assert named["second/a-again.png"].case_id == named["first/a.png"].case_id
        assert named["second/c-other-file.png"].image_id == named["second/c.png"].image_id
        assert named["second/broken.png"].error and named["second/broken.png"].case_id is None
    # One analyse message per micro-batch, sent after the commit.
    stored = tuple(named[f"second/{n}.png"].job_id for n in "bcd")
    assert [args for task, args, _ in sent_tasks][1:] == [stored]


def test_a_chunk_whose_commit_fails_leaves_no_rows_and_no_files(app, client, headers, sent_tasks):
    batch_id = new_batch(client, headers, [(io.BytesIO(png(0)), "first/a.png")])
    storage_dir = app.extensions["settings"].STORAGE_DIR
    files_before = sorted(p for p in storage_dir.rglob("*") if p.is_file())
    rows_before = [count(app, model) for model in (Case, Image, Job, BatchItem)]

    def fail_the_chunk(session):  # the database refuses the commit that stores the chunk's items
        if any(isinstance(row, BatchItem) for row in session.new):
            raise RuntimeError("the disk is full")

    event.listen(Session, "before_commit", fail_the_chunk)
    files = [(io.BytesIO(png(seed)), f"second/{seed}.png") for seed in (1, 2, 3)]
    try:
        with pytest.raises(RuntimeError, match="the disk is full"):
            client.post(f"/api/v1/batches/{batch_id}/files", data={"images": files}, headers=headers)
    finally:
        event.remove(Session, "before_commit", fail_the_chunk)

    assert sorted(p for p in storage_dir.rglob("*") if p.is_file()) == files_before
    assert [count(app, model) for model in (Case, Image, Job, BatchItem)] == rows_before
    assert len(sent_tasks) == 1  # only the first request's job was sent


@pytest.fixture(scope="module")
def tiny_predictor():
    from ml.predictor import Predictor

    return Predictor.untrained(input_size=(32, 32))


@pytest.fixture
def worker(app, monkeypatch, tiny_predictor):
    """worker.tasks in `app` with a small real model (Grad-CAM maps, SHAP rows); messages recorded."""
    import worker.batching as batching
    import worker.explain as explain

    tasks = worker_serving(app, monkeypatch, tiny_predictor)
    sent: list[tuple] = []
    monkeypatch.setattr(explain, "send", lambda name, *args: sent.append((name, args)))
    monkeypatch.setattr(batching, "send", lambda name, *args, queue: sent.append((name, args)))
    settings = dataclasses.replace(app.extensions["settings"], PREDICT_BATCH_SIZE=4)
    monkeypatch.setitem(app.extensions, "settings", settings)
    return tasks, sent


def test_a_micro_batch_is_claimed_in_one_transaction_and_stored_in_one(
    app, client, headers, sent_tasks, transactions, worker
):
    from webapp.model_versions.service import register_model_version

    tasks, sent = worker
    files = [(io.BytesIO(png(seed)), f"folder/{seed}.png") for seed in range(6)]
    new_batch(client, headers, files)
    first, second = [args for task, args, _ in sent_tasks]
    assert (len(first), len(second)) == (4, 2)
    with app.app_context():
        register_model_version(tasks.batching.predict.predictor().manifest, None)  # as the first batch did
        unreadable = db.session.get(Job, first[3]).image.storage_key
        storage_from_settings(app.extensions["settings"]).delete(unreadable)

    transactions.start()
    assert tasks.analyse(*first) == "succeeded"

    claim, store = transactions.committed  # exactly two: nothing else is committed
    assert claim == ["UPDATE jobs", "UPDATE jobs"]  # the lead, then its companions in one UPDATE
    # Bulk statements: one per table and set of columns (succeeded or failed analyses, Grad-CAM
    # rows done or SHAP rows queued), however many images the batch has.
    assert store[0] == "UPDATE images"  # the lock against a concurrent deletion comes first
    assert store.count("UPDATE jobs") <= 2
    if bulk_inserts(app):
        assert store.count("INSERT INTO analyses") == 2
        assert store.count("INSERT INTO explanations") == 2
    with app.app_context():
        jobs = [db.session.get(Job, j) for j in first]
        assert [j.status for j in jobs] == ["succeeded"] * 3 + ["failed"]
        assert jobs[3].analysis.status == "failed" and "No stored object" in jobs[3].error
        analyses = [j.analysis for j in jobs[:3]]
        assert all(a.status == "succeeded" for a in analyses)
        maps = db.session.scalars(db.select(Explanation).where(Explanation.method == "gradcam")).all()
        assert sorted(m.analysis_id for m in maps) == sorted(a.id for a in analyses)
        assert all(m.status == "done" for m in maps)
    # The SHAP message goes out after the commit: one for the micro-batch, listing each analysis
    # with queued rows (the probe: one message per analysis, 8 % of the store's time).
    (shap,) = [args for name, args in sent if name == "worker.tasks.explain_shap"]
    assert sorted(shap) == sorted(a.id for a in analyses)

    # A job whose image already has its analysis (the same file uploaded again by a re-run) reuses it:
    # its follow-up rows go into the same single store transaction.
    with app.app_context():
        job = Job(image_id=jobs[0].image_id)
        db.session.add(job)
        db.session.commit()
        reused_job = job.id
    transactions.start()
    assert tasks.analyse(reused_job, *second) == "succeeded"
    assert len(transactions.committed) == 2, transactions.committed
    with app.app_context():
        assert db.session.get(Job, reused_job).analysis_id == analyses[0].id
        assert count(app, Analysis) == 6
