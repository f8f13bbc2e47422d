"""The storage contract, run on both backends: the local folder and S3 (a real moto server process)."""

import io

import pytest
from s3_support import bucket_names

from webapp.storage import LocalStorage, S3Storage, StorageError, check_key, image_key

KEY = image_key("ab" * 32, "png")


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(bucket, endpoint_url=endpoint, region="us-east-1", prefix="portal")


def leftovers(storage, tmp_path) -> list[str]:
    """What the backend holds besides valid objects: temporary files (local), or every object name (S3)."""
    if isinstance(storage, LocalStorage):
        return [p.name for p in (tmp_path / "store").rglob(".tmp-*")]
    return bucket_names(storage.client.meta.endpoint_url, storage.bucket)


class BreaksMidway(io.RawIOBase):
    """A body stream that gives `good` bytes, then fails as a dropped upload or a full disk would."""

    def __init__(self, good: int):
        self.left = good

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.left <= 0:
            raise OSError("the upload broke off")
        n = min(len(buffer), self.left)
        buffer[:n] = b"x" * n
        self.left -= n
        return n


def test_save_open_exists_url_delete(storage, tmp_path):
    assert KEY == f"images/ab/ab/{'ab' * 32}.png"
    assert not storage.exists(KEY) and storage.modified(KEY) is None
    assert storage.save(KEY, b"data") == KEY
    assert storage.exists(KEY) and storage.modified(KEY) is not None
    with storage.open(KEY) as f:
        assert f.read() == b"data"
    assert storage.url(KEY) == f"/files/{KEY}"
    storage.delete(KEY)
    assert not storage.exists(KEY)
    storage.delete(KEY)  # deleting twice is fine
    assert leftovers(storage, tmp_path) == []


def test_a_local_save_steps_over_a_temporary_file_left_by_a_crash(tmp_path, monkeypatch):
    """A crashed process leaves its ".tmp-<pid>-<thread>-<n>" file; a later process that gets the
    same id takes the next name instead of failing or writing into the leftover."""
    import itertools
    import os
    import threading

    from webapp import storage as storage_module

    local = LocalStorage(tmp_path / "store")
    folder = local.path(KEY).parent
    folder.mkdir(parents=True)
    leftover = folder / f".tmp-{os.getpid()}-{threading.get_ident()}-0"
    leftover.write_bytes(b"half of an earlier write")
    monkeypatch.setattr(storage_module, "_temporary_names", itertools.count())
    local.save(KEY, b"data")
    with local.open(KEY) as f:
        assert f.read() == b"data"
    assert leftover.read_bytes() == b"half of an earlier write"
    assert leftovers(local, tmp_path) == [leftover.name]


def test_save_from_a_stream_and_overwrite(storage):
    storage.save(KEY, b"old contents, longer than the new")
    storage.save(KEY, io.BytesIO(b"new"))
    with storage.open(KEY) as f:
        assert f.read() == b"new"


def test_a_write_that_fails_midway_leaves_nothing_half_written(storage, tmp_path):
    other = image_key("cd" * 32, "png")
    storage.save(KEY, b"the previous image")
    for key in (KEY, other):
        with pytest.raises(OSError, match="broke off"):
            storage.save(key, io.BufferedReader(BreaksMidway(good=300_000)))
    assert not storage.exists(other)  # no object at all where there was none
    with storage.open(KEY) as f:
        assert f.read() == b"the previous image"  # the old object, whole
    if isinstance(storage, LocalStorage):
        assert leftovers(storage, tmp_path) == []
    else:
        assert leftovers(storage, tmp_path) == [f"portal/{KEY}"]


@pytest.mark.parametrize(
    "key",
    [
        "../etc/passwd",
        "/etc/passwd",
        "images/../../x",
        "images//x",
        "Images/X.png",
        "",
        "a/./b",
        "images/x\0.png",
        "a\\b",
    ],
)
def test_unsafe_keys_are_refused(storage, key):
    for call in (lambda: storage.save(key, b"x"), lambda: storage.open(key), lambda: storage.exists(key)):
        with pytest.raises(StorageError, match="Invalid storage key"):
            call()
    with pytest.raises(StorageError):
        check_key(key)


def test_missing_object(storage):
    with pytest.raises(StorageError, match="No stored object"):
        storage.open("images/none.png")
    assert not storage.exists("images/none.png")
