"""Constants and helpers shared by the portal tests (imported by conftest and test modules)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = FIXTURES / "images"
SMALL_IMAGES = ["ISIC_0025964.jpg", "ISIC_0024698.jpg", "ISIC_0028155.jpg", "ISIC_0027419.jpg"]
FULLRES_IMAGE = "ISIC_0024318.jpg"  # 600x450, as a dermatoscope exports it
PASSWORD = "correct horse battery"
ENV_VARS = (
    "PORTAL_ENV",
    "SECRET_KEY",
    "DATABASE_URL",
    "REDIS_URL",
    "STORAGE_DIR",
    "MODEL_DIR",
    "INSTANCE_DIR",
    "MAX_UPLOAD_MB",
    "MAX_IMAGE_PIXELS",
    "UNTRAINED_INPUT_SIZE",
    "TASK_SOFT_TIME_LIMIT",
    "TASK_TIME_LIMIT",
    "SHAP_TOP_K",
    "SHAP_MAX_EVALS",
    "SHAP_BATCH_SIZE",
    "GRADCAM_PLUS_PLUS",
    "SWEEP_INTERVAL",
    "SWEEP_QUEUED_AFTER",
    "SWEEP_RUNNING_MARGIN",
    "TASK_MAX_ATTEMPTS",
    "PREDICT_BATCH_SIZE",
    "PREDICT_WARMUP",
    "LOGIN_RATE_LIMIT",
    "LOGIN_ADDRESS_RATE_LIMIT",
    "SESSION_HOURS",
    "HEALTH_CACHE_SECONDS",
    "EXPLAIN_RATE_LIMIT",
    "UPLOAD_RATE_LIMIT",
    "BLIND_REVIEW",
    "STORAGE_BACKEND",
    "S3_BUCKET",
    "S3_ENDPOINT_URL",
    "S3_REGION",
    "S3_PREFIX",
)


def image_bytes(name: str = SMALL_IMAGES[0]) -> bytes:
    return (IMAGES / name).read_bytes()


def make_user(app, email="researcher@example.org", role="researcher", password=PASSWORD, active=True) -> int:
    from webapp.db import db
    from webapp.models import User

    with app.app_context():
        user = User(email=email, role=role, active=active)
        user.set_password(password)
        db.session.add(user)
        db.session.commit()
        return user.id


def make_token(app, email) -> str:
    from webapp.db import db
    from webapp.models import ApiToken, User

    with app.app_context():
        user = db.session.scalar(db.select(User).where(User.email == email))
        row, plain = ApiToken.issue(user)
        db.session.add(row)
        db.session.commit()
        return plain


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def login(client, email, password=PASSWORD):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"email": email, "password": password, "csrf_token": token})


# The manifest of the stand-in predictors in the worker tests (an untrained model's shape).
FAKE_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
FAKE_MANIFEST = {
    "name": "efficientnetb3-cbam",
    "version": "untrained",
    "trained": False,
    "trained_on": None,
    "class_names": FAKE_CLASSES,
    "class_long_names": {c: c.upper() for c in FAKE_CLASSES},
    "malignant_classes": ["akiec", "bcc", "mel"],
    "input_size": [64, 64],
    "temperature": 1.0,
}


def missing_part(reason: str) -> None:
    """Skips a test whose system part (PostgreSQL, Chromium) is missing, with the reason; with CI=true
    fails it instead: a broken install step must not let CI go green on skips."""
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: a missing part fails the run instead of skipping)", pytrace=False)
    pytest.skip(reason)


def upload_all(app, client, sent_tasks) -> list[int]:
    """Uploads SMALL_IMAGES through the API as one user; the job ids of the analyse messages sent."""
    make_user(app, "u@example.org")
    headers = {"Authorization": f"Bearer {make_token(app, 'u@example.org')}"}
    for name in SMALL_IMAGES:
        response = client.post("/api/v1/cases", data={"image": (io.BytesIO(image_bytes(name)), name)}, headers=headers)
        assert response.status_code == 202, response.get_json()
    return [args[0] for task, args, _ in sent_tasks if task == "worker.tasks.analyse"]


def worker_serving(app, monkeypatch, predictor):
    """worker.tasks as a worker process runs them: in `app`, with `predictor` loaded (a fake needs no
    TensorFlow) and the per-version predictor cache empty (ids restart in every test's database)."""
    import worker.celery_app as celery_app
    import worker.predict as predict
    import worker.tasks as tasks

    monkeypatch.setattr(celery_app, "_flask_app", app)
    monkeypatch.setitem(predict._state, "predictor", predictor)
    monkeypatch.setitem(predict._state, "predictor_error", None)
    monkeypatch.setattr(predict, "_versioned_predictors", {})
    return tasks
