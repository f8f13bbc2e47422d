"""Folder-upload chunk benchmark: the web side of a folder upload, without a server or a worker.

Posts chunks of HAM10000 JPEGs (`POST /api/v1/batches/<id>/files`, 48 files each, distinct files in
every chunk) through the Flask test client, into a temporary SQLite file (or `--database-url`) and
storage folder, with the Celery messages recorded instead of published, and prints the median CPU
and wall time of one chunk request (JSON on the last line). A first chunk warms up and is not
counted. Upload checks, duplicate look-ups, storing the files and the chunk's one transaction are
what it measures; compare runs at similar load.

    .venv/bin/python scripts/bench_upload_chunk.py [--chunk 48] [--rounds 8]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGES = Path(os.environ.get("BENCH_IMAGES", ROOT.parent / "shared" / "data" / "ham10000-200x150" / "images"))


def make_app(tmp: str, database_url: str | None):
    from webapp import create_app
    from webapp.db import db
    from webapp.models import ApiToken, User

    app = create_app(
        {
            "TESTING": True,
            "INSTANCE_DIR": tmp,
            "DATABASE_URL": database_url or f"sqlite:///{tmp}/bench.db",
            "STORAGE_DIR": f"{tmp}/storage",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "UPLOAD_RATE_LIMIT": "1000000 per minute",
        }
    )
    with app.app_context():
        db.create_all()
        user = User(email="res@bench", role="researcher", active=True)
        user.set_password("benchmark-password")
        row, token = ApiToken.issue(user)
        db.session.add_all([user, row])
        db.session.commit()
        db.session.remove()
    return app, {"Authorization": f"Bearer {token}"}


def time_chunks(client, headers, files: list[Path], chunk: int) -> list[tuple[float, float]]:
    """(CPU s, wall s) of each chunk request after the first."""
    files_url = client.post("/api/v1/batches", headers=headers, data={}).json["files_url"]
    timings = []
    for start in range(0, len(files), chunk):
        part = [(io.BytesIO(path.read_bytes()), path.name) for path in files[start : start + chunk]]
        cpu, wall = time.process_time(), time.perf_counter()
        response = client.post(files_url, headers=headers, data={"images": part})
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if response.status_code != 202 or response.json["stored"] != len(part):
            raise SystemExit(f"chunk at file {start}: {response.status_code} {response.json}")
        timings.append((cpu, wall))
    return timings[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=48, help="files per request")
    parser.add_argument("--rounds", type=int, default=8, help="timed chunks (after one warm-up chunk)")
    parser.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    args = parser.parse_args()
    files = sorted(IMAGES.glob("*.jpg"))[: args.chunk * (args.rounds + 1)]
    if len(files) < args.chunk * (args.rounds + 1):
        raise SystemExit(f"{IMAGES} has {len(files)} JPEGs; {args.chunk * (args.rounds + 1)} needed (BENCH_IMAGES=...)")
    import webapp.queue

    webapp.queue.send = lambda name, *task_args, queue: "recorded"  # no broker: messages are not the point
    with tempfile.TemporaryDirectory() as tmp:
        app, headers = make_app(tmp, args.database_url)
        timings = time_chunks(app.test_client(), headers, files, args.chunk)
    cpu = statistics.median(t[0] for t in timings)
    wall = statistics.median(t[1] for t in timings)
    print(
        f"{args.chunk}-file chunk: median {cpu * 1000:.0f} ms CPU, {wall * 1000:.0f} ms wall over {len(timings)} chunks"
    )
    summary = {
        "chunk": args.chunk,
        "chunks": len(timings),
        "cpu_ms": round(cpu * 1000, 1),
        "wall_ms": round(wall * 1000, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
