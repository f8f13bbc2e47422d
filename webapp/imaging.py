"""Validation and normalisation of uploaded images.

An upload is accepted only if its magic bytes say JPEG or PNG, Pillow decodes it as the same
format, and it is within the size and pixel limits. The decoded image is turned upright
(EXIF orientation) and converted to RGB; those pixels are what is stored, with no metadata:

- A colour JPEG that needs no turning is stored as its own compressed data, its frame, tables and
  scans, without the APPn and COM segments (EXIF, GPS, XMP, ICC, thumbnails, comments) and without
  anything after its end marker, and only after the result was decoded again to exactly the pixels
  of the upload (`stripped_jpeg`). No second round of JPEG artefacts, no metadata, and about a
  tenth of the size and CPU of a PNG re-encoding (3.6 ms per 200x150 upload, and 2 ms more for every
  decode by the worker, on the shared 2 cores).
- Anything else (PNG, grayscale or CMYK JPEG, an EXIF-rotated JPEG, a JPEG laid out in a way the
  stripping does not follow) is re-encoded as PNG: lossless, so again exactly the decoded pixels,
  and written with no metadata.

The content hash is the SHA-256 of the normalised pixels (size and RGB values), not of the stored
file: a JPEG and a PNG of the same pixels, or two files that differ in metadata only, are one image.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}


class UploadError(ValueError):
    """The upload was refused; `status` is the HTTP status that says why (400, 413, 415)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes  # the stored file: RGB, upright, without metadata (JPEG or PNG, `extension`)
    content_hash: str  # SHA-256 hex of the normalised pixels (`pixel_hash`)
    width: int
    height: int
    source_format: str  # "JPEG" or "PNG"
    extension: str  # "jpg" or "png"


def sniff_format(data: bytes) -> str | None:
    for magic, name in MAGIC.items():
        if data.startswith(magic):
            return name
    return None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (mode I;16*, or I from older Pillow) scaled to 8 bits; Pillow's own
    convert("RGB") clips every value above 255 to white instead."""
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = image if image.mode == "I" else image.convert("I")
        return wide.point(lambda v: v * (1 / 257) + 0.5).convert("L")  # 0..65535 -> 0..255, rounded
    return image


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1: upright, as stored)."""
    return image.getexif().get(ExifTags.Base.Orientation, 1)


