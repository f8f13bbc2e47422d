import pytest
from sqlalchemy.exc import IntegrityError

from webapp.db import db
from webapp.models import Analysis, ApiToken, Case, Image, Job, ModelVersion, User, hash_token

MANIFEST = {
    "name": "efficientnetb3-cbam",
    "version": "untrained",
    "trained": False,
    "trained_on": None,
    "class_names": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
    "class_long_names": {"mel": "melanoma"},
    "malignant_classes": ["akiec", "bcc", "mel"],
    "input_size": [64, 64],
}


def add_image(h="a" * 64):
    case = Case(age=50, sex="female", site="back")
    image = Image(case=case, content_hash=h, storage_key=f"images/{h}.png", width=10, height=10)
    db.session.add_all([case, image])
    db.session.commit()
    return image


def model_version(version="untrained"):
    mv = ModelVersion(
        name="efficientnetb3-cbam",
        version=version,
        trained=False,
        trained_on=None,
        class_names=MANIFEST["class_names"],
        manifest=MANIFEST,
    )
    db.session.add(mv)
    db.session.commit()
    return mv


def test_rows_round_trip_with_utc_times(app):
    with app.app_context():
        image = add_image()
        mv = model_version()
        analysis = Analysis(
            image=image,
            model_version=mv,
            status="succeeded",
            probabilities={c: 1 / 7 for c in MANIFEST["class_names"]},
            top_class="mel",
        )
        job = Job(image=image, analysis=analysis, model_version=mv, status="succeeded")
        db.session.add_all([analysis, job])
        db.session.commit()
        db.session.expire_all()
        job = db.session.get(Job, job.id)
        assert job.created_at.tzinfo is not None and job.created_at.utcoffset().total_seconds() == 0
        assert job.analysis.malignant_probability == pytest.approx(3 / 7)
        assert mv.class_long_names["mel"] == "melanoma" and mv.class_long_names["bcc"] == "bcc"
        assert image.case.images == [image]


@pytest.mark.parametrize(
    "make",
    [
        lambda: (add_image("b" * 64), add_image("b" * 64)),
        lambda: (model_version("v1"), model_version("v1")),
    ],
    ids=["image-content-hash", "model-name-version"],
)
def test_unique_constraints(app, make):
    with app.app_context(), pytest.raises(IntegrityError, match="UNIQUE|unique constraint"):
        make()


def test_one_analysis_per_image_and_model_version(app):
    with app.app_context():
        image, mv = add_image(), model_version()
        db.session.add(Analysis(image=image, model_version=mv))
        db.session.commit()
        db.session.add(Analysis(image=image, model_version=mv))
        with pytest.raises(IntegrityError, match="UNIQUE|unique constraint"):
            db.session.commit()


@pytest.mark.parametrize(
    "row",
    [
        lambda: Case(age=121),
        lambda: Case(age=-1),
        lambda: Case(sex="x"),
        lambda: Case(site="moon"),
        lambda: User(email="a@b", password_hash="x", role="superuser"),
        lambda: Job(image_id=1, status="lost"),
    ],
    ids=["age-high", "age-low", "sex", "site", "role", "job-status"],
)
def test_check_constraints(app, row):
    with app.app_context():
        add_image()
        db.session.add(row())
        with pytest.raises(IntegrityError, match="CHECK|check constraint"):
            db.session.commit()


def test_foreign_keys_are_enforced(app):
    with app.app_context():
        db.session.add(Image(case_id=999, content_hash="c" * 64, storage_key="k", width=1, height=1))
        with pytest.raises(IntegrityError, match="FOREIGN KEY|foreign key constraint"):
            db.session.commit()


def test_passwords_and_tokens_are_stored_hashed(app):
    with app.app_context():
        user = User(email="x@example.org", role="admin")
        user.set_password("s3cret-password")
        row, plain = ApiToken.issue(user, "test")
        db.session.add_all([user, row])
        db.session.commit()
        assert "s3cret-password" not in user.password_hash and user.check_password("s3cret-password")
        assert not user.check_password("wrong")
        assert plain.startswith("dp_") and row.token_hash == hash_token(plain) and plain not in row.token_hash


def test_naive_datetimes_are_refused(app):
    from datetime import datetime

    with app.app_context():
        image = add_image()
        db.session.add(Job(image=image, created_at=datetime.now()))
        with pytest.raises(Exception, match="timezone-aware"):
            db.session.commit()


def test_naming_convention_names_constraints():
    names = {c.name for t in db.metadata.tables.values() for c in t.constraints}
    assert {
        "pk_users",
        "uq_users_email",
        "ck_cases_age_range",
        "uq_analyses_image_id_model_version_id",
        "fk_images_case_id_cases",
        "uq_model_versions_name_version",
    } <= names
