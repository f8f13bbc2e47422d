"""Similar-case search at scale: p50/p95 of one analysis's similar cases with 100,000 stored embeddings.

    python scripts/bench_similar.py [--cases 100000] [--queries 200] [--dims 128] [--out bench-out/similar.json]

Seeds a SQLite database (cases, images, succeeded analyses with clustered float16 embeddings of the
size ml.retrieval stores, a tenth of the cases reviewed twice), then times
`webapp.similar.service.similar_cases` end to end (catch-up query, faiss search, the database
look-ups of the neighbours and their labels) for random analyses, and the recall@10 of the index
against an exact scan. Target: p95 <= 50 ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def clustered(n: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around 50 centres: embeddings of similar images lie close, as real ones do."""
    centres = rng.normal(size=(50, dims))
    x = centres[rng.integers(0, 50, n)] + 0.6 * rng.normal(size=(n, dims))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def seed(app, n: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    from sqlalchemy import insert

    from webapp.db import db
    from webapp.models import Analysis, Case, Image, ModelVersion, Review, User

    vectors = clustered(n, dims, rng)
    now = datetime.now(UTC)
    with app.app_context():
        db.create_all()
        mv = ModelVersion(
            name="bench", version="1", trained=True, class_names=CLASSES, manifest={"ood": {"threshold": 0.5}}
        )
        reviewers = [User(email=f"r{i}@bench", role="reviewer", password_hash="x") for i in range(2)]
        db.session.add_all([mv, *reviewers])
        db.session.flush()
        for start in range(0, n, 10_000):
            ids = range(start + 1, min(n, start + 10_000) + 1)
            db.session.execute(
                insert(Case),
                [{"id": i, "created_at": now, "reference_dx": CLASSES[i % 7] if i % 3 else None} for i in ids],
            )
            db.session.execute(
                insert(Image),
                [
                    {
                        "id": i,
                        "case_id": i,
                        "content_hash": f"{i:064d}",
                        "storage_key": f"k/{i}.png",
                        "width": 1,
                        "height": 1,
                    }
                    for i in ids
                ],
            )
            db.session.execute(
                insert(Analysis),
                [
                    {
                        "id": i, "image_id": i, "model_version_id": mv.id, "status": "succeeded", "top_class": "nv",
                        "probabilities": {"nv": 1.0}, "embedding": vectors[i - 1].astype("<f2").tobytes(),
                        "ood_score": 0.1, "ood_flagged": False, "created_at": now,
                        "finished_at": now - timedelta(seconds=10 * (n - i)),  # one every 10 s, as analysed
                    }
                    for i in ids
                ],
            )  # fmt: skip
            reviewed = [i for i in ids if i % 10 == 0]
            db.session.execute(
                insert(Review),
                [
                    {"case_id": i, "reviewer_id": r.id, "diagnosis": "mel", "confidence": 3}
                    for i in reviewed
                    for r in reviewers
                ],
            )
        db.session.commit()
    return vectors.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench-out/similar.json"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(42)
    with tempfile.TemporaryDirectory() as tmp:
        from webapp import create_app
        from webapp.db import db
        from webapp.models import Analysis, User
        from webapp.similar import index as vector_index
        from webapp.similar import service

        app = create_app(
            {
                "TESTING": True,
                "INSTANCE_DIR": tmp,
                "DATABASE_URL": f"sqlite:///{tmp}/bench.db",
                "STORAGE_DIR": f"{tmp}/storage",
                "REDIS_URL": "redis://127.0.0.1:1/0",
            }
        )
        t0 = time.perf_counter()
        vectors = seed(app, args.cases, args.dims, rng)
        seeded_s = time.perf_counter() - t0
        queries = rng.choice(np.arange(1, args.cases + 1), args.queries, replace=False)
        times, recalls = [], []
        with app.test_request_context():
            viewer = db.session.get(User, 1)
            t0 = time.perf_counter()
            built = vector_index.current(1, service.index_folder())
            build_s = time.perf_counter() - t0
            for analysis_id in queries:
                analysis = db.session.get(Analysis, int(analysis_id))
                t0 = time.perf_counter()
                listed = service.similar_cases(analysis, viewer)
                times.append(time.perf_counter() - t0)
                exact = np.argsort(-(vectors @ vectors[analysis_id - 1]))[:11] + 1
                exact = [int(i) for i in exact if i != analysis_id][:10]
                recalls.append(len({s["case_id"] for s in listed} & set(exact)) / 10)
                db.session.expire_all()
        report = {
            "cases": args.cases,
            "dims": args.dims,
            "index": type(built.index).__name__,
            "seed_s": round(seeded_s, 1),
            "first_search_builds_index_s": round(build_s, 2),
            "search_ms_p50": round(float(np.percentile(times, 50)) * 1000, 2),
            "search_ms_p95": round(float(np.percentile(times, 95)) * 1000, 2),
            "recall_at_10_vs_exact": round(float(np.mean(recalls)), 3),
            "target_p95_ms": 50,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
