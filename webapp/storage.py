"""One storage interface for uploaded images (and later heatmaps and exports).

Rows hold *keys* ("images/ab/cd/abcd....png"), never paths. Every key goes through `check_key`
before it touches the file system, so path traversal is refused in exactly one place.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)*$")


class StorageError(ValueError):
    """A malformed key or a missing object."""


def check_key(key: str) -> str:
    """Returns `key` if it is a safe relative key (lower-case segments, no '..', no leading '/')."""
    if not isinstance(key, str) or len(key) > 255 or not _KEY.match(key) or ".." in key.split("/"):
        raise StorageError(f"Invalid storage key {key!r}.")
    return key


def image_key(content_hash: str, extension: str) -> str:
    """The key of an image stored by content: images/<h[:2]>/<h[2:4]>/<hash>.<ext>."""
    return check_key(f"images/{content_hash[:2]}/{content_hash[2:4]}/{content_hash}.{extension}")


class Storage(Protocol):
    def save(self, key: str, data: bytes) -> str: ...
    def open(self, key: str) -> BinaryIO: ...
    def url(self, key: str) -> str: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...


class LocalStorage:
    """Files under `root`; writes are atomic (temporary file, then rename).

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

    def save(self, key: str, data: bytes) -> str:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
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


def storage_from_settings(settings) -> Storage:
    """The configured backend (only the local one so far)."""
    return LocalStorage(settings.STORAGE_DIR)
