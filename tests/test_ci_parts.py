"""CI cannot go green without its parts: with CI=true a missing PostgreSQL or Chromium fails the
test that needs it instead of skipping it; elsewhere it is skipped with the reason."""

from __future__ import annotations

from pathlib import Path

import pg_support
import pytest
from portal_helpers import missing_part

E2E = Path(__file__).parent / "e2e"


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_a_missing_part_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL is gone.*CI=true"):
        missing_part("PostgreSQL is gone")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_a_missing_part_is_skipped_with_its_reason_elsewhere(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL is gone"):
        missing_part("PostgreSQL is gone")


def test_without_postgresql_the_database_tests_fail_under_ci(monkeypatch):
    monkeypatch.setattr(pg_support, "find_bindir", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL is not installed"):
        pg_support.require_bindir()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL is not installed"):
        pg_support.require_bindir()


def test_without_chromium_the_browser_tests_fail_under_ci(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(E2E))
    import test_browser

    monkeypatch.setattr(test_browser, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setattr(test_browser.subprocess, "run", lambda *a, **k: None)  # the installer cannot install it
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="chromium is missing"):
        test_browser._chromium()
