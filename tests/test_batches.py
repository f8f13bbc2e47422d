"""Batch upload: files and zip with a HAM10000 CSV, chunks, duplicates, per-file errors, hostile input."""

from __future__ import annotations

import io
import re

import pytest
from portal_helpers import SMALL_IMAGES, csrf_from, image_bytes
from research_helpers import CSV_HEADER, HAM_CSV, fixture_images, run_sent_ingests, zip_bytes


def _counts(app):
    from webapp.db import db
    from webapp.models import Batch, BatchItem, Case, Image

    with app.app_context():
        return {m.__tablename__: db.session.query(m).count() for m in (Batch, BatchItem, Case, Image)}


def test_batch_from_files_with_metadata_then_a_chunk_and_a_duplicate(app, client, auth_headers, sent_tasks):
    images = fixture_images()
    first = SMALL_IMAGES[:2]
    response = client.post(
        "/api/v1/batches",
        headers=auth_headers,
        data={
            "images": [(io.BytesIO(images[n]), f"folder/{n}") for n in first]
            + [(io.BytesIO(b"not an image"), "folder/notes.jpg")],
            "metadata": (io.BytesIO(HAM_CSV.encode()), "HAM10000_metadata.csv"),
        },
    )
    assert response.status_code == 202, response.json
    batch_url = response.json["url"]
    assert response.json["stored"] == 2 and response.json["errors"][0]["file"] == "folder/notes.jpg"

    # A second chunk: two new images and one already stored (linked, not stored twice).
    chunk = client.post(
        f"{batch_url}/files",
        headers=auth_headers,
        data={
            "images": [(io.BytesIO(images[n]), n) for n in SMALL_IMAGES[2:]]
            + [(io.BytesIO(images[first[0]]), "again.jpg")]
        },
    )
    assert chunk.status_code == 202, chunk.json
    assert chunk.json["stored"] == 2 and chunk.json["duplicates"] == 1
    # One message per request's micro-batch, listing its jobs (webapp.queue.send_grouped).
    assert [len(args) for _, args, _ in sent_tasks] == [2, 2]

    progress = client.get(batch_url, headers=auth_headers).json
    assert progress["total"] == 6 and len(progress["case_ids"]) == 4
    # The duplicate follows the existing image's job (still queued: the broker is a fake here).
    assert progress["counts"] == {"pending": 0, "queued": 5, "running": 0, "done": 0, "failed": 1}
    assert progress["duplicates"] == 1
    assert progress["errors"] == [{"file": "folder/notes.jpg", "error": "The file is not a JPEG or PNG image."}]
    assert _counts(app)["images"] == 4

    case = client.get(f"/api/v1/cases/{progress['case_ids'][0]}", headers=auth_headers).json
    assert (
        case["reference_dx"],
        case["reference_dx_type"],
        case["age"],
        case["sex"],
        case["site"],
        case["lesion_ref"],
    ) == ("mel", "histo", 40, "male", "back", "HAM_0000000")


def test_zip_with_csv_inside(app, client, auth_headers, sent_tasks):
    entries = {f"ham/{n}": data for n, data in fixture_images().items()}
    entries["ham/metadata.csv"] = HAM_CSV.encode()
    entries["__MACOSX/ham/._x.jpg"] = b"junk"
    entries["ham/readme.txt"] = b"hello"
    response = client.post(
        "/api/v1/batches", headers=auth_headers, data={"archive": (io.BytesIO(zip_bytes(entries)), "ham.zip")}
    )
    assert response.status_code == 202, response.json
    assert response.json["pending"] == 4 and response.json["stored"] == 0  # decoded by the worker
    assert run_sent_ingests(app, sent_tasks) == ["done"]
    progress = client.get(response.json["url"], headers=auth_headers).json
    assert len(progress["case_ids"]) == 4 and progress["errors"][0]["file"] == "ham/readme.txt"
    listed = client.get("/api/v1/cases?reference=nv", headers=auth_headers).json
    assert [c["filename"] for c in listed["cases"]] == [SMALL_IMAGES[1]]


BOMB = b"\0" * (3 * 1024 * 1024)
HOSTILE_ZIPS = [
    ("traversal", {"../evil.jpg": b"x"}, {}, "leaves the archive"),
    ("backslash traversal", {"a\\..\\..\\evil.jpg": b"x"}, {}, "leaves the archive"),
    ("absolute", {"/etc/evil.jpg": b"x"}, {}, "absolute"),
    ("drive letter", {"C:/evil.jpg": b"x"}, {}, "absolute"),
    ("symlink", {"link.jpg": b"/etc/passwd"}, {"symlinks": ["link.jpg"]}, "symbolic link"),
    ("nested zip", {"inner.zip": b"PK\x03\x04"}, {}, "nested"),
    ("bomb ratio", {"bomb.jpg": BOMB}, {}, "zip bomb"),
]


