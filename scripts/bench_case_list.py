"""Case-list benchmark: 100,000 cases in a temporary SQLite file, timed through the Flask test client.

Seeds (bulk inserts) users, two model versions, 100,000 cases with images, jobs and analyses (20,000
with a second model version's analysis too), 20,000 batch items and 10,000 reviews, applies the real
migrations (so the real indexes), then requests the case list page and the JSON API with a mix of
filter combinations and prints JSON with `case_list_p95_ms`.

    .venv/bin/python scripts/bench_case_list.py [--cases 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
SITES = ["back", "face", "chest", "trunk", "lower extremity", "upper extremity", "abdomen", "scalp"]
QUERIES = [
    "",
    "predicted=mel",
    "reference=mel",
    "reference=nv&predicted=nv",
    "review=unreviewed",
    "review=reviewed",
    "agreement=disagree",
    "status=failed",
    "sex=female&site=back",
    "age_min=40&age_max=60",
    "date_from={d1}&date_to={d2}",
    "batch=3",
    "uploader=2",
    "model_version=2&predicted=nv",
    "sort=-age",
    "predicted=bcc&sex=male&age_min=50",
    "q=HAM_00012",
    "reference=any&review=reviewed_by_me",
    "sort=oldest",
    "agreement=matches_reference&model_version=1",
]


def seed(app, n_cases: int, rng: random.Random) -> None:
    from sqlalchemy import insert

    from webapp.db import db
    from webapp.models import Analysis, Batch, BatchItem, Case, Image, Job, ModelVersion, Review, User

    now = datetime.now(UTC)
    t0 = time.perf_counter()
    with app.app_context():
        users = []
        for email, role in [
            ("admin@bench", "admin"),
            ("res@bench", "researcher"),
            ("rev1@bench", "reviewer"),
            ("rev2@bench", "reviewer"),
            ("rev3@bench", "reviewer"),
        ]:
            user = User(email=email, role=role)
            user.set_password("benchmark-password")
            users.append(user)
        db.session.add_all(users)
        for version, trained in (("untrained", False), ("2026.11.0", True)):
            db.session.add(
                ModelVersion(
                    name="efficientnetb3-cbam",
                    version=version,
                    trained=trained,
                    class_names=CLASSES,
                    manifest={"malignant_classes": ["akiec", "bcc", "mel"], "class_long_names": {}},
                )
            )
        db.session.add_all([Batch(name=f"batch {i}", source="api", created_by_id=2) for i in range(1, 11)])
        db.session.commit()

        def chunks(rows, size=20_000):
            for start in range(0, len(rows), size):
                yield rows[start : start + size]

        cases, images, jobs, analyses, items = [], [], [], [], []
        for i in range(1, n_cases + 1):
            batch = (i % 10) + 1 if i % 5 == 0 else None
            cases.append(
                {
                    "id": i,
                    "created_at": now - timedelta(minutes=n_cases - i),
                    "uploader_id": rng.choice((1, 2)),
                    "age": rng.choice([None] + list(range(5, 90, 5))),
                    "sex": rng.choice(("male", "female", "unknown")),
                    "site": rng.choice(SITES),
                    "lesion_ref": f"HAM_{i:07d}",
                    "reference_dx": rng.choice(CLASSES) if i % 3 else None,
                    "reference_dx_type": "histo" if i % 3 else None,
                    "batch_id": batch,
                }
            )
            digest = f"{i:064x}"
            images.append(
                {
                    "id": i,
                    "case_id": i,
                    "content_hash": digest,
                    "storage_key": f"images/00/00/{digest}.png",
                    "width": 600,
                    "height": 450,
                    "original_filename": f"ISIC_{i:07d}.jpg",
                    "created_at": now,
                }
            )
            failed = i % 97 == 0
            top = rng.choice(CLASSES)
            probs = {c: 0.4 if c == top else 0.1 for c in CLASSES}
            if not failed:
                analyses.append(
                    {
                        "image_id": i,
                        "model_version_id": 1,
                        "status": "succeeded",
                        "probabilities": probs,
                        "top_class": top,
                        "timings": {"predict_ms": 40.0},
                        "created_at": now,
                        "finished_at": now,
                    }
                )
            if i % 5 == 1:
                analyses.append(
                    {
                        "image_id": i,
                        "model_version_id": 2,
                        "status": "succeeded",
                        "probabilities": probs,
                        "top_class": rng.choice(CLASSES),
                        "created_at": now,
                        "finished_at": now,
                    }
                )
            jobs.append(
                {
                    "kind": "analyse",
                    "status": "failed" if failed else "succeeded",
                    "image_id": i,
                    "model_version_id": 1,
                    "attempts": 1,
                    "created_at": now,
                }
            )
            if batch:
                items.append(
                    {
                        "batch_id": batch,
                        "filename": f"ISIC_{i:07d}.jpg",
                        "case_id": i,
                        "image_id": i,
                        "duplicate": False,
                        "created_at": now,
                    }
                )
        reviews = []
        for case_id in rng.sample(range(1, n_cases + 1), n_cases // 10):
            for reviewer in rng.sample((3, 4, 5), rng.choice((1, 1, 2))):
                reviews.append(
                    {
                        "case_id": case_id,
                        "reviewer_id": reviewer,
                        "diagnosis": rng.choice(CLASSES),
                        "agrees_with_model": rng.random() < 0.7,
                        "confidence": rng.randint(1, 5),
                        "created_at": now,
                        "updated_at": now,
                    }
                )
        for model, rows in (
            (Case, cases),
            (Image, images),
            (Analysis, analyses),
            (Job, jobs),
            (BatchItem, items),
            (Review, reviews),
        ):
            for part in chunks(rows):
                db.session.execute(insert(model), part)
        db.session.commit()
        db.session.execute(db.text("ANALYZE"))
        db.session.commit()
    print(
        f"seeded {n_cases} cases, {len(analyses)} analyses, {len(reviews)} reviews in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="keep (or reuse) the seeded SQLite file here")
    args = parser.parse_args()
    rng = random.Random(42)
    logging_quiet()
    with tempfile.TemporaryDirectory() as tmp:
        from flask_migrate import upgrade

        from webapp import create_app

        db_file = args.keep or Path(tmp) / "bench.db"
        reuse = db_file.exists()
        app = create_app(
            {
                "TESTING": True,
                "INSTANCE_DIR": tmp,
                "DATABASE_URL": f"sqlite:///{db_file}",
                "STORAGE_DIR": f"{tmp}/storage",
                "REDIS_URL": "redis://127.0.0.1:1/0",
                "CSRF_ENABLED": False,
            }
        )
        with app.app_context():
            upgrade()
        if not reuse:
            seed(app, args.cases, rng)
        client = app.test_client()
        response = client.post("/login", data={"email": "rev1@bench", "password": "benchmark-password"})
        assert response.status_code == 302, response.status_code
        from webapp.db import db
        from webapp.models import ApiToken, User

        with app.app_context():
            row, token = ApiToken.issue(db.session.scalar(db.select(User).where(User.email == "res@bench")))
            db.session.add(row)
            db.session.commit()
            db.session.remove()
        headers = {"Authorization": f"Bearer {token}"}
        today = datetime.now(UTC).date()
        queries = [
            q.format(d1=(today - timedelta(days=20)).isoformat(), d2=(today - timedelta(days=10)).isoformat())
            for q in QUERIES
        ]
        timings: dict[str, list[float]] = {}
        all_ms: list[float] = []
        for url in ("/cases?", "/api/v1/cases?"):  # warm-up
            client.get(url, headers=headers)
        for _ in range(args.rounds):
            for q in queries:
                for base in ("/cases?", "/api/v1/cases?"):
                    started = time.perf_counter()
                    response = client.get(base + q, headers=headers)
                    ms = (time.perf_counter() - started) * 1000
                    assert response.status_code == 200, (base + q, response.status_code)
                    timings.setdefault(base + q, []).append(ms)
                    all_ms.append(ms)
            # one deeper page per round: follow the cursor twice
            body = client.get("/api/v1/cases?predicted=nv", headers=headers).json
            for _ in range(2):
                started = time.perf_counter()
                body = client.get(body["next"], headers=headers).json
                all_ms.append((time.perf_counter() - started) * 1000)
        all_ms.sort()
        slowest = sorted(((statistics.median(v), k) for k, v in timings.items()), reverse=True)[:5]
        print(
            json.dumps(
                {
                    "cases": args.cases,
                    "requests": len(all_ms),
                    "case_list_p50_ms": round(statistics.median(all_ms), 1),
                    "case_list_p95_ms": round(all_ms[int(0.95 * (len(all_ms) - 1))], 1),
                    "case_list_max_ms": round(all_ms[-1], 1),
                    "slowest_median_ms": {k: round(v, 1) for v, k in slowest},
                },
                indent=1,
            )
        )


def logging_quiet() -> None:
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)


if __name__ == "__main__":
    main()
