import io

import numpy as np
import pytest
from PIL import Image
from portal_helpers import FULLRES_IMAGE, SMALL_IMAGES, image_bytes

from webapp.imaging import UploadError, process_upload

MB = 1024 * 1024


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def test_real_jpeg_is_stored_as_its_own_data_with_the_same_pixels():
    data = image_bytes(SMALL_IMAGES[0])
    result = process_upload(data, 20 * MB, 40_000_000)
    assert (result.width, result.height) == (200, 150)
    assert result.source_format == "JPEG" and result.extension == "jpg" and result.data.startswith(b"\xff\xd8")
    stored = Image.open(io.BytesIO(result.data))
    assert stored.mode == "RGB" and stored.format == "JPEG"
    original = Image.open(io.BytesIO(data)).convert("RGB")
    assert stored.tobytes() == original.tobytes()  # no second round of JPEG: exactly the decoded pixels


def markers(jpeg: bytes) -> list[int]:
    """The markers of a JPEG's segments before its first scan."""
    found, pos = [], 2
    while jpeg[pos + 1] != 0xDA:
        found.append(jpeg[pos + 1])
        pos += 2 + int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
    return found


def test_a_kept_jpeg_loses_its_metadata_and_whatever_follows_it():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "Dermatoscope Inc."
    exif[0x8825] = {2: (1.0, 2.0, 3.0)}  # GPS info
    icc = b"\0" * 128 + b"a colour profile"
    data = encode(image, "JPEG", exif=exif.tobytes(), icc_profile=icc, comment=b"patient 1234", quality=90)
    data += b"PK\x03\x04 a zip archive appended: a polyglot"
    result = process_upload(data, MB, 10**6)

    assert result.extension == "jpg" and result.data.endswith(b"\xff\xd9")
    assert not [m for m in markers(result.data) if 0xE0 <= m <= 0xEF or m == 0xFE]  # no APPn, no COM
    for hidden in (b"Dermatoscope", b"colour profile", b"patient 1234", b"PK\x03\x04"):
        assert hidden not in result.data
    stored = Image.open(io.BytesIO(result.data))
    assert not stored.getexif() and not {"exif", "icc_profile", "comment"} & set(stored.info)
    assert stored.tobytes() == Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_the_same_pixels_in_a_jpeg_and_a_png_have_one_content_hash():
    jpeg = image_bytes(SMALL_IMAGES[1])
    png = encode(Image.open(io.BytesIO(jpeg)).convert("RGB"), "PNG", compress_level=9)
    as_jpeg, as_png = process_upload(jpeg, MB, 10**6), process_upload(png, MB, 10**6)
    assert (as_jpeg.extension, as_png.extension) == ("jpg", "png")
    assert as_jpeg.content_hash == as_png.content_hash


@pytest.mark.parametrize(
    "make",
    [
        lambda: encode(Image.new("L", (16, 8), 90), "JPEG"),
        lambda: encode(Image.new("CMYK", (16, 8), (10, 20, 30, 40)), "JPEG"),
        lambda: _spliced(encode(Image.new("RGB", (16, 8), (9, 9, 9)), "JPEG"), b"\xff"),
    ],
    ids=["grayscale", "cmyk", "fill-byte-before-a-segment"],
)
def test_a_jpeg_that_cannot_be_kept_as_it_is_becomes_png(make):
    data = make()
    result = process_upload(data, MB, 10**6)
    stored = Image.open(io.BytesIO(result.data))
    assert result.extension == "png" and stored.format == "PNG" and stored.mode == "RGB"
    assert stored.tobytes() == Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def _spliced(jpeg: bytes, segment: bytes) -> bytes:
    """`segment` inserted right after the start marker."""
    return jpeg[:2] + segment + jpeg[2:]


def test_fullres_image_is_accepted():
    result = process_upload(image_bytes(FULLRES_IMAGE), 20 * MB, 40_000_000)
    assert (result.width, result.height) == (600, 450)


def test_content_hash_is_stable():
    data = image_bytes(SMALL_IMAGES[1])
    assert process_upload(data, MB, 10**6).content_hash == process_upload(data, MB, 10**6).content_hash


def test_exif_orientation_is_applied_and_metadata_dropped():
    image = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    exif[0x8825] = {2: (1.0, 2.0, 3.0)}  # GPS info
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    result = process_upload(data, MB, 10**6)
    assert (result.width, result.height) == (20, 40) and result.extension == "png"  # turned, so re-encoded
    stored = Image.open(io.BytesIO(result.data))
    assert not stored.getexif() and "exif" not in stored.info


def test_png_with_alpha_is_flattened_to_rgb():
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    result = process_upload(encode(image, "PNG"), MB, 10**6)
    stored = Image.open(io.BytesIO(result.data))
    assert stored.mode == "RGB" and stored.getpixel((0, 0)) == (255, 255, 255)


def truncated_jpeg() -> bytes:
    return image_bytes(SMALL_IMAGES[2])[:600]


def gif() -> bytes:
    return encode(Image.new("RGB", (8, 8)), "GIF")


def png_claiming_to_be_jpeg() -> bytes:
    return b"\xff\xd8\xff" + encode(Image.new("RGB", (8, 8)), "PNG")[3:]


@pytest.mark.parametrize(
    "make, max_bytes, max_pixels, status, message",
    [
        (lambda: b"", MB, 10**6, 400, "empty"),
        (lambda: b"hello, this is text" * 10, MB, 10**6, 415, "not a JPEG or PNG"),
        (gif, MB, 10**6, 415, "not a JPEG or PNG"),
        (lambda: b"%PDF-1.7\n" + b"0" * 100, MB, 10**6, 415, "not a JPEG or PNG"),
        (truncated_jpeg, MB, 10**6, 400, "could not be decoded"),
        (png_claiming_to_be_jpeg, MB, 10**6, 400, "could not be decoded"),
        (lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 64, MB, 10**6, 400, "could not be decoded"),
        (lambda: image_bytes(FULLRES_IMAGE), 100_000, 10**6, 413, "larger than the limit"),
        (lambda: image_bytes(FULLRES_IMAGE), MB, 600 * 450 - 1, 413, "more than the limit"),
    ],
    ids=[
        "empty",
        "text",
        "gif",
        "pdf",
        "truncated-jpeg",
        "wrong-magic",
        "garbage-png",
        "too-many-bytes",
        "too-many-pixels",
    ],
)
def test_bad_uploads_are_refused(make, max_bytes, max_pixels, status, message):
    with pytest.raises(UploadError, match=message) as info:
        process_upload(make(), max_bytes, max_pixels)
    assert info.value.status == status


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    """A huge declared size is refused from the header alone (no decompression bomb)."""
    big = encode(Image.new("L", (4000, 3000)), "PNG")  # compresses to a few KB
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(UploadError, match="more than the limit") as info:
        process_upload(big, MB, 1_000_000)
    assert info.value.status == 413