@pytest.mark.parametrize("label, entries, options, message", HOSTILE_ZIPS, ids=[h[0] for h in HOSTILE_ZIPS])
def test_hostile_zip_is_refused_and_nothing_stored(app, client, auth_headers, label, entries, options, message):
    response = client.post(
        "/api/v1/batches", headers=auth_headers, data={"archive": (io.BytesIO(zip_bytes(entries, **options)), "x.zip")}
    )
    assert response.status_code in (400, 413), response.json
    assert message in response.json["error"]
    assert _counts(app) == {"batches": 0, "batch_items": 0, "cases": 0, "images": 0}


def test_zip_limits_and_garbage(app, client, auth_headers):
    app.config["BATCH_MAX_ZIP_ENTRIES"] = 3
    many = zip_bytes({f"{i}.jpg": b"x" for i in range(4)})
    response = client.post("/api/v1/batches", headers=auth_headers, data={"archive": (io.BytesIO(many), "m.zip")})
    assert response.status_code == 413 and "entries" in response.json["error"]
    garbage = client.post(
        "/api/v1/batches", headers=auth_headers, data={"archive": (io.BytesIO(b"PK nonsense"), "g.zip")}
    )
    assert garbage.status_code == 400 and "not a readable zip" in garbage.json["error"]


BAD_CSVS = [
    ("missing column", "image_id,dx\nISIC_1,mel\n", "lacks the column"),
    ("formula", CSV_HEADER + 'ISIC_1,=HYPERLINK("x"),mel,histo,40,male,back\n', "formula"),
    ("at sign", CSV_HEADER + "ISIC_1,@SUM(A1),mel,histo,40,male,back\n", "formula"),
    ("tab", CSV_HEADER + "ISIC_1,\tx,mel,histo,40,male,back\n", "formula"),
    ("too long", CSV_HEADER + "ISIC_1," + "L" * 65 + ",mel,histo,40,male,back\n", "longer than 64"),
    ("unknown sex", CSV_HEADER + "ISIC_1,HAM_1,mel,histo,40,robot,back\n", "sex 'robot'"),
    ("unknown site", CSV_HEADER + "ISIC_1,HAM_1,mel,histo,40,male,elbow\n", "localization 'elbow'"),
    ("unknown dx", CSV_HEADER + "ISIC_1,HAM_1,xyz,histo,40,male,back\n", "dx 'xyz'"),
    ("bad age", CSV_HEADER + "ISIC_1,HAM_1,mel,histo,200,male,back\n", "age"),
    ("no rows", CSV_HEADER, "no data rows"),
]


@pytest.mark.parametrize("label, text, message", BAD_CSVS, ids=[b[0] for b in BAD_CSVS])
def test_bad_metadata_csv_is_a_clear_400(app, client, auth_headers, label, text, message):
    response = client.post(
        "/api/v1/batches",
        headers=auth_headers,
        data={
            "images": [(io.BytesIO(image_bytes()), SMALL_IMAGES[0])],
            "metadata": (io.BytesIO(text.encode()), "m.csv"),
        },
    )
    assert response.status_code == 400, response.json
    # A bad row's reason is in `rows` (listed once: the message only counts them).
    reasons = response.json["error"] + " ".join(r["error"] for r in response.json.get("rows", []))
    assert message in reasons, response.json
    assert _counts(app)["cases"] == 0 and _counts(app)["batches"] == 0


def test_non_utf8_csv(app, client, auth_headers):
    text = (CSV_HEADER + "ISIC_1,HAM_1,mel,histo,40,male,back\n").encode("utf-16")
    response = client.post("/api/v1/batches", headers=auth_headers, data={"metadata": (io.BytesIO(text), "m.csv")})
    assert response.status_code == 400 and "not UTF-8" in response.json["error"]


def test_row_errors_are_listed_per_row(app, client, auth_headers):
    text = (
        CSV_HEADER
        + "ISIC_1,HAM_1,mel,histo,40,male,back\nISIC_2,HAM_2,mel,histo,40,martian,back\nISIC_3,HAM_3,mel,histo,40,male,moon\n"
    )
    response = client.post(
        "/api/v1/batches", headers=auth_headers, data={"metadata": (io.BytesIO(text.encode()), "m.csv")}
    )
    assert response.status_code == 400
    assert [(r["row"], r["image_id"]) for r in response.json["rows"]] == [(3, "ISIC_2"), (4, "ISIC_3")]


def test_roles_and_unknown_batch(app, client, auth_headers):
    from portal_helpers import make_token, make_user

    make_user(app, "rev@example.org", role="reviewer")
    reviewer = {"Authorization": f"Bearer {make_token(app, 'rev@example.org')}"}
    assert client.post("/api/v1/batches", headers=reviewer, data={}).status_code == 403
    assert client.get("/api/v1/batches/99", headers=auth_headers).status_code == 404
    assert client.post("/api/v1/batches/99/files", headers=auth_headers, data={}).status_code == 404
    assert (
        client.post("/api/v1/batches", headers=auth_headers, data={}).status_code == 201
    )  # empty batch, chunks follow


