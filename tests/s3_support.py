"""A real S3-compatible server for the tests: moto in server mode, in its own process on a free port.

One server per test session (started on first use, stopped at exit); each test gets its own bucket,
so tests never see each other's objects. Credentials are fake ones in the environment, as boto3's
standard chain reads them; the shared AWS config files are pointed away so a developer's own
~/.aws never takes part.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",  # no network at run time: never ask an instance-metadata service
}
_server: dict[str, object] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_endpoint() -> str:
    """The URL of this session's moto server, started on first use."""
    if "url" not in _server:
        port = _free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        atexit.register(_stop, process)
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(url, process)
        _server.update(url=url, process=process)
    return _server["url"]


def _wait_until_up(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode} before it answered")
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto server did not answer on {url} within {timeout} s")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture
def s3_bucket(monkeypatch):
    """(endpoint URL, a new empty bucket) on the session's moto server, with the fake credentials set."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    import boto3

    endpoint = moto_endpoint()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return endpoint, bucket


def bucket_names(endpoint: str, bucket: str) -> list[str]:
    """Every object name in the bucket, as the server lists them."""
    import boto3

    listing = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))
