"""Zip archives are decoded by the worker's ingest task, not in the web request (issue 14).

The probe: a 3.9 KB zip of three 36 MP PNGs cost 29-45 s of web-process CPU, and duplicates were
found only after decoding. Now the request checks the central directory, stores the archive with a
pending item per entry and sends `worker.tasks.ingest_archive`; the task (run here in-process, as
the worker runs it) decodes each entry through store_image, which refuses raw bytes already stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import zipfile
from datetime import timedelta

import pytest
from e2e.e2e_support import redis_url  # noqa: F401  (fixture: a real redis-server)
from PIL import Image as PILImage
from portal_helpers import FULLRES_IMAGE, SMALL_IMAGES, image_bytes
from research_helpers import run_sent_ingests, zip_bytes

from webapp.queue import INGEST_QUEUE, INGEST_TASK


def _png(size: int, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), colour).save(buffer, "PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def _items(app, batch_id: int) -> list[tuple[str, bool, bool, str | None, int | None]]:
    from sqlalchemy import select

    from webapp.db import db
    from webapp.models import BatchItem

    with app.app_context():
        rows = db.session.execute(
            select(BatchItem.filename, BatchItem.pending, BatchItem.duplicate, BatchItem.error, BatchItem.case_id)
            .where(BatchItem.batch_id == batch_id)
            .order_by(BatchItem.id)
        ).all()
        return [tuple(r) for r in rows]


def _archive_stored(app, batch_id: int) -> bool:
    from webapp.batches.service import archive_key
    from webapp.storage import storage_from_settings

    with app.app_context():
        return storage_from_settings(app.extensions["settings"]).exists(archive_key(batch_id))


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images decoded (webapp.imaging.process_upload, as store_image calls it)."""
    from webapp.cases import intake

    calls: list[int] = []
    real = intake.process_upload
    monkeypatch.setattr(intake, "process_upload", lambda data, *a: calls.append(len(data)) or real(data, *a))
    return calls


def test_a_tiny_zip_of_36_mp_pngs_is_decoded_by_the_worker_not_the_web_request(
    app, client, auth_headers, sent_tasks, decodes
):
    pngs = {f"lesions/big{i}.png": _png(6000, (40 * i, 90, 120)) for i in range(3)}
    archive = zip_bytes(pngs)
    assert len(archive) < 8 * 1024, len(archive)  # the probe's was 3.9 KB

    response = client.post("/api/v1/batches", headers=auth_headers, data={"archive": (io.BytesIO(archive), "b.zip")})
    assert response.status_code == 202, response.json
    assert response.json["pending"] == 3 and response.json["stored"] == 0 and decodes == []
    batch_id = response.json["id"]
    assert [t for t in sent_tasks if t[0] == INGEST_TASK] == [(INGEST_TASK, (batch_id,), INGEST_QUEUE)]
    page = client.get(f"/api/v1/batches/{batch_id}", headers=auth_headers).json
    assert page["counts"]["pending"] == 3 and not page["finished"] and _archive_stored(app, batch_id)

    assert run_sent_ingests(app, sent_tasks) == ["done"]
    assert len(decodes) == 3
    progress = client.get(f"/api/v1/batches/{batch_id}", headers=auth_headers).json
    assert len(progress["case_ids"]) == 3 and progress["counts"]["pending"] == 0 and progress["counts"]["queued"] == 3
    assert not _archive_stored(app, batch_id)  # every entry decoded: the archive is not kept


def test_duplicates_inside_the_archive_and_against_stored_images_are_found_before_decoding(
    app, client, auth_headers, sent_tasks, decodes
):
    stored = image_bytes(SMALL_IMAGES[0])
    case = client.post("/api/v1/cases", headers=auth_headers, data={"image": (io.BytesIO(stored), "s.jpg")})
    assert case.status_code == 202 and len(decodes) == 1
    new = image_bytes(SMALL_IMAGES[1])
    entries = {
        "a/stored-again.jpg": stored,
        "a/new.jpg": new,
        "a/new-again.jpg": new,
        "a/broken.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 50,
        "a/broken-again.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 50,
    }
    batch = client.post(
        "/api/v1/batches", headers=auth_headers, data={"archive": (io.BytesIO(zip_bytes(entries)), "d.zip")}
    ).json
    run_sent_ingests(app, sent_tasks)

    # Decoded: the stored image once (its upload), the new one once, the broken file once.
    assert len(decodes) == 3
    items = {
        name: (pending, duplicate, error, case_id)
        for name, pending, duplicate, error, case_id in _items(app, batch["id"])
    }
    assert items["a/stored-again.jpg"] == (False, True, None, case.json["id"])
    new_case = items["a/new.jpg"][3]
    assert items["a/new.jpg"] == (False, False, None, new_case) and new_case != case.json["id"]
    assert items["a/new-again.jpg"] == (False, True, None, new_case)
    assert items["a/broken.png"][2] and items["a/broken-again.png"][2] == items["a/broken.png"][2]
    progress = client.get(batch["url"], headers=auth_headers).json
    assert progress["duplicates"] == 2 and progress["counts"]["failed"] == 2 and progress["counts"]["pending"] == 0


