"""The GPU worker's requirement list: requirements.lock with its CPU-only TensorFlow wheel replaced.

`python scripts/gpu_requirements.py requirements.lock --package "tensorflow[and-cuda]"` prints the
lock with the `tensorflow-cpu` pin (however the lock spells it: `pip freeze` writes
`tensorflow_cpu`) replaced by the package at the same version, so the GPU image installs
TensorFlow with its CUDA wheels and not the CPU wheel. The Dockerfile runs it when the build
argument TF_PACKAGE is set; tests/test_gpu_requirements.py checks what it prints and what the
Dockerfile would install. Exits 1 with a message when the lock pins no CPU TensorFlow.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

CPU_PACKAGE = "tensorflow-cpu"
PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


def normalized(name: str) -> str:
    """The package name as PEP 503 compares names (case, '-', '_' and '.' do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_requirements(lock: str, package: str) -> str:
    """The lock's lines with the CPU TensorFlow pin replaced by `package` at the same version.

    Raises:
        ValueError: the lock pins no tensorflow-cpu, or pins it more than once.
    """
    lines, versions = [], []
    for line in lock.splitlines():
        match = PIN.match(line)
        if match and normalized(match.group(1)) == CPU_PACKAGE:
            versions.append(match.group(2))
            line = f"{package}=={match.group(2)}"
        lines.append(line)
    if len(versions) != 1:
        raise ValueError(f"The lock should pin {CPU_PACKAGE} exactly once; it pins it {len(versions)} times.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path, help="the pinned lock (requirements.lock)")
    parser.add_argument("--package", default="tensorflow[and-cuda]", help="the GPU TensorFlow requirement")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(gpu_requirements(args.lock.read_text(), args.package))
    except ValueError as exc:
        print(f"gpu_requirements: {args.lock}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
