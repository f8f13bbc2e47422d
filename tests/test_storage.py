import pytest

from webapp.storage import LocalStorage, StorageError, check_key, image_key


def test_save_open_exists_url_delete(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    key = image_key("ab" * 32, "png")
    assert key == f"images/ab/ab/{'ab' * 32}.png"
    assert not storage.exists(key)
    storage.save(key, b"data")
    assert storage.exists(key)
    with storage.open(key) as f:
        assert f.read() == b"data"
    assert storage.url(key) == f"/files/{key}"
    storage.delete(key)
    assert not storage.exists(key)
    storage.delete(key)  # deleting twice is fine
    assert not [p for p in (tmp_path / "store").rglob(".tmp-*")]


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
def test_unsafe_keys_are_refused(tmp_path, key):
    storage = LocalStorage(tmp_path)
    with pytest.raises(StorageError, match="Invalid storage key"):
        storage.save(key, b"x")
    with pytest.raises(StorageError):
        check_key(key)


def test_missing_object(tmp_path):
    with pytest.raises(StorageError, match="No stored object"):
        LocalStorage(tmp_path).open("images/none.png")