def test_the_batch_page_shows_entries_pending_then_decoded_and_refused(
    app, client, auth_headers, researcher, sent_tasks
):
    from portal_helpers import login

    entries = {"x/ok.jpg": image_bytes(SMALL_IMAGES[2]), "x/bad.jpg": b"\xff\xd8\xff not a jpeg"}
    batch = client.post(
        "/api/v1/batches", headers=auth_headers, data={"archive": (io.BytesIO(zip_bytes(entries)), "p.zip")}
    ).json
    login(client, researcher)
    before = client.get(f"/batches/{batch['id']}").get_data(as_text=True)
    assert '<span id="count-pending">2</span>' in before and "In progress" in before
    run_sent_ingests(app, sent_tasks)
    after = client.get(f"/batches/{batch['id']}").get_data(as_text=True)
    assert '<span id="count-pending">0</span>' in after
    assert '<span id="count-queued">1</span>' in after and '<span id="count-failed">1</span>' in after
    assert "x/bad.jpg" in after


@contextlib.contextmanager
def two_entry_chunks(app, monkeypatch):
    """The ingest task with PREDICT_BATCH_SIZE=2: archive entries committed two at a time."""
    from worker import ingest

    settings = dataclasses.replace(app.extensions["settings"], PREDICT_BATCH_SIZE=2)
    with monkeypatch.context() as patch:
        patch.setattr(ingest, "current_settings", lambda: settings)
        yield


def test_entries_are_committed_a_chunk_at_a_time_with_one_message_per_chunk(
    app, client, auth_headers, sent_tasks, monkeypatch
):
    """The probe: one commit per entry (item, case, image and job each time)."""
    from sqlalchemy import event

    from webapp.db import db
    from webapp.queue import ANALYSE_TASK

    entries = {f"c/{name}": image_bytes(name) for name in [*SMALL_IMAGES, FULLRES_IMAGE]}
    batch = client.post(
        "/api/v1/batches", headers=auth_headers, data={"archive": (io.BytesIO(zip_bytes(entries)), "c.zip")}
    ).json
    commits: list[int] = []
    with app.app_context():
        engine = db.engine
    record = lambda conn: commits.append(1)  # noqa: E731
    event.listen(engine, "commit", record)
    try:
        with two_entry_chunks(app, monkeypatch):
            assert run_sent_ingests(app, sent_tasks) == ["done"]
    finally:
        event.remove(engine, "commit", record)
    assert len(commits) == 3  # 5 entries in chunks of 2
    assert [len(args) for name, args, _ in sent_tasks if name == ANALYSE_TASK] == [2, 2, 1]
    assert [pending for _, pending, *_ in _items(app, batch["id"])] == [False] * 5


def test_a_killed_worker_loses_nothing_and_the_sweep_sends_the_archive_again(
    app, client, auth_headers, sent_tasks, monkeypatch
):
    from webapp.models import utcnow
    from worker import ingest

    names = [f"k/{n}" for n in SMALL_IMAGES[:3]]
    entries = {name: image_bytes(n) for name, n in zip(names, SMALL_IMAGES[:3])}
    batch = client.post(
        "/api/v1/batches", headers=auth_headers, data={"archive": (io.BytesIO(zip_bytes(entries)), "k.zip")}
    ).json

    real = ingest._read_entry
    read: list[object] = []

    def dies_in_the_second_chunk(archive, info, refused):
        if len(read) == 2:
            raise SystemExit("worker killed")  # as SIGKILL mid-chunk: nothing after this runs
        read.append(info)
        return real(archive, info, refused)

    monkeypatch.setattr(ingest, "_read_entry", dies_in_the_second_chunk)
    with two_entry_chunks(app, monkeypatch), pytest.raises(SystemExit):
        run_sent_ingests(app, sent_tasks)
    # The first chunk is committed whole; the second, half read, left nothing but its pending item.
    assert [(n, p) for n, p, *_ in _items(app, batch["id"])] == [(names[0], False), (names[1], False), (names[2], True)]
    assert _archive_stored(app, batch["id"])

    monkeypatch.setattr(ingest, "_read_entry", real)
    resent: list[tuple] = []
    settings = app.extensions["settings"]
    early = ingest.sweep_archives(app, lambda *t: resent.append(t), settings, None)
    assert early == {"resent": 0, "send_errors": 0}  # not yet waiting longer than SWEEP_QUEUED_AFTER
    later = utcnow() + timedelta(seconds=settings.SWEEP_QUEUED_AFTER + 1)
    assert ingest.sweep_archives(app, lambda *t: resent.append(t), settings, None, now=later)["resent"] == 1
    assert resent == [(INGEST_TASK, batch["id"], INGEST_QUEUE)]
    assert run_sent_ingests(app, [(INGEST_TASK, (batch["id"],), INGEST_QUEUE)]) == ["done"]
    items = _items(app, batch["id"])
    assert [p for _, p, *_ in items] == [False] * 3 and all(case_id for *_, case_id in items)
    assert not _archive_stored(app, batch["id"])