def _to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB; an RGB image itself (no copy)."""
    if image.mode == "RGB":
        return image
    image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


MAX_FILENAME_BYTES = 255


def check_filename(name: str | None) -> str | None:
    """The upload's file name as it is stored (for the record only, never as a path).

    Folders that a client sends along are dropped (`C:\\x\\lesion.jpg` -> `lesion.jpg`).

    Raises:
        UploadError (400): longer than 255 bytes of UTF-8, control characters, or bytes that were
            not valid UTF-8 (decoded to U+FFFD or to surrogates).
    """
    if name is None or not name.strip():
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if "\ufffd" in base or any(0xD800 <= ord(ch) <= 0xDFFF for ch in base):
        raise UploadError("The file name is not valid UTF-8; rename the file and upload it again.")
    if any(not ch.isprintable() for ch in base):
        raise UploadError("The file name contains control characters; rename the file and upload it again.")
    if len(base.encode("utf-8")) > MAX_FILENAME_BYTES:
        raise UploadError(
            f"The file name is longer than {MAX_FILENAME_BYTES} bytes; rename the file and upload it again."
        )
    return base or None


def process_upload(data: bytes, max_bytes: int, max_pixels: int) -> ProcessedImage:
    """Checks an uploaded file and returns the file to store: the JPEG's own data without its
    metadata where that decodes to the normalised pixels, else their PNG encoding.

    Args:
        data: the uploaded file's bytes.
        max_bytes: largest accepted upload.
        max_pixels: largest accepted width x height (checked before the pixels are decoded).

    Returns:
        The file to store, with the hash of its pixels and its size.

    Raises:
        UploadError: empty, too large, not JPEG/PNG, undecodable or too many pixels.
    """
    if not data:
        raise UploadError("The uploaded file is empty.")
    if len(data) > max_bytes:
        raise UploadError(f"The file is larger than the limit of {max_bytes / 1024 / 1024:.0f} MB.", 413)
    declared = sniff_format(data)
    if declared is None:
        raise UploadError("The file is not a JPEG or PNG image.", 415)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[declared])
            width, height = image.size
            if width * height > max_pixels:
                raise UploadError(f"The image has {width}x{height} pixels, more than the limit of {max_pixels}.", 413)
            if width < 1 or height < 1:
                raise UploadError("The image has no pixels.")
            image.load()
            upright = ImageOps.exif_transpose(image) if _orientation(image) != 1 else image
            rgb = _to_rgb(upright)
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError("The image has more pixels than allowed.", 413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(f"The file could not be decoded as a {declared} image ({exc.__class__.__name__}).") from None
    pixels = rgb.tobytes()
    kept = stripped_jpeg(data, pixels) if declared == "JPEG" and rgb is image else None
    return ProcessedImage(
        data=kept if kept is not None else png_bytes(rgb),
        content_hash=pixel_hash(rgb.size, pixels),
        width=rgb.width,
        height=rgb.height,
        source_format=declared,
        extension="jpg" if kept is not None else "png",
    )


def pixel_hash(size: tuple[int, int], rgb: bytes) -> str:
    """SHA-256 hex of an image's size and RGB bytes: the same pixels give the same hash, whatever
    file they came in."""
    return hashlib.sha256(b"%dx%d:" % size + rgb).hexdigest()


def png_bytes(rgb: Image.Image) -> bytes:
    out = io.BytesIO()
    # Level 1: about 3x faster than 6 (28 -> 11 ms for 200x150, 450 -> 100 ms for 600x450 on the
    # shared 2 cores) for ~15% larger files; the upload is on the pipeline's critical path.
    rgb.save(out, format="PNG", compress_level=1)
    return out.getvalue()


# Segments of the image itself: frames (SOF0-15 but DHT C4, JPG C8, DAC CC), DHT, DAC, DQT, DRI.
_IMAGE_SEGMENTS = frozenset(set(range(0xC0, 0xD0)) - {0xC8}) | {0xDB, 0xDD}
_METADATA_SEGMENTS = frozenset(range(0xE0, 0xF0)) | {0xFE}  # APP0-APP15 (JFIF, EXIF, XMP, ICC, ...), COM
_SOS, _EOI = 0xDA, 0xD9


def stripped_jpeg(data: bytes, pixels: bytes) -> bytes | None:
    """The JPEG without its metadata segments and without anything after its end marker, if it
    decodes to exactly `pixels` (RGB); None when it does not (a colour transform that an APP14
    segment named, say) or when its segments are not laid out as the standard says."""
    kept = _image_segments(data)
    if kept is None:
        return None
    try:
        with Image.open(io.BytesIO(kept), formats=["JPEG"]) as again:
            same = again.mode == "RGB" and again.tobytes() == pixels
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return None
    return kept if same else None


def _image_segments(data: bytes) -> bytes | None:
    """SOI, the tables, frame and scans (with their entropy-coded data) and EOI, in order; None for
    a marker out of place or a segment that runs past the end."""
    parts, pos = [b"\xff\xd8"], 2
    while pos + 2 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == _EOI:
            parts.append(b"\xff\xd9")
            return b"".join(parts)
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > len(data):
            return None
        if marker == _SOS:
            end = _scan_end(data, end)
            if end is None:
                return None
        elif marker not in _IMAGE_SEGMENTS:
            if marker not in _METADATA_SEGMENTS:
                return None
            pos = end
            continue
        parts.append(data[pos:end])
        pos = end
    return None


def _scan_end(data: bytes, pos: int) -> int | None:
    """Where a scan's entropy-coded data ends: at the first marker that is neither a stuffed 0xFF
    byte (FF 00) nor a restart marker (FF D0-D7)."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return None
        following = data[pos + 1]
        if following == 0xFF:  # fill bytes before a marker
            pos += 1
        elif following == 0x00 or 0xD0 <= following <= 0xD7:
            pos += 2
        else:
            return pos
