"""docs/configuration.md is generated from the settings class and must agree with it."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gen_config_docs.py"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_configuration_page_matches_the_settings_class(gen):
    message = gen.check(ROOT / "docs" / "configuration.md")
    assert message is None, message


def test_every_setting_has_a_row_with_a_meaning(gen):
    from webapp.config import Settings

    rows = gen.setting_rows()
    assert [row.name for row in rows] == [f.name for f in dataclasses.fields(Settings) if f.name.isupper()]
    assert gen.undocumented(rows) == [], "add a comment next to these fields in the settings class"
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for row in rows:
        assert f"| `{row.name}` |" in page


def test_defaults_are_shown_as_the_environment_writes_them(gen):
    rows = {row.name: row for row in gen.setting_rows()}
    assert rows["UNTRAINED_INPUT_SIZE"].default == "`120,160`"
    assert rows["MODEL_DIR"].default == "`<repo>/models/default`"  # no machine-specific absolute path
    assert rows["SECRET_KEY"].default == "unset"
    assert rows["REDIS_URL"].from_environment and not rows["CSRF_ENABLED"].from_environment


def test_a_stale_page_is_reported_with_what_to_run(gen, tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(gen.expected_text().replace("`40000000`", "`1`"), encoding="utf-8")
    message = gen.check(stale)
    assert message and "python scripts/gen_config_docs.py" in message and "MAX_IMAGE_PIXELS" in message
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(stale)], capture_output=True, text=True
    )
    assert result.returncode == 1 and "differs from the settings class" in result.stderr
