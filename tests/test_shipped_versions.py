"""Every shipped model version (models/default and models/archive/*) is registered when the portal
starts, so that cases can be re-run with an earlier version and compared side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sqlalchemy import select

from webapp.bootstrap import register_shipped_models
from webapp.db import db
from webapp.models import ModelVersion

ROOT = Path(__file__).resolve().parents[1]


def _artifact(folder: Path, version: str) -> None:
    folder.mkdir(parents=True)
    manifest = {
        "name": "efficientnetb3-cbam",
        "version": version,
        "trained": True,
        "trained_on": "HAM10000",
        "class_names": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_served_and_archived_versions_are_registered_once_with_their_folders(app, tmp_path):
    models = tmp_path / "models"
    _artifact(models / "default", "2")
    _artifact(models / "archive" / "efficientnetb3-cbam-1", "1")
    (models / "archive" / "broken").mkdir()
    (models / "archive" / "broken" / "manifest.json").write_text("{not json")
    assert register_shipped_models(app, models) == ["efficientnetb3-cbam 2", "efficientnetb3-cbam 1"]
    assert register_shipped_models(app, models) == ["efficientnetb3-cbam 2", "efficientnetb3-cbam 1"]
    with app.app_context():
        rows = {mv.version: mv for mv in db.session.scalars(select(ModelVersion))}
    assert set(rows) == {"1", "2"}
    assert rows["1"].artifact_path == str((models / "archive" / "efficientnetb3-cbam-1").resolve())
    assert rows["2"].trained and rows["2"].class_names[4] == "mel"


def test_the_repository_ships_the_default_and_the_earlier_version(app, tmp_path):
    models = tmp_path / "models"
    for folder in [ROOT / "models" / "default", *sorted((ROOT / "models" / "archive").iterdir())]:
        target = models / folder.relative_to(ROOT / "models")
        target.mkdir(parents=True)
        shutil.copyfile(folder / "manifest.json", target / "manifest.json")
    found = register_shipped_models(app, models)
    default = json.loads((ROOT / "models" / "default" / "manifest.json").read_text())
    assert found[0] == f"{default['name']} {default['version']}" and len(found) >= 2
    assert len(set(found)) == len(found)  # every shipped version has its own version string
