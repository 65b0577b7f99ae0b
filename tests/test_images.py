"""The image loader: every mode ends as RGB; every failure names the file and the cause."""

import builtins
import errno
import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from captioning.data.images import MAX_PIXELS, ImageLoadError, check_image, load_image, to_rgb


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


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` pixels over a few bytes of image data: Pillow
    opens it without decoding, so a huge size costs nothing to test."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )


def test_an_image_over_pillows_own_bomb_limit_is_reported_as_too_large(tmp_path):
    p = tmp_path / "huge.png"
    _png_header_only(p, 20_000, 10_000)  # 200M pixels: Pillow's DecompressionBombError, not "not an image"
    with pytest.raises(ImageLoadError) as e:
        load_image(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: image too large: ") and "200000000 pixels" in msg and str(MAX_PIXELS) in msg
    assert e.value.reason == "too large" and check_image(p) == "too large"


def test_max_pixels_is_the_limit_that_applies_even_above_pillows_own(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over 2000 pixels, warns over 1000
    ok, big = tmp_path / "ok.png", tmp_path / "big.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(ok)  # 4096 pixels
    Image.new("RGB", (100, 100)).save(big)  # 10000 pixels
    assert load_image(ok, max_pixels=5000).getpixel((0, 0)) == (1, 2, 3)
    assert check_image(ok, max_pixels=5000) is None
    with pytest.raises(ImageLoadError) as e:
        load_image(big, max_pixels=5000)
    assert (
        str(e.value) == f"{big}: image too large: 100x100 = 10000 pixels is over the limit of 5000 pixels (max_pixels)"
    )
    assert check_image(big, max_pixels=5000) == "too large"


def test_the_data_loaders_apply_the_configured_max_pixels(tmp_path, monkeypatch):
    from captioning.data.datamodule import EvalImages, TrainCaptions
    from captioning.data.features import FAILED, OK, _Images
    from captioning.data.records import CaptionRecord
    from captioning.data.transforms import EvalTransform
    from captioning.vocab import Vocabulary

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    p = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 0, 0)).save(p)  # 4096 pixels
    records = [CaptionRecord(p, ["a red square"], [["a", "red", "square"]], "a", "train")]
    t = EvalTransform(16)
    vocab = Vocabulary.build([["a", "red", "square"]])
    for limit, loads in [(5000, True), (4095, False)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            items = [
                EvalImages(records, t, max_pixels=limit)[0],
                TrainCaptions(records, vocab, t, 8, max_pixels=limit)[0, 0],
            ]
        assert all((item is not None) == loads for item in items), limit
        assert loads or sum("image too large" in str(w.message) for w in caught) == 2
        # the cache build's word on the row: OK, or refused for good (not unreadable, which is rechecked later)
        assert _Images([p], t, max_pixels=limit)[0][2] == (OK if loads else FAILED)


def _noise(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    """Random pixels: they do not compress, so a cut at a fraction of the file is that far into the pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _two_frames(fmt: str):
    def save(img: Image.Image, path: Path) -> None:
        img.save(path, format=fmt, save_all=True, append_images=[_noise(seed=1)])

    return save


def _bmp_rle8(img: Image.Image, path: Path) -> None:
    """An 8-bit RLE-compressed BMP, written by hand: Pillow's BMP writer ignores ``compression="rle8"`` and
    wrote an uncompressed file, so the RLE decoder was never reached. One run of one pixel per pixel."""
    p = img.quantize(256)
    w, h = p.size
    pal = (p.getpalette() + [0] * 768)[:768]
    palette = b"".join(bytes([pal[3 * i + 2], pal[3 * i + 1], pal[3 * i], 0]) for i in range(256))  # BGR0
    data = bytearray()
    for row in np.asarray(p)[::-1].tolist():  # bottom row first
        data += b"".join(bytes([1, v]) for v in row) + b"\x00\x00"  # runs, then end of line
    data += b"\x00\x01"  # end of bitmap
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 1, len(data), 2835, 2835, 256, 0)  # compression 1: RLE8
    path.write_bytes(b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data)
    with Image.open(path) as check:
        assert check.info["compression"] == 1 and np.array_equal(np.asarray(check), np.asarray(p))


#: format -> how to write an image in it
FORMATS = {
    "jpeg": lambda img, p: img.save(p, format="JPEG", quality=95),
    "png": lambda img, p: img.save(p, format="PNG"),
    "bmp": lambda img, p: img.save(p, format="BMP"),
    "bmp-rle": lambda img, p: _bmp_rle8(img, p),
    "gif": lambda img, p: img.save(p, format="GIF"),
    "tiff": lambda img, p: img.save(p, format="TIFF"),
    "mpo": _two_frames("MPO"),
    "ppm": lambda img, p: img.save(p, format="PPM"),
    "tga": lambda img, p: img.save(p, format="TGA"),
    "webp": lambda img, p: img.save(p, format="WEBP", lossless=True),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_cut_off_file_of_any_format_is_reported_as_truncated(tmp_path, fmt):
    if fmt == "webp" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    p = tmp_path / f"cut.{fmt}"
    FORMATS[fmt](_noise(), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 5])  # inside the first frame's pixels: a broken download
    with pytest.raises(ImageLoadError) as e:
        load_image(p)
    assert str(e.value).startswith(f"{p}: truncated file") and e.value.reason == "truncated"
    assert check_image(p) == "truncated"


@pytest.mark.parametrize("fmt", ["GIF", "MPO"])
def test_a_multi_frame_file_cut_in_a_later_frame_fails_the_scan_but_its_first_frame_loads(tmp_path, fmt):
    p = tmp_path / f"cut.{fmt.lower()}"
    _two_frames(fmt)(_noise(), p)
    assert check_image(p) is None
    first = np.asarray(load_image(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 9 // 10])
    assert check_image(p) == "truncated"
    assert np.array_equal(np.asarray(load_image(p)), first)


def test_truncated_files_are_refused_even_where_pillow_is_told_to_load_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some programs set it
    p = tmp_path / "cut.bmp"
    _noise().save(p)
    p.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(p)
    assert check_image(p) == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the program's own setting is back


def _greys(path: Path) -> list[int]:
    img = load_image(path)
    assert img.mode == "RGB"
    return [img.getpixel((x, 0))[0] for x in range(img.width)]


def test_float_images_are_read_in_0_1_and_clipped(tmp_path):
    p = tmp_path / "f.tiff"
    values = [0.0, 0.25, 0.5, 1.0, 1.5, -0.5, float("nan")]
    Image.fromarray(np.array([values], dtype=np.float32)).save(p)  # mode F
    assert Image.open(p).mode == "F"
    assert _greys(p) == [0, 64, 128, 255, 255, 0, 0]


def test_16_bit_data_opened_as_mode_I_is_scaled_by_16_bits_even_when_dark(tmp_path):
    p = tmp_path / "dark.pgm"
    # a 16-bit PGM (Pillow opens it as mode "I") whose brightest pixel is 255 of 65535: nearly black,
    # not stretched to white because its values happen to fit in 8 bits
    p.write_bytes(b"P5\n3 1\n65535\n" + np.array([[0, 128, 255]], dtype=">u2").tobytes())
    assert Image.open(p).mode == "I"
    assert _greys(p) == [0, 0, 1]
    p.write_bytes(b"P5\n3 1\n65535\n" + np.array([[255, 32768, 65535]], dtype=">u2").tobytes())
    assert _greys(p) == [1, 128, 255]


def test_a_32_bit_tiff_is_scaled_by_its_own_bit_depth(tmp_path):
    p = tmp_path / "i32.tiff"
    Image.fromarray(np.array([[0, 2**30, 2**31 - 1, -5]], dtype=np.int32)).save(p)  # signed 32-bit samples
    assert Image.open(p).mode == "I"
    assert _greys(p) == [0, 128, 255, 0]


WHITE, RED = (255, 255, 255), (200, 0, 0)


def _row(mode: str, pixels: list) -> Image.Image:
    img = Image.new(mode, (len(pixels), 1))
    img.putdata(pixels)
    return img


def _palette_row(mode: str, indices: list) -> Image.Image:
    img = _row(mode, indices)
    img.putpalette([10, 20, 30, *RED])  # index 0: a dark blue, 1: red
    return img


#: name -> (write the file, the RGB pixels load_image must give): every kind of transparency on white
TRANSPARENT = {
    "rgb_trns.png": (lambda p: _row("RGB", [(10, 20, 30), RED]).save(p, transparency=(10, 20, 30)), [WHITE, RED]),
    "l_trns.png": (lambda p: _row("L", [40, 90]).save(p, transparency=40), [WHITE, (90, 90, 90)]),
    # 1001 and the transparent 1000 are both 4 in 8 bits: only the transparent level turns white
    "i16_trns.png": (
        lambda p: Image.fromarray(np.array([[1000, 1001, 60000]], dtype=np.uint16)).save(p, transparency=1000),
        [WHITE, (4, 4, 4), (233, 233, 233)],
    ),
    "p_trns.png": (lambda p: _palette_row("P", [0, 1]).save(p, transparency=0), [WHITE, RED]),
    "p_trns.gif": (lambda p: _palette_row("P", [0, 1]).save(p, transparency=0), [WHITE, RED]),
    "la.png": (lambda p: _row("LA", [(40, 0), (90, 255)]).save(p), [WHITE, (90, 90, 90)]),
    "rgba.png": (
        lambda p: _row("RGBA", [(10, 20, 30, 0), (*RED, 255), (0, 0, 0, 128)]).save(p),
        [WHITE, RED, (127,) * 3],
    ),
}


@pytest.mark.parametrize("name", TRANSPARENT)
def test_every_kind_of_transparency_is_composited_on_white(tmp_path, name):
    write, want = TRANSPARENT[name]
    p = tmp_path / name
    write(p)
    img = load_image(p)
    assert img.mode == "RGB"
    got = [img.getpixel((x, 0)) for x in range(img.width)]
    assert all(max(abs(a - b) for a, b in zip(g, w)) <= 1 for g, w in zip(got, want)), (got, want)


def test_palette_with_alpha_in_memory_is_composited_on_white():
    pa = _palette_row("PA", [0, 1])  # Pillow cannot write PA files; a program can hand one to the captioner
    pa.putalpha(_row("L", [0, 255]))
    img = to_rgb(pa)
    assert img.mode == "RGB" and [img.getpixel((x, 0)) for x in range(2)] == [WHITE, RED]


def test_a_jpeg_cut_right_after_an_exif_thumbnail_fails_the_scan(tmp_path):
    """A camera JPEG carries a whole JPEG thumbnail (with its own end marker) in its EXIF header. Cut soon after
    the header, the file's last bytes still held the thumbnail's end marker, so the set-up scan passed it and
    the cut was found only when the image was loaded in training; an end marker now counts only past the
    start of the pixel data."""
    thumb, main = io.BytesIO(), io.BytesIO()
    _noise(16, 16, seed=1).save(thumb, format="JPEG")
    _noise(seed=2).save(main, format="JPEG", quality=95)
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x00" + b"\x00\x00\x00\x00"  # big-endian, one empty IFD
    exif = b"Exif\x00\x00" + tiff + thumb.getvalue()  # the thumbnail where IFD1 would point
    header = b"\xff\xd8" + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif
    p = tmp_path / "camera.jpg"
    p.write_bytes(header + main.getvalue()[2:])
    assert check_image(p) is None and load_image(p).size == (48, 40)  # whole, it passes and loads
    p.write_bytes((header + main.getvalue()[2:])[: len(header) + 700])  # cut 700 bytes after the header
    assert check_image(p) == "truncated"
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(p)


def test_exif_pillow_cannot_rewrite_or_parse_does_not_stop_an_image_from_loading(tmp_path):
    """Cameras write EXIF tags with unexpected types, and some files carry an EXIF block with no TIFF header.
    ImageOps.exif_transpose raised TypeError on the first (it writes the EXIF back) and getexif SyntaxError on
    the second, past the set-up scan: training stopped at that batch with an error naming no file. Now the
    first is turned upright from its Orientation, the second shown as stored."""
    # big-endian IFD0: PrimaryChromaticities (a RATIONAL tag) written as ASCII, then Orientation 6
    entries = [struct.pack(">HHI4s", 0x013F, 2, 4, b"abc\0"), struct.pack(">HHIH2x", 0x0112, 3, 1, 6)]
    tiff = b"MM\x00\x2a" + struct.pack(">IH", 8, len(entries)) + b"".join(entries) + b"\0\0\0\0"
    p = tmp_path / "camera.jpg"
    _row("RGB", [RED, RED, WHITE]).save(p, "JPEG", quality=100, exif=b"Exif\x00\x00" + tiff)
    assert check_image(p) is None
    img = load_image(p)  # stored 3x1, red on the left: Orientation 6 shows it turned 90 degrees clockwise
    top, bottom = img.getpixel((0, 0)), img.getpixel((0, 2))
    assert img.size == (1, 3) and top[0] - top[1] > 100 and min(bottom) > 200, (top, bottom)
    # Orientation written as a RATIONAL 6/1 (one entry; its 8-byte value after the IFD): turned as exif_transpose does
    tiff = b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + struct.pack(">HHII", 0x0112, 5, 1, 26) + b"\0\0\0\0"
    rational = tmp_path / "rational.png"
    _row("RGB", [RED, RED, WHITE]).save(rational, exif=b"Exif\x00\x00" + tiff + struct.pack(">II", 6, 1))
    assert load_image(rational).size == (1, 3)
    for fmt in ("png", "webp"):
        q = tmp_path / f"no_tiff_header.{fmt}"
        _row("RGB", [RED, WHITE]).save(q, exif=b"MX\x00*\x00\x00\x00\x08", lossless=True)
        assert check_image(q) is None and load_image(q).size == (2, 1)


def _tiff_with_text_strip_offsets() -> bytes:
    buf = io.BytesIO()
    _row("RGB", [RED, WHITE]).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        if struct.unpack_from("<H", data, ifd + 2 + 12 * k)[0] == 273:  # StripOffsets: LONG -> ASCII
            struct.pack_into("<H", data, ifd + 2 + 12 * k + 2, 2)
    return bytes(data)


def _dds_with_unknown_pixel_format() -> bytes:
    buf = io.BytesIO()
    _row("RGBA", [(*RED, 255), (*WHITE, 255)]).save(buf, "DDS")
    data = bytearray(buf.getvalue())
    struct.pack_into("<I", data, 80, 0x100000)  # DDS_PIXELFORMAT.dwFlags: no flag Pillow knows
    return bytes(data)


@pytest.mark.parametrize(
    "name, make",
    [("bad.tif", _tiff_with_text_strip_offsets), ("bad.jpg", _dds_with_unknown_pixel_format)],
    ids=["TypeError", "NotImplementedError"],
)
def test_a_file_pillow_refuses_with_an_unusual_exception_is_reported_corrupt_not_raised(tmp_path, name, make):
    """A TIFF whose StripOffsets tag is stored as text made Pillow raise TypeError, and a DDS (whatever its name:
    Pillow reads the content) with a pixel format it does not know NotImplementedError: the scan did not catch
    them, so the whole set-up stopped with an error naming no file, instead of leaving the image out."""
    p = tmp_path / name
    p.write_bytes(make())
    assert check_image(p) == "corrupt"
    with pytest.raises(ImageLoadError, match=rf"{name}: cannot decode image, corrupt data") as e:
        load_image(p)
    assert e.value.reason == "corrupt"


def test_an_image_that_decodes_but_fails_to_convert_is_an_image_load_error(tmp_path, monkeypatch):
    """Whatever else Pillow raises while converting a decoded image (a file's odd metadata) is that file's
    error, named, for the loader to skip, not an exception that stops training."""
    import captioning.data.images as images

    def broken(img):
        raise TypeError("bad operand type")

    p = tmp_path / "odd.png"
    _row("RGB", [RED]).save(p)
    monkeypatch.setattr(images, "to_rgb", broken)
    with pytest.raises(ImageLoadError, match=r"odd\.png: cannot convert .*TypeError: bad operand type") as e:
        load_image(p)
    assert e.value.reason == "corrupt"

    def bug(img):  # but a programming error is not a bad image: it stops the run
        return undefined_name  # noqa: F821

    monkeypatch.setattr(images, "to_rgb", bug)
    with pytest.raises(NameError):
        load_image(p)


@pytest.mark.parametrize("carrier", ["exif", "xmp"])
def test_an_image_turned_upright_is_not_turned_again(tmp_path, carrier):
    """The loaded image kept its Orientation tag after being turned, so converting it again (Captioner on a
    loaded image, as infer.py does; each overlay panel) turned it a second time: the model captioned a
    rotated photo and the attention maps lay over another picture than the one shown."""
    from PIL import PngImagePlugin

    p = tmp_path / "turned.png"
    meta = PngImagePlugin.PngInfo()
    if carrier == "xmp":  # Pillow's getexif also reads XMP's tiff:Orientation
        meta.add_itxt("XML:com.adobe.xmp", '<rdf:Description tiff:Orientation="6"/>')
    exif = Image.Exif()
    exif[0x0112] = 6
    _row("RGB", [RED, RED, WHITE]).save(p, pnginfo=meta, **({"exif": exif} if carrier == "exif" else {}))
    img = load_image(p)
    assert img.size == (1, 3)  # turned once
    again = to_rgb(img)
    assert again.size == (1, 3) and list(again.getdata()) == list(img.getdata())
    assert to_rgb(to_rgb(Image.open(p))).size == (1, 3)  # a PIL image handed to the captioner, converted twice


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "JPEG"])
def test_an_opened_image_with_an_orientation_is_turned_once(tmp_path, fmt, orientation):
    """Pillow turns a TIFF upright itself as it decodes it: given opened but not decoded (Image.open, as the README's
    Python example hands images to Captioner and the overlays), to_rgb read its Orientation, then decoded it in the
    transpose, and turned it a second time (another caption, maps drawn over a turned picture). Loaded by path it
    was right. Every format, opened or by path, now gives the same upright pixels."""
    p = tmp_path / f"turned.{fmt.lower()}"
    exif = Image.Exif()
    exif[0x0112] = orientation
    _row("RGB", [RED, RED, WHITE, WHITE]).save(p, fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    by_path = load_image(p)
    assert by_path.size == ((4, 1) if orientation == 3 else (1, 4))
    opened = to_rgb(Image.open(p))
    assert opened.size == by_path.size and list(opened.getdata()) == list(by_path.getdata())
