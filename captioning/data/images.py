"""The one image loader, shared by training and inference.

Whatever the file holds, the result is an 8-bit RGB image: EXIF orientation applied,
transparency composited on white, 16-bit greyscale scaled (not clipped) to 8 bits, CMYK /
greyscale / palette converted, frame 0 of animations. Every failure raises
:class:`ImageLoadError` naming the file and the cause; its ``reason`` is the short word
:func:`check_image` gives for the same file.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

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


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an 8-bit RGB PIL image, or raise :class:`ImageLoadError`.

    ``max_pixels`` is the one pixel limit: an image over it is refused before decoding, one under it
    is loaded even when that is over Pillow's own decompression-bomb limit (see :func:`_allow_pixels`).
    """
    path = Path(path)
    with _open_file(path) as f:
        img = _open_image(path, f, max_pixels)
        _decode(path, img, max_pixels)
        return to_rgb(img)  # while the file is open: TIFF reads its EXIF from it


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
    # an image over Pillow's limit is over max_pixels too (_allow_pixels); the warning is an error
    # only where warnings are turned into errors
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large(path, max_pixels, bomb=e) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{path}: cannot decode image ({e})", "truncated") from None
    if img.width * img.height > max_pixels:
        raise _too_large(path, max_pixels, img.size)
    return img


def _decode(path: Path, img: Image.Image, max_pixels: int) -> None:
    """Decode frame 0 of ``img`` (the one the loader uses) in full, or raise :class:`ImageLoadError`."""
    try:
        img.seek(0)
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # a GIF frame or TIFF tile
        raise _too_large(path, max_pixels, bomb=e) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{path}: cannot decode image ({e})", "truncated") from None


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
            img = _open_image(path, f, max_pixels)
            marker, span = markers.get(img.format, (b"", 0))
            if not marker:
                return None
            f.seek(max(0, os.fstat(f.fileno()).st_size - span))
            if marker in f.read():
                return None
        load_image(path, max_pixels)  # no end marker: decode it all to confirm
    except ImageLoadError as e:
        return e.reason
    return None
