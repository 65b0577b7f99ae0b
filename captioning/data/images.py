"""The one image loader, shared by training and inference.

Whatever the file holds, the result is an 8-bit RGB image: EXIF orientation applied, frame 0 of
animations, CMYK / greyscale / palette converted, and

- transparency composited on white (255, 255, 255), whatever carries it: an alpha band (RGBA, LA,
  PA) or a transparent colour / palette entries (PNG tRNS, GIF) in P, RGB, L or 16-bit grey;
- high-bit-depth greyscale scaled to 8 bits (not cut off at 255) by its declared range, never by
  its pixel values: 16-bit (I;16, and the 16-bit data Pillow opens as I) by 65535, a TIFF by its
  BitsPerSample, float (F) images read as [0, 1]; values outside the range are clipped, NaN is black.

Every failure raises :class:`ImageLoadError` naming the file and the cause; its ``reason`` is the
short word :func:`check_image` gives for the same file. A cut-off file is an error in every format:
decoding runs with Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` off even where a program turned it on.
"""

from __future__ import annotations

import numbers
import os
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

#: images with more pixels than this are refused before decoding (decompression bombs), unless the
#: caller gives another limit; Pillow's own default limit
MAX_PIXELS = 89_478_485


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the file and the cause.

    ``reason`` is the cause in one of :func:`check_image`'s words ("missing", "permission denied" ...).
    """

    def __init__(self, message: str, reason: str = "not an image"):
        super().__init__(message)
        self.reason = reason


def _open_file(path: Path) -> BinaryIO:
    """``path`` opened for reading, or :class:`ImageLoadError` saying why the file itself cannot be read
    (before any decoding: an unreadable file is not a broken image)."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file", "missing") from None
    except (IsADirectoryError, PermissionError) as e:
        if path.is_dir():  # Windows refuses to open a folder with a PermissionError
            raise ImageLoadError(f"{path}: is a directory, not an image", "not an image") from None
        if isinstance(e, IsADirectoryError):
            raise
        raise ImageLoadError(f"{path}: permission denied, cannot read the file", "permission denied") from None
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot read the file ({e.strerror or e})", "unreadable") from None


#: what Pillow raises on a file's bad data: besides OSError and SyntaxError, broken headers and tags (a TIFF tag
#: of the wrong type, a cut EXIF block) raise TypeError, KeyError, struct.error ..., a header field it does not
#: know NotImplementedError. A programming error (NameError, AttributeError ...) is not among them: it must stop
#: the run, not pass for a bad image.
BAD_DATA = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    TypeError,
    KeyError,
    IndexError,
    ArithmeticError,  # ZeroDivisionError, OverflowError
    NotImplementedError,  # a DDS pixel format or BLP encoding Pillow does not know
    struct.error,
)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an 8-bit RGB PIL image, or raise :class:`ImageLoadError`.

    ``max_pixels`` is the one pixel limit: an image over it is refused before decoding, one under it
    is loaded even when that is over Pillow's own decompression-bomb limit (see :func:`_allow_pixels`).
    """
    path = Path(path)
    with _open_file(path) as f:
        img = _open_image(path, f, max_pixels)
        _decode(path, img, max_pixels)
        try:
            return to_rgb(img)  # while the file is open: TIFF reads its EXIF from it
        except BAD_DATA as e:  # a decoded image Pillow cannot convert: that file is broken, not the run
            raise ImageLoadError(
                f"{path}: cannot convert the decoded image to RGB ({type(e).__name__}: {e})", "corrupt"
            ) from None


_pillow_limit_lock = threading.Lock()


def _allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's own decompression-bomb limit to ``max_pixels`` when it is lower.

    Pillow refuses images over ``2 * Image.MAX_IMAGE_PIXELS`` (and warns above it) on its own; left
    alone, it would overrule a larger configured ``max_pixels``. The setting is process-wide, so it is
    only ever raised, to a limit someone asked for, never lowered (another caller may need more).
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        with _pillow_limit_lock:  # check again under the lock: a concurrent call may have raised it further
            if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
                Image.MAX_IMAGE_PIXELS = max_pixels


def _too_large(
    path: Path, max_pixels: int, size: tuple[int, int] | None = None, bomb: Exception | None = None
) -> ImageLoadError:
    if size is not None:
        what = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels"
    else:  # Pillow refused it before we saw its size; its message has the pixel count
        found = re.search(r"\((\d+) pixels\)", str(bomb))
        what = f"{found.group(1)} pixels" if found else f"more pixels than Pillow allows ({bomb})"
    message = f"{path}: image too large: {what} is over the limit of {max_pixels} pixels (max_pixels)"
    return ImageLoadError(message, "too large")


def _open_image(path: Path, f: BinaryIO, max_pixels: int) -> Image.Image:
    """The image in ``f`` with only its header read, or :class:`ImageLoadError` (empty file, not an
    image, more than ``max_pixels`` pixels)."""
    if os.fstat(f.fileno()).st_size == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes)", "empty file")
    _allow_pixels(max_pixels)
    try:
        img = Image.open(f)
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file PIL can read") from None
    # Pillow warns, or past twice its limit raises, only for an image over max_pixels (_allow_pixels).
    # Its warning is left to the warnings filters: changing them is not thread-safe, and scans run in
    # threads; where the filters turn it into an error, it is caught here.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large(path, max_pixels, bomb=e) from None
    except BAD_DATA as e:
        raise _undecodable(path, e, f) from None
    if img.width * img.height > max_pixels:
        raise _too_large(path, max_pixels, img.size)
    return img


def _undecodable(path: Path, e: Exception, f: BinaryIO | None = None) -> ImageLoadError:
    """The error for a file Pillow recognised but could not decode: cut off ("truncated": Pillow's
    message says so, the data ran out, or the file is shorter than its header says) or otherwise
    broken ("corrupt")."""
    if isinstance(e, EOFError) or "truncated" in str(e).lower() or _shorter_than_declared(f):
        return ImageLoadError(
            f"{path}: truncated file (its data ends too early), cannot decode image ({e})", "truncated"
        )
    return ImageLoadError(f"{path}: cannot decode image, corrupt data ({e})", "corrupt")


def _shorter_than_declared(f: BinaryIO | None) -> bool:
    """True for a file shorter than the length its header declares: a RIFF file (WebP), for which libwebp
    only says it "could not create decoder object", or a BMP, whose RLE decoder only says "not enough
    image data" when its data runs out."""
    if f is None:
        return False
    try:
        f.seek(0)
        head = f.read(12)
        size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError):  # closed or unseekable: no verdict
        return False
    if len(head) == 12 and head[:4] == b"RIFF":
        return size < struct.unpack("<I", head[4:8])[0] + 8
    return len(head) >= 6 and head[:2] == b"BM" and size < struct.unpack("<I", head[2:6])[0]


