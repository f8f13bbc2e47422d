#!/usr/bin/env python3
"""Per-operation times of the two storage backends on this machine: the local folder, and S3 through
a moto server process on loopback (started here, as the tests start it; no network).

    .venv/bin/python scripts/bench_storage.py [--count 100]

Prints the median milliseconds of save, open+read, exists and delete of a 3 KB and a ~1 MB PNG, and
the cost of building a boto3 client (why webapp.storage caches one per process). Moto answers
slower than a real S3 service would on a LAN: read the S3 column as an upper bound of the client's
own cost, not as a figure for MinIO or AWS.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/s3_support.py starts the moto server

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def median_ms(fn, keys) -> float:
    times = []
    for key in keys:
        t0 = time.perf_counter()
        fn(key)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def png(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="objects per operation and size")
    args = parser.parse_args()

    import s3_support

    os.environ.update(s3_support.AWS_ENV)
    import boto3

    from webapp.storage import LocalStorage, S3Storage

    endpoint = s3_support.moto_endpoint()
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    builds = []
    for _ in range(10):
        t0 = time.perf_counter()
        boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")
        builds.append(time.perf_counter() - t0)
    print(
        f"boto3 client build: median {1000 * statistics.median(builds):.0f} ms (webapp.storage keeps one per process)"
    )

    from portal_helpers import image_bytes

    images = {"small": image_bytes(), "~1 MB": png(600, 450)}
    with tempfile.TemporaryDirectory() as folder:
        backends = {
            "local": LocalStorage(folder),
            "s3 (moto)": S3Storage("bench", endpoint_url=endpoint, region="us-east-1", prefix="bench"),
        }
        print(
            f"{'backend':10s} {'image':>12s} {'save':>8s} {'open+read':>10s} {'exists':>8s} {'delete':>8s}  (median ms)"
        )
        for name, storage in backends.items():
            for label, data in images.items():
                print(f"{name:10s} {label + f' {len(data) // 1024} KB':>12s} " + row(storage, data, args.count))


def row(storage, data: bytes, count: int) -> str:
    from webapp.storage import image_key

    keys = [image_key(f"{i:064x}", "png") for i in range(count)]
    save = median_ms(lambda k: storage.save(k, data), keys)
    read = median_ms(lambda k: storage.open(k).read(), keys)
    exists = median_ms(storage.exists, keys)
    delete = median_ms(storage.delete, keys)
    return f"{save:>8.2f} {read:>10.2f} {exists:>8.2f} {delete:>8.2f}"


if __name__ == "__main__":
    main()
