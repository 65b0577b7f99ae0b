"""The one image loader, shared by training and inference.

Whatever the file holds, the result is an 8-bit RGB image: EXIF orientation applied,
transparency composited on white, 16-bit greyscale scaled (not clipped) to 8 bits, CMYK /
greyscale / palette converted, frame 0 of animations. Every failure raises
:class:`ImageLoadError` naming the file and the cause; its ``reason`` is the short word
:func:`check_image` gives for the same file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

#: images with more pixels than this are refused before decoding (decompression bombs)
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


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an 8-bit RGB PIL image, or raise :class:`ImageLoadError`."""
    path = Path(path)
    with _open_file(path) as f:
        return _load(path, f, max_pixels)


def _load(path: Path, f: BinaryIO, max_pixels: int) -> Image.Image:
    if os.fstat(f.fileno()).st_size == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes)", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageLoadError(f"{path}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels}", "too large")
            img.seek(0)  # animated images: first frame
            img.load()
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: cannot decode image ({e})", "truncated") from None
    return to_rgb(img)  # while the file is open: TIFF reads its EXIF from it


def to_rgb(img: Image.Image) -> Image.Image:
    """Normalise any PIL mode to RGB (see module docstring)."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        # only then: exif_transpose copies even an image it does not turn, and this runs per loaded image
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def check_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it can: a cheap check for scanning a dataset.

    Reads the header and the last bytes only. A JPEG without its end marker or a PNG without its
    IEND chunk (a cut-off download) is then fully decoded to confirm. Reasons: "missing",
    "permission denied", "unreadable" (another error reading the file), "empty file", "not an image",
    "too large", "truncated".
    """
    path = Path(path)
    markers = {"JPEG": (b"\xff\xd9", 1024), "PNG": (b"IEND", 64)}
    try:
        # one open for the header and the tail; no warnings filter here: scans run in threads, and
        # changing the global filters from several threads is not safe
        with _open_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return "empty file"
            img = Image.open(f)
            w, h = img.size
            marker, span = markers.get(img.format, (b"", 0))
            if w * h > max_pixels:
                return "too large"
            if not marker:
                return None
            f.seek(max(0, size - span))
            complete = marker in f.read()
    except ImageLoadError as e:
        return e.reason
    except (UnidentifiedImageError, Image.DecompressionBombError):
        return "not an image"
    except (OSError, SyntaxError, ValueError):
        return "truncated"
    if not complete:
        try:
            load_image(path, max_pixels)
        except ImageLoadError as e:
            return e.reason
    return None
