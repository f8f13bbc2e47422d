"""Helpers for the research-portal tests: rows inserted directly (no image decoding), zips, CSVs."""

from __future__ import annotations

import hashlib
import io
import zipfile
from datetime import UTC, datetime

from portal_helpers import IMAGES, SMALL_IMAGES

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
CSV_HEADER = "image_id,lesion_id,dx,dx_type,age,sex,localization\n"
HAM_CSV = CSV_HEADER + "".join(
    f"{name[:-4]},HAM_{i:07d},{dx},histo,{40 + i},{sex},{site}\n"
    for i, (name, dx, sex, site) in enumerate(
        zip(
            SMALL_IMAGES,
            ["mel", "nv", "bcc", "bkl"],
            ["male", "female", "male", "female"],
            ["back", "face", "chest", "trunk"],
        )
    )
)


def model_version(app, name="efficientnetb3-cbam", version="untrained", trained=False) -> int:
    from webapp.db import db
    from webapp.models import ModelVersion

    with app.app_context():
        mv = ModelVersion(
            name=name,
            version=version,
            trained=trained,
            trained_on="HAM10000 test" if trained else None,
            class_names=CLASSES,
            manifest={"class_long_names": {}, "malignant_classes": ["akiec", "bcc", "mel"], "input_size": [64, 64]},
        )
        db.session.add(mv)
        db.session.commit()
        return mv.id


def seed_case(app, *, top=None, mv_id=None, probability=0.6, created=None, job_status="succeeded", **fields) -> int:
    """A case with one image, one job and (with `top`) one succeeded analysis by `mv_id`."""
    from webapp.db import db
    from webapp.models import Analysis, Case, Image, Job

    with app.app_context():
        case = Case(created_at=created or datetime.now(UTC), **fields)
        digest = hashlib.sha256(
            repr((fields, created, top, id(case))).encode() + str(datetime.now().timestamp()).encode()
        ).hexdigest()
        image = Image(
            case=case,
            content_hash=digest,
            storage_key=f"images/{digest[:2]}/{digest[2:4]}/{digest}.png",
            width=10,
            height=10,
            original_filename=f"{fields.get('lesion_ref') or 'img'}.jpg",
        )
        db.session.add_all([case, image])
        db.session.flush()
        analysis = None
        if top is not None:
            rest = (1 - probability) / (len(CLASSES) - 1)
            analysis = Analysis(
                image_id=image.id,
                model_version_id=mv_id,
                status="succeeded",
                top_class=top,
                probabilities={c: probability if c == top else rest for c in CLASSES},
            )
            db.session.add(analysis)
            db.session.flush()
        db.session.add(
            Job(
                kind="analyse",
                status=job_status,
                image_id=image.id,
                model_version_id=mv_id,
                analysis_id=analysis.id if analysis else None,
            )
        )
        db.session.commit()
        return case.id


def zip_bytes(entries: dict[str, bytes], *, symlinks=(), compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            if name in symlinks:
                info.create_system = 3
                info.external_attr = 0o120777 << 16
            zf.writestr(info, data)
    return buffer.getvalue()


def fixture_images() -> dict[str, bytes]:
    return {name: (IMAGES / name).read_bytes() for name in SMALL_IMAGES}


def run_sent_ingests(app, sent_tasks) -> list[str]:
    """Runs, as the worker would, each ingest task the web app sent (decoding a zip's entries)."""
    from webapp.queue import INGEST_TASK
    from worker.ingest import run_archive

    results = []
    with app.app_context():
        for name, args, _queue in sent_tasks:
            if name == INGEST_TASK:
                results.append(run_archive(*args))
    return results
