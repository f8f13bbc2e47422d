"""The GPU worker image installs tensorflow[and-cuda] at the lock's version and not the CPU wheel.

The Dockerfile's install step is run here as the image build would run it (its RUN instruction,
with the build argument docker-compose.yml gives the GPU image), with `pip` replaced by a recorder
of the requirement file it is handed: no Docker daemon is needed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from gpu_requirements import gpu_requirements, normalized  # noqa: E402

LOCK = (ROOT / "requirements.lock").read_text()


def lock_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[normalized(name.strip())] = version.strip()
    return pins


def install_step() -> str:
    """The Dockerfile's RUN instruction that installs the requirements, as one shell command."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [line[4:] for line in text.splitlines() if line.startswith("RUN ") and "pip install" in line]
    assert len(runs) == 1, runs
    return runs[0]


def compose_gpu_package() -> str:
    text = (ROOT / "docker-compose.yml").read_text()
    block = text[text.index("dermportal-worker:gpu") :].split("\nx-", 1)[0]
    return re.search(r'TF_PACKAGE:\s*"([^"]+)"', block).group(1)


def requirements_the_build_installs(tmp_path: Path, tf_package: str) -> str:
    build = tmp_path / "app"
    build.mkdir()
    (build / "requirements.lock").write_text(LOCK)
    (build / "gpu_requirements.py").write_text((ROOT / "scripts" / "gpu_requirements.py").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    pip = bin_dir / "pip"  # records the file it would install from, as the image's pip would read it
    pip.write_text('#!/bin/sh\n[ "$1" = install ] && [ "$2" = -r ] && cp "$3" "$RECORD"\n')
    pip.chmod(0o755)
    record = tmp_path / "installed.txt"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TF_PACKAGE": tf_package, "RECORD": str(record)}
    step = install_step().replace("/tmp/", f"{tmp_path}/")  # the image's /tmp is its own
    result = subprocess.run(["sh", "-ec", step], cwd=build, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return record.read_text()


def test_the_gpu_image_installs_tensorflow_with_cuda_at_the_locked_version(tmp_path):
    package = compose_gpu_package()
    assert package == "tensorflow[and-cuda]"
    version = lock_pins(LOCK)["tensorflow-cpu"]
    installed = requirements_the_build_installs(tmp_path, package)
    pins = lock_pins(installed)
    assert pins.pop("tensorflow[and-cuda]") == version
    assert "tensorflow-cpu" not in pins and "tensorflow" not in pins
    expected = lock_pins(LOCK)
    expected.pop("tensorflow-cpu")
    assert pins == expected  # every other pin as locked


def test_the_cpu_image_installs_the_lock_as_it_is(tmp_path):
    assert requirements_the_build_installs(tmp_path, "") == LOCK


@pytest.mark.parametrize("spelling", ["tensorflow_cpu", "tensorflow-cpu", "TensorFlow.CPU"])
def test_every_spelling_of_the_cpu_pin_is_replaced(spelling):
    out = gpu_requirements(f"absl-py==2.1.0\n{spelling}==2.21.0\nzipp==3.0\n", "tensorflow[and-cuda]")
    assert out == "absl-py==2.1.0\ntensorflow[and-cuda]==2.21.0\nzipp==3.0\n"


def test_a_lock_without_the_cpu_pin_fails_the_build(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("tensorflow==2.21.0\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_requirements.py"), str(lock)],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert result.returncode == 1 and "pin tensorflow-cpu exactly once; it pins it 0 times" in result.stderr