def test_an_archive_with_one_name_twice_is_refused_and_nothing_is_stored(app, client, auth_headers, sent_tasks):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("same.jpg", image_bytes(SMALL_IMAGES[0]))
        zf.writestr("same.jpg", image_bytes(SMALL_IMAGES[1]))
    buffer.seek(0)
    response = client.post("/api/v1/batches", headers=auth_headers, data={"archive": (buffer, "twice.zip")})
    assert response.status_code == 400 and "twice" in response.json["error"]
    from webapp.db import db
    from webapp.models import Batch

    with app.app_context():
        assert db.session.query(Batch).count() == 0
    assert sent_tasks == []


def test_a_batch_deleted_before_its_archive_is_decoded_leaves_no_archive_behind(
    app, client, auth_headers, sent_tasks, decodes
):
    from portal_helpers import make_user

    from webapp.cases.deletion import delete_batch
    from webapp.db import db
    from webapp.models import User

    entries = {"d/one.jpg": image_bytes(SMALL_IMAGES[0])}
    batch = client.post(
        "/api/v1/batches", headers=auth_headers, data={"archive": (io.BytesIO(zip_bytes(entries)), "g.zip")}
    ).json
    make_user(app, "admin@example.org", role="admin")
    with app.app_context():
        admin = db.session.query(User).filter_by(email="admin@example.org").one()
        delete_batch(batch["id"], admin, "uploaded by mistake")
    assert _archive_stored(app, batch["id"])
    assert run_sent_ingests(app, sent_tasks) == ["gone"]
    assert not _archive_stored(app, batch["id"]) and decodes == []


def test_one_process_per_archive_and_the_sweep_waits_for_a_live_claim(
    app,
    client,
    auth_headers,
    sent_tasks,
    decodes,
    redis_url,  # noqa: F811  (the fixture imported above)
    monkeypatch,
):
    """With a real redis-server: a held claim makes another delivery a no-op, and the sweep re-sends
    only once the claim is gone (a dead process's claim runs out), then not again within its guard."""
    import redis

    from webapp.models import utcnow
    from worker import ingest

    claims = redis.Redis.from_url(redis_url)
    monkeypatch.setattr(ingest, "_redis", lambda: claims)
    batch = client.post(
        "/api/v1/batches",
        headers=auth_headers,
        data={"archive": (io.BytesIO(zip_bytes({"c/one.jpg": image_bytes(SMALL_IMAGES[0])})), "c.zip")},
    ).json
    claims.set(ingest.CLAIM_KEY.format(batch["id"]), "other-host:1", ex=60)
    assert run_sent_ingests(app, sent_tasks) == ["busy"] and decodes == []

    settings = app.extensions["settings"]
    later = utcnow() + timedelta(seconds=settings.SWEEP_QUEUED_AFTER + 1)
    resent: list[tuple] = []
    assert ingest.sweep_archives(app, lambda *t: resent.append(t), settings, claims, now=later)["resent"] == 0
    claims.delete(ingest.CLAIM_KEY.format(batch["id"]))  # its process died and the claim ran out
    assert ingest.sweep_archives(app, lambda *t: resent.append(t), settings, claims, now=later)["resent"] == 1
    assert ingest.sweep_archives(app, lambda *t: resent.append(t), settings, claims, now=later)["resent"] == 0
    assert run_sent_ingests(app, [(INGEST_TASK, (batch["id"],), INGEST_QUEUE)]) == ["done"] and len(decodes) == 1
    assert not claims.exists(ingest.CLAIM_KEY.format(batch["id"]))  # released when done


def test_a_zip_through_the_upload_page_is_stored_pending_and_decoded_by_the_worker(
    app, client, researcher, sent_tasks, decodes
):
    from portal_helpers import csrf_from, login

    login(client, researcher)
    token = csrf_from(client.get("/batches/new").get_data(as_text=True))
    archive = zip_bytes({"w/one.jpg": image_bytes(SMALL_IMAGES[3])})
    response = client.post(
        "/batches", data={"csrf_token": token, "archive": (io.BytesIO(archive), "w.zip"), "name": "page zip"}
    )
    assert response.status_code == 302 and decodes == []
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert '<span id="count-pending">1</span>' in page
    assert run_sent_ingests(app, sent_tasks) == ["done"] and len(decodes) == 1
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert '<span id="count-pending">0</span>' in page and '<span id="count-queued">1</span>' in page