_truncation_lock = threading.Lock()
_decoding = 0  # decodes running under _refuse_truncated, in all threads
_saved_load_truncated = False


@contextmanager
def _refuse_truncated() -> Iterator[None]:
    """Decode with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off, even where the process turned it on.

    With it on, Pillow fills the missing part of a cut-off file with black (or stops early) and says
    nothing. It is a process-wide switch: the first of overlapping decodes (threads of a scan) turns it
    off and the last one puts the caller's value back.
    """
    global _decoding, _saved_load_truncated
    with _truncation_lock:
        if _decoding == 0:
            _saved_load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _decoding += 1
    try:
        yield
    finally:
        with _truncation_lock:
            _decoding -= 1
            if _decoding == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_load_truncated


def _decode(path: Path, img: Image.Image, max_pixels: int, all_frames: bool = False) -> None:
    """Decode frame 0 of ``img`` (the one the loader uses), or with ``all_frames`` every frame, in
    full, or raise :class:`ImageLoadError`."""
    try:
        with _refuse_truncated():
            for frame in range(getattr(img, "n_frames", 1) if all_frames else 1):  # no n_frames: one frame
                img.seek(frame)
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # a GIF frame or TIFF tile
        raise _too_large(path, max_pixels, bomb=e) from None
    except BAD_DATA as e:
        raise _undecodable(path, e, getattr(img, "fp", None)) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Normalise any PIL mode to RGB (see module docstring)."""
    # decoded first: Pillow turns a TIFF upright itself as it decodes it (and drops its Orientation tag), so an image
    # opened but not yet decoded (Image.open, given to Captioner or the overlays) said it needed a turn, and the
    # transpose below, which decodes it, turned it twice
    img.load()
    # read before turning it, which drops a TIFF's tags (and keeps the mode)
    top = _top_value(img) if img.mode in _HIGH_BIT_MODES else None
    turn = _UPRIGHT.get(_orientation(img))
    if turn is not None:
        # not ImageOps.exif_transpose: it also writes the EXIF block back, and raised on tags of an unexpected
        # type that cameras write (the image then failed to load although its pixels were fine)
        img = img.transpose(turn)
        # and the turned copy says so: it keeps no Orientation (EXIF, or XMP's tiff:Orientation, which getexif
        # also reads), or a second to_rgb (Captioner on a loaded image, the overlays) turned it again
        for key in _ORIENTATION_CARRIERS:
            img.info.pop(key, None)
    if img.mode in _HIGH_BIT_MODES:
        img = _to_8bit(img, top)
    if img.mode == "La":  # premultiplied alpha (in memory only) converts to RGBA through LA
        img = img.convert("LA")
    if img.mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in img.info:
        # an alpha band, or a transparent colour / palette entries (PNG tRNS, GIF): convert() turns
        # either into alpha, which is then laid over white
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


#: EXIF Orientation -> the turn that shows the image upright (the EXIF table, as Pillow's exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


#: the ``info`` entries Pillow's ``getexif`` reads an Orientation from
_ORIENTATION_CARRIERS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _orientation(img: Image.Image) -> int | None:
    """The image's EXIF Orientation, or None where it has none or an EXIF block Pillow cannot parse (then
    the image is shown as stored, as browsers do, rather than refused)."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation)
    except BAD_DATA:  # SyntaxError "not a TIFF file", struct.error, TypeError ...
        return None
    # a SHORT as the standard says, or a whole number stored as a RATIONAL or FLOAT (6/1, 6.0), which
    # exif_transpose turns too; anything else (a tuple, NaN) is no orientation
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            if value == int(value):
                return int(value)
        except (ValueError, OverflowError, ZeroDivisionError):
            pass
    return None


