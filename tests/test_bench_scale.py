"""scripts/bench_scale.py's pure parts: the altered copies that fill a study-sized folder pass the
portal's duplicate detection, the browser's chunking, and the p95 it reports."""

import importlib.util
import sys
from pathlib import Path

import pytest

from webapp.imaging import process_upload

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "fixtures" / "images"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "scripts" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module
    spec.loader.exec_module(module)
    return module


def test_the_folder_is_the_sources_then_altered_copies_with_distinct_normalised_pixels(bench, tmp_path):
    sources = [IMAGES / name for name in ("ISIC_0024698.jpg", "ISIC_0025964.jpg", "ISIC_0027419.jpg")]
    folder = bench.build_folder(sources, 9, tmp_path)  # each source, its variant 1, its variant 2

    assert folder[:3] == sources
    assert {p.suffix for p in folder[3:]} == {".png", ".jpg"}
    assert all(p.parent == tmp_path for p in folder[3:])
    # The portal refuses a second copy by the hash of the file and by the hash of its normalised pixels.
    processed = [process_upload(p.read_bytes(), 10 * 1024 * 1024, 10**8) for p in folder]
    assert len({p.content_hash for p in processed}) == 9
    sizes = {(p.width, p.height) for p in processed}
    assert len(sizes) == 3  # one size per variant (the sources are all 200x150)


def test_an_altered_copy_needs_a_positive_variant(bench, tmp_path):
    with pytest.raises(ValueError, match="variant must be 1 or more"):
        bench.altered_copy(next(IMAGES.glob("*.jpg")), 0, tmp_path)


def test_chunks_follow_the_browser_limits_on_files_and_bytes(bench, tmp_path):
    paths = []
    for i, size in enumerate([10, 10, 10, 10, 10, 60, 10]):
        path = tmp_path / f"f{i}.jpg"
        path.write_bytes(b"x" * size)
        paths.append(path)

    assert [len(c) for c in bench.chunks(paths, per_request=3)] == [3, 3, 1]
    assert [len(c) for c in bench.chunks(paths, per_request=50, max_bytes=50)] == [
        5,
        1,
        1,
    ]  # a file over the limit goes alone
    assert sum(bench.chunks(paths, per_request=2), []) == paths


def test_p95_interpolates_and_is_none_without_samples(bench):
    assert bench.p95([float(v) for v in range(1, 101)]) == pytest.approx(95.05)
    assert bench.p95([0.2]) == 0.2
    assert bench.p95([]) is None
