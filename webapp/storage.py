"""One storage interface for uploaded images, explanation maps and exports, with two backends.

Rows hold *keys* ("images/ab/cd/abcd....png"), never paths or URLs. Every key goes through
`check_key` before it reaches a file system or a bucket, so path traversal is refused in exactly
one place. `LocalStorage` (a folder, the embedded default) serves one machine; `S3Storage` (any
S3-compatible service: AWS S3, MinIO, Ceph, ...) lets web and worker processes on separate machines
share the files. `storage_from_settings` picks one by `STORAGE_BACKEND`.

Both backends keep a half-written object invisible: a reader sees the previous object or the new
one whole, never part of it; a write that fails leaves what was there before.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol

_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)*$")
Data = bytes | BinaryIO  # the whole object, or a readable stream of it
SPOOL_BYTES = 16 * 1024 * 1024  # S3Storage.save holds a streamed object in memory up to this size, then on disk


class StorageError(ValueError):
    """A malformed key or a missing object."""


def check_key(key: str) -> str:
    """Returns `key` if it is a safe relative key (lower-case segments, no '..', no leading '/')."""
    if not isinstance(key, str) or len(key) > 255 or not _KEY.match(key) or ".." in key.split("/"):
        raise StorageError(f"Invalid storage key {key!r}.")
    return key


IMAGES = "images/"  # the keys of uploaded images; maps and archives lie elsewhere


def image_key(content_hash: str, extension: str) -> str:
    """The key of an image stored by content: images/<h[:2]>/<h[2:4]>/<hash>.<ext>."""
    return check_key(f"{IMAGES}{content_hash[:2]}/{content_hash[2:4]}/{content_hash}.{extension}")


class Storage(Protocol):
    def save(self, key: str, data: Data) -> str: ...
    def open(self, key: str) -> BinaryIO: ...
    def url(self, key: str) -> str: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def modified(self, key: str) -> float | None: ...


class LocalStorage:
    """Files under `root`; writes are atomic (temporary file in the same folder, then rename).

    Args:
        root: the directory that holds every object.
        base_url: URL prefix under which the web app serves the objects (`url(key)`).
    """

    def __init__(self, root: str | os.PathLike, base_url: str = "/files"):
        self.root = Path(root).resolve()
        self.base_url = base_url.rstrip("/")

    def path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise StorageError(f"Storage key {key!r} leaves the storage directory.")
        return path

    def save(self, key: str, data: Data) -> str:
        path = self.path(key)
        # os.replace within one folder (one file system) is atomic: readers see the old file or the
        # new one whole. The ".tmp-" name is not a valid key, so listings (backup) skip it.
        fd, tmp = _create_temporary(path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, bytes | bytearray | memoryview):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self.path(key), "rb")
        except FileNotFoundError:
            raise StorageError(f"No stored object with key {key!r}.") from None

    def url(self, key: str) -> str:
        return f"{self.base_url}/{check_key(key)}"

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def modified(self, key: str) -> float | None:
        """When the object was last written (Unix time), or None if there is none."""
        try:
            return self.path(key).stat().st_mtime
        except FileNotFoundError:
            return None


_temporary_names = itertools.count()


def _create_temporary(folder: Path) -> tuple[int, str]:
    """Creates a new empty file in `folder` (made if missing) for writing; returns (fd, its path).

    Named by process, thread and a counter: the worker writes two files per image, and tempfile's
    random names and a folder check before each write cost about as much as the write itself."""
    while True:
        tmp = f"{folder}/.tmp-{os.getpid()}-{threading.get_ident()}-{next(_temporary_names)}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp
        except FileNotFoundError:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # left by a process that had the same id: take the next number
            pass


class S3Storage:
    """Objects in an S3-compatible bucket, under `prefix/<key>`.

    Why a single PUT per object: S3 (and MinIO, Ceph, moto) stores an object only once its whole body
    has arrived, checked against its Content-Length and checksum, and then replaces the old one at
    once; a request that breaks off stores nothing. So a half-written object is never visible, with
    no temporary key to clean up. Objects are served through the web app (`url` is `/files/<key>`,
    behind its sign-in), never by presigned or public URLs: these are patient images.

    Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the
    AWS config files, an instance role), never from the portal's settings.

    Args:
        bucket: the bucket (it must exist; the portal never creates or configures buckets).
        endpoint_url: the service's URL (MinIO: "http://minio:9000"); None for AWS itself.
        region: the bucket's region; None for the chain's default.
        prefix: a folder inside the bucket for this portal's objects ("" for the bucket's root).
        client: a boto3 S3 client to use instead of building one (tests, or a custom session).
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        prefix: str = "",
        base_url: str = "/files",
        client=None,
    ):
        if not bucket:
            raise StorageError("S3 storage needs a bucket name (S3_BUCKET).")
        self.bucket = bucket
        self.prefix = check_key(prefix.strip("/")) + "/" if prefix.strip("/") else ""
        self.base_url = base_url.rstrip("/")
        self.client = client or _s3_client(endpoint_url, region)

    def name(self, key: str) -> str:
        """The object's name in the bucket."""
        return self.prefix + check_key(key)

    def save(self, key: str, data: Data) -> str:
        name = self.name(key)
        if isinstance(data, bytes | bytearray | memoryview):
            self.client.put_object(Bucket=self.bucket, Key=name, Body=bytes(data), ContentType=content_type(key))
            return key
        # boto3 needs a seekable body (it measures and checksums it before sending): a stream is
        # spooled first, so one that fails while read fails before the request starts.
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as body:
            shutil.copyfileobj(data, body)
            body.seek(0)
            self.client.put_object(Bucket=self.bucket, Key=name, Body=body, ContentType=content_type(key))
        return key

    def open(self, key: str) -> BinaryIO:
        """A stream of the object's bytes (not seekable; PIL reads such streams into memory itself)."""
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.name(key))["Body"]
        except ClientError as exc:
            if not _is_missing(exc):
                raise
        raise StorageError(f"No stored object with key {key!r}.")

    def url(self, key: str) -> str:
        return f"{self.base_url}/{check_key(key)}"

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.name(key))  # no error when absent

    def modified(self, key: str) -> float | None:
        """When the object was last written (the service's clock, whole seconds), or None."""
        head = self._head(key)
        if head is None:
            return None
        last: datetime = head["LastModified"]
        return last.timestamp() + 1  # rounded down to the second by S3: the latest it can have been

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.name(key))
        except ClientError as exc:
            if not _is_missing(exc):
                raise  # access denied, a 5xx, ...: a fault to see, not a missing file
        # (HEAD answers a bare 404 for a missing bucket too; GET, PUT and DELETE name NoSuchBucket.)
        return None