#: modes with more than 8 bits a sample: 16-bit, 32-bit integer and 32-bit float greyscale
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _top_value(img: Image.Image) -> float:
    """The value that becomes 255 (white) in ``img``: 1.0 for float ("F") images, the convention for
    float pixels; for integer modes the top of the bit depth the file declares (a TIFF's BitsPerSample,
    signed or not), else of 16 bits: Pillow opens 16-bit PNG, TIFF and PGM data as I;16 or I, PGM
    with other maxvals already stretched to 16 bits. The range is never guessed from the pixel values,
    which would make a dark image bright."""
    if img.mode == "F":
        return 1.0
    tags = getattr(img, "tag_v2", None)  # TIFF only
    bits = tags.get(258) if tags is not None else None  # BitsPerSample, one entry per band
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    if not isinstance(bits, int) or not 1 <= bits <= 32:
        bits = 16
    signed = tags is not None and tags.get(339) in (2, (2,))  # SampleFormat 2: two's complement
    return float(2 ** (bits - 1) - 1 if signed else 2**bits - 1)


def _to_8bit(img: Image.Image, top: float) -> Image.Image:
    """A high-bit-depth greyscale image as 8-bit "L", ``[0, top]`` scaled to ``[0, 255]``: values
    outside are clipped and NaN becomes black. A transparent grey level (16-bit PNG tRNS) becomes
    an alpha band ("LA"): after scaling, other levels could share its 8-bit value."""
    arr = np.asarray(img)
    scaled = np.nan_to_num(arr.astype(np.float64) * (255.0 / top), nan=0.0, posinf=255.0, neginf=0.0)  # (H,W)
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    transparent = img.info.get("transparency")
    if not isinstance(transparent, (int, float)):
        return grey
    alpha = Image.fromarray(np.where(arr == transparent, 0, 255).astype(np.uint8))  # (H,W)
    return Image.merge("LA", (grey, alpha))


#: formats whose files end with a marker: (marker, how many bytes at the end to look for it in).
#: Not MPO: every frame of it ends with the JPEG end marker, so a file cut early in its second frame
#: still has the first frame's marker near its end.
_END_MARKERS = {"JPEG": (b"\xff\xd9", 1024), "PNG": (b"IEND", 64)}


def check_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it can: a check for scanning a dataset,
    cheap where the format allows.

    JPEG and PNG files are read at the header and the last bytes only; one without its end marker past the
    start of its pixel data (a cut-off download) is then decoded in full to confirm. Other formats (MPO,
    GIF, BMP, TIFF, WebP ...) have no end marker to rely on and are always decoded in full, so a cut-off
    file of any format is found. Every frame is decoded: a multi-frame file (animated GIF, MPO) cut after
    its first frame is a broken download and reported "truncated", although :func:`load_image`, which uses
    frame 0 only, could still read it. Reasons (:attr:`ImageLoadError.reason`): "missing",
    "permission denied", "unreadable" (another error reading the file), "empty file", "not an image",
    "too large", "truncated", "corrupt".
    """
    path = Path(path)
    try:
        with _open_file(path) as f:
            img = _open_image(path, f, max_pixels)
            # Pillow reads the header up to the pixel data (JPEG: past the start-of-scan segment; PNG: to
            # the first IDAT), so this is where the pixels begin. An end marker counts only past it: a JPEG's
            # header may hold whole JPEGs (an EXIF thumbnail in APP1) with their own end markers, and a file
            # cut right after one still had that marker in its last bytes
            pixels_from = f.tell()
            marker, span = _END_MARKERS.get(img.format, (b"", 0))
            if marker:
                tail_from = max(0, os.fstat(f.fileno()).st_size - span)
                f.seek(tail_from)
                at = f.read().rfind(marker)
                if at >= 0 and tail_from + at >= pixels_from:
                    return None
                img = _open_image(path, f, max_pixels)  # again: reading the tail moved the file position
            _decode(path, img, max_pixels, all_frames=True)
    except ImageLoadError as e:
        return e.reason
    return None