def test_browser_flow_uses_csrf_header_and_chunks(app, logged_in, sent_tasks):
    client = logged_in
    page = client.get("/batches/new").get_data(as_text=True)
    assert "webkitdirectory" in page
    token = csrf_from(page)
    headers = {"X-CSRF-Token": token, "Accept": "application/json"}
    assert (
        client.post("/batches", data={"expected_files": "2"}, headers={"Accept": "application/json"}).status_code == 400
    )
    created = client.post(
        "/batches",
        headers=headers,
        data={"expected_files": "2", "metadata": (io.BytesIO(HAM_CSV.encode()), "meta.csv")},
    )
    assert created.status_code == 201, created.json
    chunk = client.post(
        created.json["files_url"],
        headers=headers,
        data={"images": [(io.BytesIO(image_bytes(n)), f"dir/{n}") for n in SMALL_IMAGES[:2]]},
    )
    assert chunk.status_code == 200 and chunk.json["stored"] == 2
    progress = client.get(f"/batches/{created.json['id']}/progress.json").json
    assert progress["total"] == 2 and progress["expected"] == 2 and not progress["finished"]
    html = client.get(created.json["url"]).get_data(as_text=True)
    assert 'id="batch-progress"' in html and f"/cases?batch={created.json['id']}" in html


def test_cli_batch_import(app, tmp_path, sent_tasks):
    from portal_helpers import make_user

    make_user(app, "boss@example.org", role="admin")
    folder = tmp_path / "ham"
    (folder / "sub").mkdir(parents=True)
    for name, data in fixture_images().items():
        (folder / "sub" / name).write_bytes(data)
    (folder / "meta.csv").write_text(HAM_CSV)
    result = app.test_cli_runner().invoke(args=["batch", "import", str(folder), "--metadata", str(folder / "meta.csv")])
    assert result.exit_code == 0, result.output
    assert '"total": 4' in result.output and _counts(app)["cases"] == 4
    bad = folder / "bad.csv"
    bad.write_text(CSV_HEADER + "x,y,mel,histo,40,robot,back\n")
    result = app.test_cli_runner().invoke(args=["batch", "import", str(folder), "--metadata", str(bad)])
    assert result.exit_code != 0 and "robot" in result.output


def _distinct_pngs(n: int, seed: int) -> list[bytes]:
    import numpy as np
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def test_each_further_file_of_a_chunk_costs_a_fixed_few_statements(app, client, auth_headers, sent_tasks):
    """A chunk's rows are written once and not read back: no reload of the batch, the user or the
    items after each file's commit (what made uploads a third slower before)."""
    from sqlalchemy import event

    from webapp.db import db

    batch = client.post("/api/v1/batches", headers=auth_headers, data={}).json
    statements: list[str] = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    def post_chunk(images: list[bytes]) -> int:
        statements.clear()
        response = client.post(
            batch["files_url"],
            headers=auth_headers,
            data={"images": [(io.BytesIO(data), f"lesion-{i}.png") for i, data in enumerate(images)]},
        )
        assert response.status_code == 202 and response.json["stored"] == len(images), response.json
        return len(statements)

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        small, large = post_chunk(_distinct_pngs(2, seed=1)), post_chunk(_distinct_pngs(10, seed=2))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    per_file = (large - small) / 8
    # The duplicate check, the case, image, job and item inserts, and SQLite's BEGIN/COMMIT bookkeeping.
    assert per_file <= 6, f"{per_file} statements per further file"
    assert [len(args) for _, args, _ in sent_tasks] == [2, 10]  # one message per chunk of at most 16 jobs


def test_a_chunk_looks_for_duplicates_with_one_query_per_hash_whatever_its_size(app, client, auth_headers, sent_tasks):
    """The probe: two SELECTs per file (its bytes' hash, then its pixels'), 17 % of a chunk's time."""
    from sqlalchemy import event

    from webapp.db import db

    batch = client.post("/api/v1/batches", headers=auth_headers, data={}).json
    lookups: list[str] = []

    def record(conn, cursor, statement, *args):
        found = re.search(r"FROM images\s+WHERE images\.(source_hash|content_hash) IN", statement)
        if found:
            lookups.append(found[1])

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        for n, seed in ((2, 3), (12, 4)):
            lookups.clear()
            files = [(io.BytesIO(data), f"lesion-{seed}-{i}.png") for i, data in enumerate(_distinct_pngs(n, seed))]
            response = client.post(batch["files_url"], headers=auth_headers, data={"images": files})
            assert response.status_code == 202 and response.json["stored"] == n, response.json
            assert lookups == ["source_hash", "content_hash"], (n, lookups)
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_a_batch_and_a_chunk_of_exactly_one_file_are_stored(app, client, auth_headers, sent_tasks):
    images = fixture_images()
    one, other = SMALL_IMAGES[:2]
    response = client.post("/api/v1/batches", headers=auth_headers, data={"images": (io.BytesIO(images[one]), one)})
    assert response.status_code == 202, response.json
    assert response.json["stored"] == 1 and not response.json["errors"]
    chunk = client.post(
        f"{response.json['url']}/files", headers=auth_headers, data={"images": (io.BytesIO(images[other]), other)}
    )
    assert chunk.status_code == 202 and chunk.json["stored"] == 1, chunk.json
    assert _counts(app)["cases"] == 2
