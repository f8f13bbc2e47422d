"""Hostile and odd uploads, through the API, as one table.

Every hostile row must get a clear 4xx JSON error, leave nothing stored (no case, image, job or
batch row, no file in storage), and the service must still accept a good upload afterwards.
Single images go to `POST /api/v1/cases`; archives and metadata CSVs to `POST /api/v1/batches`
(multipart `images` many + optional `metadata` CSV, or one `archive` zip).

A second table checks that unusual but legitimate images (CMYK, 16-bit, palette, grayscale, RGBA,
EXIF-rotated) are accepted and stored with the right pixels and orientation.
"""

from __future__ import annotations

import io
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from portal_helpers import FULLRES_IMAGE, SMALL_IMAGES, image_bytes

CSV_HEADER = "image_id,lesion_id,dx,dx_type,age,sex,localization\n"


# --- builders -------------------------------------------------------------------------------------


def png_bytes(image: PILImage.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def jpeg_bytes(image: PILImage.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **save)
    return buffer.getvalue()


def small_png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    return png_bytes(PILImage.fromarray(pixels))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (valid CRC) followed by a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose SOF header is patched to declare width x height (a decompression bomb)."""
    data = bytearray(image_bytes(SMALL_IMAGES[0]))
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", data, i + 5, height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def zip_of(entries: list[tuple[Any, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buffer.getvalue()


def symlink_zip() -> bytes:
    info = zipfile.ZipInfo("link.jpg")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    info.create_system = 3
    return zip_of([("ok.png", small_png(1)), (info, b"/etc/passwd")])


def zip_bomb() -> bytes:
    return zip_of([("ok.png", small_png(1)), ("bomb.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (8 * 1024 * 1024))])


def raw_multipart(filename: bytes, data: bytes) -> tuple[bytes, str]:
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="' + filename + b'"\r\n'
        b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--XyZ--\r\n"
    )
    return body, "multipart/form-data; boundary=XyZ"


def csv_row(**overrides) -> str:
    row = {
        "image_id": "ok",
        "lesion_id": "HAM_0000001",
        "dx": "nv",
        "dx_type": "histo",
        "age": "40",
        "sex": "female",
        "localization": "back",
    }
    row.update(overrides)
    return ",".join(row.values()) + "\n"


@dataclass
class Row:
    """One hostile request: `build()` returns the kwargs for client.post."""

    id: str
    path: str
    build: Callable[[], dict[str, Any]]
    statuses: tuple[int, ...] = (400,)
    message: str = ""  # a regex the JSON error must match (case-insensitive)
    marks: list = field(default_factory=list)


def case_upload(data: bytes, name: str = "lesion.jpg", **form) -> Callable[[], dict[str, Any]]:
    return lambda: {"data": {"image": (io.BytesIO(data), name), **form}}


def batch_upload(archive: bytes | None = None, csv: bytes | None = None, images=None) -> Callable[[], dict[str, Any]]:
    def build():
        data: dict[str, Any] = {}
        if archive is not None:
            data["archive"] = (io.BytesIO(archive), "lesions.zip")
        if csv is not None:
            data["metadata"] = (io.BytesIO(csv), "metadata.csv")
        data["images"] = [(io.BytesIO(d), n) for n, d in (images or [("ok.png", small_png(1))])]
        return {"data": data}

    return build


def raw_case(filename: bytes) -> Callable[[], dict[str, Any]]:
    def build():
        body, content_type = raw_multipart(filename, small_png(5))
        return {"data": body, "content_type": content_type}

    return build


HTML = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"
SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><rect width="9" height="9"/></svg>'
)
GOOD_JPEG = image_bytes(SMALL_IMAGES[1])

HOSTILE = [
    # single images: POST /api/v1/cases
    Row(
        "text-named-jpg",
        "/api/v1/cases",
        case_upload(b"just some text, not an image\n" * 20),
        (415,),
        "not a JPEG or PNG",
    ),
    Row(
        "truncated-jpeg",
        "/api/v1/cases",
        case_upload(image_bytes(FULLRES_IMAGE)[:6000]),
        (400,),
        "could not be decoded",
    ),
    Row(
        "jpeg-magic-then-garbage",
        "/api/v1/cases",
        case_upload(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 100),
        (400,),
        "could not be decoded",
    ),
    Row("decompression-bomb-jpeg", "/api/v1/cases", case_upload(jpeg_declaring(60000, 60000)), (413,), "pixels"),
    Row(
        "png-absurd-dimensions",
        "/api/v1/cases",
        case_upload(png_with_header(2**31 - 1, 2**31 - 1), "x.png"),
        (400, 413),
    ),
    Row(
        "png-huge-declared-size",
        "/api/v1/cases",
        case_upload(png_with_header(100_000, 100_000), "x.png"),
        (413,),
        "pixels",
    ),
    Row("png-zero-width", "/api/v1/cases", case_upload(png_with_header(0, 10), "x.png"), (400,)),
    Row("empty-file", "/api/v1/cases", case_upload(b""), (400,), "empty"),
    Row("html-named-jpg", "/api/v1/cases", case_upload(HTML), (415,), "not a JPEG or PNG"),
    Row("svg-named-jpg", "/api/v1/cases", case_upload(SVG), (415,), "not a JPEG or PNG"),
    Row("svg-named-png", "/api/v1/cases", case_upload(SVG, "x.png"), (415,)),
    Row("gif-named-jpg", "/api/v1/cases", case_upload(b"GIF89a" + b"\0" * 64), (415,)),
    Row("over-long-file-name", "/api/v1/cases", case_upload(GOOD_JPEG, "a" * 300 + ".jpg"), (400,), "file name"),
    Row(
        "control-chars-in-file-name", "/api/v1/cases", case_upload(GOOD_JPEG, "le\x07sion\x1b.jpg"), (400,), "file name"
    ),
    Row("non-utf8-file-name", "/api/v1/cases", raw_case(b"l\xe9\xff\xfesion.png"), (400,)),
    Row("over-long-patient-ref", "/api/v1/cases", case_upload(GOOD_JPEG, patient_ref="p" * 65), (400,), "patient_ref"),
    Row("huge-age", "/api/v1/cases", case_upload(GOOD_JPEG, age="9" * 40), (400,), "age"),
    Row("unknown-sex", "/api/v1/cases", case_upload(GOOD_JPEG, sex="robot"), (400,), "sex"),
    Row("unknown-site", "/api/v1/cases", case_upload(GOOD_JPEG, site="elbow pit"), (400,), "site"),
    Row(
        "formula-in-lesion-ref",
        "/api/v1/cases",
        case_upload(GOOD_JPEG, lesion_ref="=cmd|' /C calc'!A0"),
        (400,),
        "formula|start with",
    ),
    # archives and metadata: POST /api/v1/batches
    Row(
        "zip-path-traversal",
        "/api/v1/batches",
        batch_upload(zip_of([("ok.png", small_png(1)), ("../../evil.png", small_png(2))])),
        (400, 422),
        r"\.\.",
    ),
    Row(
        "zip-absolute-entry",
        "/api/v1/batches",
        batch_upload(zip_of([("ok.png", small_png(1)), ("/etc/evil.png", small_png(2))])),
        (400, 422),
        "absolute",
    ),
    Row(
        "zip-windows-absolute-entry",
        "/api/v1/batches",
        batch_upload(zip_of([("C:/evil.png", small_png(2))])),
        (400, 422),
        "absolute",
    ),
    Row("zip-bomb", "/api/v1/batches", batch_upload(zip_bomb()), (413,)),
    Row("zip-symlink", "/api/v1/batches", batch_upload(symlink_zip()), (400, 422), "link"),
    Row(
        "nested-zip",
        "/api/v1/batches",
        batch_upload(zip_of([("ok.png", small_png(1)), ("inner.zip", zip_of([("a.png", small_png(3))]))])),
        (400, 415, 422),
        "nested|archive",
    ),
    Row("not-a-zip", "/api/v1/batches", batch_upload(b"PK\x03\x04 this is not really a zip"), (400, 415, 422)),
    Row("csv-wrong-columns", "/api/v1/batches", batch_upload(csv=b"name,diagnosis\nok,nv\n"), (400, 422), "column"),
    Row(
        "csv-formula-injection",
        "/api/v1/batches",
        batch_upload(csv=(CSV_HEADER + csv_row(lesion_id="=cmd|' /C calc'!A0")).encode()),
        (400, 422),
        "formula",
    ),
    Row(
        "csv-formula-plus",
        "/api/v1/batches",
        batch_upload(csv=(CSV_HEADER + csv_row(lesion_id="+SUM(A1:A9)")).encode()),
        (400, 422),
        "formula",
    ),
    Row(
        "csv-over-long-field",
        "/api/v1/batches",
        batch_upload(csv=(CSV_HEADER + csv_row(lesion_id="L" * 500)).encode()),
        (400, 422),
    ),
    Row(
        "csv-unknown-sex",
        "/api/v1/batches",
        batch_upload(csv=(CSV_HEADER + csv_row(sex="robot")).encode()),
        (400, 422),
        "sex",
    ),
    Row(
        "csv-unknown-site",
        "/api/v1/batches",
        batch_upload(csv=(CSV_HEADER + csv_row(localization="elbow pit")).encode()),
        (400, 422),
        "localization|site",
    ),
    Row(
        "csv-not-utf8",
        "/api/v1/batches",
        batch_upload(csv=(CSV_HEADER + csv_row(lesion_id="L\xe9sion")).encode("latin-1")),
        (400, 422),
        "UTF-8",
    ),
]


def stored_files(app) -> list:
    root = app.extensions["settings"].STORAGE_DIR
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def row_counts(app) -> dict[str, int]:
    from sqlalchemy import func, select

    from webapp import models
    from webapp.db import db

    names = ["Case", "Image", "Job", "Analysis", "Batch", "BatchItem"]
    with app.app_context():
        return {
            n: db.session.scalar(select(func.count()).select_from(getattr(models, n)))
            for n in names
            if hasattr(models, n)
        }


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in HOSTILE])
def test_hostile_input_is_refused_and_nothing_is_stored(app, client, auth_headers, sent_tasks, row):
    response = client.post(row.path, headers=auth_headers, **row.build())
    assert response.status_code in row.statuses, (response.status_code, response.get_data(as_text=True)[:500])
    body = response.get_json()
    assert body and body.get("error"), response.get_data(as_text=True)[:500]
    assert body.get("status", response.status_code) == response.status_code
    if row.message:
        assert __import__("re").search(row.message, body["error"], __import__("re").I), body["error"]
    assert set(row_counts(app).values()) == {0}, row_counts(app)
    assert stored_files(app) == []
    assert sent_tasks == []
    # The service is still up and accepts a good image.
    ok = client.post("/api/v1/cases", headers=auth_headers, data={"image": (io.BytesIO(small_png(99)), "ok.png")})
    assert ok.status_code == 202, ok.get_json()


# --- accepted and converted -----------------------------------------------------------------------


def _solid(mode: str, size, color) -> PILImage.Image:
    return PILImage.new(mode, size, color)


def _exif_rotated() -> bytes:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 tall: left half red, right half blue
    pixels[:, :20] = (220, 20, 20)
    pixels[:, 20:] = (20, 20, 220)
    image = PILImage.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return jpeg_bytes(image, exif=exif.tobytes())


def _rgba_half_red() -> bytes:
    return png_bytes(_solid("RGBA", (16, 16), (255, 0, 0, 128)))


def _palette(transparent: bool) -> bytes:
    image = _solid("RGB", (16, 16), (10, 200, 30)).convert("P", palette=PILImage.Palette.ADAPTIVE, colors=4)
    if transparent:
        return png_bytes(image, transparency=image.getpixel((0, 0)))
    return png_bytes(image)


def _gray16(value: int) -> bytes:
    return png_bytes(PILImage.fromarray(np.full((12, 12), value, dtype=np.uint16)))


ACCEPTED = [
    # id, bytes, expected (width, height), {(x, y): expected RGB}, tolerance
    (
        "cmyk-jpeg",
        jpeg_bytes(_solid("RGB", (16, 16), (200, 40, 60)).convert("CMYK")),
        (16, 16),
        {(8, 8): (200, 40, 60)},
        8,
    ),
    ("grayscale-jpeg", jpeg_bytes(_solid("L", (16, 16), 90)), (16, 16), {(8, 8): (90, 90, 90)}, 3),
    ("grayscale-png", png_bytes(_solid("L", (16, 16), 77)), (16, 16), {(8, 8): (77, 77, 77)}, 0),
    ("gray-alpha-png", png_bytes(_solid("LA", (16, 16), (0, 0))), (16, 16), {(8, 8): (255, 255, 255)}, 0),
    ("16-bit-png", _gray16(40000), (12, 12), {(6, 6): (156, 156, 156)}, 0),
    ("16-bit-png-max", _gray16(65535), (12, 12), {(6, 6): (255, 255, 255)}, 0),
    ("palette-png", _palette(False), (16, 16), {(8, 8): (10, 200, 30)}, 0),
    ("palette-png-transparent", _palette(True), (16, 16), {(8, 8): (255, 255, 255)}, 0),
    ("rgba-png", _rgba_half_red(), (16, 16), {(8, 8): (255, 127, 127)}, 2),
    ("bilevel-png", png_bytes(_solid("1", (16, 16), 1)), (16, 16), {(8, 8): (255, 255, 255)}, 0),
    ("exif-rotated-jpeg", _exif_rotated(), (20, 40), {(10, 5): (220, 20, 20), (10, 34): (20, 20, 220)}, 12),
]


@pytest.mark.parametrize("name, data, size, pixels, tolerance", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_unusual_images_are_accepted_and_converted(
    app, client, auth_headers, sent_tasks, name, data, size, pixels, tolerance
):
    response = client.post("/api/v1/cases", headers=auth_headers, data={"image": (io.BytesIO(data), f"{name}.img")})
    assert response.status_code == 202, response.get_json()
    from webapp.db import db
    from webapp.models import Image
    from webapp.storage import storage_from_settings

    with app.app_context():
        row = db.session.scalar(db.select(Image))
        assert (row.width, row.height) == size
        with storage_from_settings(app.extensions["settings"]).open(row.storage_key) as f:
            stored = PILImage.open(f)
            stored.load()
    assert stored.format == "PNG" and stored.mode == "RGB" and stored.size == size
    assert not stored.info.get("exif")
    for xy, expected in pixels.items():
        got = stored.getpixel(xy)
        assert all(abs(g - e) <= tolerance for g, e in zip(got, expected)), (xy, got, expected)
