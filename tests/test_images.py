"""The image loader: every mode ends as RGB; every failure names the file and the cause."""

import builtins
import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.data.images import ImageLoadError, check_image, load_image


def test_rgba_is_composited_on_white(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(p)
    img = load_image(p)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(p)
    assert abs(load_image(p).getpixel((0, 0))[0] - 128) <= 1


@pytest.mark.parametrize(
    "make, cause",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello, not an image"), "not an image"),
        (lambda p: p.mkdir(), "directory"),
    ],
)
def test_bad_files_raise_with_path_and_cause(tmp_path, make, cause):
    p = tmp_path / "bad.jpg"
    make(p)
    with pytest.raises(ImageLoadError) as e:
        load_image(p)
    assert str(p) in str(e.value) and cause in str(e.value)


def test_truncated_jpeg_and_pixel_limit(tmp_path):
    p = tmp_path / "t.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(p, quality=95)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(ImageLoadError, match="t.jpg"):
        load_image(p)
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(big)
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(big, max_pixels=5000)


def _deny_reading(monkeypatch, path):
    """Make opening ``path`` fail as it does for a file without read permission (tests run as root here,
    where chmod does not stop reading)."""
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


def test_an_unreadable_file_is_reported_as_permission_denied_not_truncated(tmp_path, monkeypatch):
    p = tmp_path / "locked.jpg"
    Image.new("RGB", (8, 8)).save(p)
    _deny_reading(monkeypatch, p)
    with pytest.raises(ImageLoadError) as e:
        load_image(p)
    assert str(e.value).startswith(f"{p}: ") and "permission denied" in str(e.value)
    assert "truncated" not in str(e.value) and "decode" not in str(e.value)
    assert check_image(p) == "permission denied"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files without permission")
def test_a_file_without_read_permission_is_reported_as_such(tmp_path):
    p = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(p)
    p.chmod(0)
    try:
        with pytest.raises(ImageLoadError, match="permission denied"):
            load_image(p)
        assert check_image(p) == "permission denied"
    finally:
        p.chmod(0o644)
