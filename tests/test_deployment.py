"""The deployment files: the web image's requirements carry no TensorFlow, and docker-compose.yml
has what production needs. `docker compose config` validates the file where a compose CLI exists."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_web_requirements_are_light_and_pinned():
    lines = [
        line for line in (ROOT / "requirements-web.lock").read_text().splitlines() if line and not line.startswith("#")
    ]
    names = {line.split("==")[0].lower() for line in lines}
    assert all("==" in line for line in lines)
    assert {"flask", "gunicorn", "celery", "psycopg2-binary", "pillow", "spectree", "pydantic"} <= names
    assert {"flask-login", "flask-wtf", "flask-limiter"} <= names  # the web process imports them
    assert not names & {"tensorflow", "tensorflow-cpu", "keras", "shap", "opencv-python-headless", "numpy"}
    web_dockerfile = (ROOT / "Dockerfile.web").read_text()
    assert "requirements-web.lock" in web_dockerfile and "COPY ml" not in web_dockerfile


def test_compose_file_has_the_production_pieces():
    text = (ROOT / "docker-compose.yml").read_text()
    for needle in [
        "driver: nvidia",
        "capabilities: [gpu]",
        'profiles: ["gpu"]',
        'profiles: ["cpu"]',
        "--appendonly",
        "FLOWER_BASIC_AUTH",
        "condition: service_healthy",
        "condition: service_completed_successfully",
        "restart: unless-stopped",
        "postgres:16",
        "-Q predict",
        "-Q explain",
        "healthcheck:",
        "storage:/data/storage",
        "Dockerfile.web",
    ]:
        assert needle in text, needle
    example = (ROOT / ".env.example").read_text()
    for name in ["SECRET_KEY=", "POSTGRES_PASSWORD=", "FLOWER_PASSWORD=", "COMPOSE_PROFILES=", "SWEEP_INTERVAL="]:
        assert name in example, name


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_validates(tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no `docker compose` plugin or docker-compose binary here; the file is checked as text above")
    env = tmp_path / "test.env"
    env.write_text("SECRET_KEY=x\nPOSTGRES_PASSWORD=y\nFLOWER_PASSWORD=z\n")
    for profile in ("cpu", "gpu"):
        result = subprocess.run(
            [*cli, "--env-file", str(env), "--profile", profile, "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
    (tmp_path / "none.env").touch()
    missing = subprocess.run(
        [*cli, "--env-file", str(tmp_path / "none.env"), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and "SECRET_KEY" in (missing.stderr + missing.stdout)