# A stored image's media type by its extension; anything else is bytes, its type never guessed.
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg"}


def content_type(key: str) -> str:
    return CONTENT_TYPES.get(os.path.splitext(key)[1], "application/octet-stream")


def _is_missing(error) -> bool:
    """Whether a botocore ClientError says the object is not there (GET: NoSuchKey; HEAD: bare 404)."""
    return error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound")


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _s3_client(endpoint_url: str | None, region: str | None):
    """One boto3 client per process and endpoint: storage objects are built per request, and building
    a client took 0.18-0.6 s here (a cached one: 16 us); clients are thread-safe (the worker's decoder
    threads share one). Keyed by pid because a client's pooled connections must not cross a fork
    (Celery's prefork pool)."""
    cache_key = (os.getpid(), endpoint_url, region)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=5,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
                # Path-style URLs (http://host:9000/bucket/key) work with MinIO and any endpoint
                # name; AWS accepts them too.
                s3={"addressing_style": "path"} if endpoint_url else None,
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
            _clients[cache_key] = client
        return client


def storage_from_settings(settings) -> Storage:
    """The configured backend: `STORAGE_BACKEND` "local" (`STORAGE_DIR`) or "s3" (`S3_*`)."""
    if getattr(settings, "STORAGE_BACKEND", "local") == "s3":
        return S3Storage(
            settings.S3_BUCKET,
            endpoint_url=settings.S3_ENDPOINT_URL or None,
            region=settings.S3_REGION or None,
            prefix=settings.S3_PREFIX or "",
        )
    root = os.fspath(settings.STORAGE_DIR)
    if not os.path.isdir(root):  # resolved again once it exists (it may yet become a link)
        return LocalStorage(root)
    return _local_storage(root, os.getcwd() if not os.path.isabs(root) else "")


@functools.lru_cache(maxsize=32)
def _local_storage(root: str, cwd: str) -> LocalStorage:
    """One LocalStorage per existing folder (and working directory, for a relative one): resolving
    the root walks every component of the path, and an upload asks for the storage once per file."""
    return LocalStorage(root)
