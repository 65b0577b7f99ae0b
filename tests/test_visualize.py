"""Attention overlays: maps land on the cells they weigh, equal weights look equal, shapes are kept."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.visualize import attention_figure, heatmap, label_height, overlay


def _centre(row: int, col: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """(y, x) pixel at the centre of grid cell (row, col) on a (width, height) panel."""
    (gh, gw), (w, h) = grid, size
    return int((row + 0.5) * h / gh), int((col + 0.5) * w / gw)


def test_a_border_cell_peaks_inside_itself_and_equal_weights_look_equal():
    """Bicubic upsampling overshot at the border: a corner cell peaked at the image corner (1.26 against
    1.0 at its centre) and, of two cells with the same weight, the one at the edge looked hotter."""
    one = torch.zeros(8, 8)
    one[0, 7] = 1.0
    heat = heatmap(one, 224, 224)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 0 <= y < 28 and 196 <= x < 224  # inside cell (0, 7)
    cy, cx = _centre(0, 7, (8, 8), (224, 224))
    assert heat[cy, cx] >= 0.95
    two = torch.zeros(8, 8)
    two[0, 0] = two[3, 3] = 0.5
    heat = heatmap(two, 224, 224)
    assert abs(heat[_centre(0, 0, (8, 8), (224, 224))] - heat[_centre(3, 3, (8, 8), (224, 224))]) < 0.02


def test_a_diffuse_map_looks_diffuse_and_a_uniform_one_uniform():
    """Min-max scaling stretched any map over the whole colour ramp: weights between 0.0147 and 0.0176 (a
    model looking nowhere in particular) were drawn from 0 to 1, as focused as a one-hot map, and an exactly
    uniform map was drawn as 0 everywhere, as if the word attended to nothing."""
    diffuse = torch.full((8, 8), 1.0)
    diffuse[2, 5] = 1.2
    diffuse /= diffuse.sum()
    heat = heatmap(diffuse, 224, 224)
    assert heat[_centre(2, 5, (8, 8), (224, 224))] > 0.99
    assert heat[_centre(6, 1, (8, 8), (224, 224))] == pytest.approx(1 / 1.2, abs=0.01)  # as the weights are
    uniform = heatmap(torch.full((8, 8), 1 / 64), 224, 224)
    assert uniform.min() == pytest.approx(1.0) and uniform.max() == pytest.approx(1.0)


def test_a_wide_image_keeps_its_shape_and_the_grid_covers_it_row_major():
    image = Image.new("RGB", (400, 200), (200, 200, 200))
    one = torch.zeros(2, 4)
    one[0, 3] = 1.0  # top right
    heat = heatmap(one, 224, 112)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert y < 56 and x >= 168
    fig = attention_figure(image, ["a", "b"], torch.stack([one, one.flip(0)]), panel_size=224)
    strip = label_height(224)  # each word above its panel
    assert fig.size == (3 * (224 + 4) + 4, strip + 112 + 8)  # three 224x112 panels in a row, 4 px apart
    tall = attention_figure(image.rotate(90, expand=True), ["a"], one.t()[None], panel_size=224)
    assert tall.size == (2 * (112 + 4) + 4, strip + 224 + 8)


def test_the_figure_draws_the_image_as_the_model_saw_it(tmp_path):
    """Captioner normalises a PIL image (EXIF orientation, 16-bit grey, transparency on white) before
    the encoder; the figure drew it as stored (convert("RGB")): an EXIF-rotated photo lay on its side
    under maps computed on the upright one, 16-bit grey showed white and transparency black."""
    stored = Image.new("RGB", (120, 60), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 60, 60))  # left half red as stored: the top half once upright
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    photo = Image.open(tmp_path / "rotated.jpg")
    one = torch.zeros(1, 2, 2)
    one[0, 0, 0] = 1.0  # top-left cell of the upright image
    fig = attention_figure(photo, ["a"], one, panel_size=224)
    strip = label_height(224)
    assert fig.size == (2 * (112 + 4) + 4, strip + 224 + 8)  # two upright 112x224 panels, not 224x112
    panel = np.asarray(fig, dtype=np.float32)[4 + strip : 4 + strip + 224, 4 : 4 + 112]  # the image panel (H,W,3)
    assert panel[150:, :, 0].mean() < 60  # black at the bottom of the upright image
    top = panel[10:100, 10:100]  # red at the top of the upright image
    assert top[..., 0].mean() > 200 and top[..., 2].mean() < 60
    grey = Image.fromarray(np.full((32, 32), 20000, dtype=np.uint16))  # 16-bit, about 31% of full scale
    assert grey.mode == "I;16"
    panel = np.asarray(attention_figure(grey, [], torch.zeros(0, 2, 2), panel_size=64))[40:60, 10:60]
    assert abs(panel.mean() - 78) < 3  # 20000 / 65535 * 255, not white
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent: on white, as the model saw it
    panel = np.asarray(attention_figure(clear, [], torch.zeros(0, 2, 2), panel_size=64))[40:60, 10:60]
    assert panel.min() == 255


def test_a_panorama_gets_panels_with_room_for_the_word_and_the_map_still_on_its_cell():
    """A 3000x2 image kept its shape as 224x1 panels: no room for the word, the map a line of pixels. Panels
    stop at 4:1 (stretched: the model saw the image squashed to a square anyway); the map stays on its cell."""
    image = Image.new("RGB", (3000, 2), (200, 200, 200))
    one = torch.zeros(1, 2, 4)
    one[0, 1, 3] = 1.0  # bottom right
    fig = attention_figure(image, ["a"], one, panel_size=224)
    strip = label_height(224)
    assert fig.size == (2 * (224 + 4) + 4, strip + 56 + 8)  # two 224x56 panels
    panel = np.asarray(fig, dtype=np.float32)[4 + strip : 4 + strip + 56, 4 + 228 : 4 + 228 + 224]  # (H,W,3)
    red = panel[..., 0] - panel[..., 2]  # the ramp's hot end is red, its cold end blue
    y, x = np.unravel_index(red.argmax(), red.shape)
    assert y >= 28 and x >= 168  # in the bottom-right cell
    assert red[42, 196] > 50 and red[42, 28] < -50  # hot there, cold in the bottom-left cell
    tall = attention_figure(image.rotate(90, expand=True), [], torch.zeros(0, 4, 2), panel_size=224)
    assert tall.size == (56 + 8, strip + 224 + 8)


def test_the_word_sits_above_its_panel_not_over_the_top_left_cells():
    """The label was a black box on the panel's top-left corner: a word attending the top-left cells showed a
    sliver of their heat. Now every pixel of a word's panel is the overlay's."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    one = torch.zeros(1, 8, 8)
    one[0, 0, 0] = 1.0  # the top-left cell
    fig = np.asarray(attention_figure(image, ["triangle"], one, panel_size=224), dtype=np.int16)
    strip = label_height(224)
    panel = fig[4 + strip : 4 + strip + 224, 4 + 228 : 4 + 228 + 224]
    want = np.asarray(overlay(image.resize((224, 224), Image.BICUBIC), one[0], 224), dtype=np.int16)
    assert np.abs(panel - want).max() <= 1
    assert (fig[4 : 4 + strip, 4 + 228 : 4 + 228 + 224] < 128).any()  # the word is written above


@pytest.mark.parametrize(
    ("words", "attention"),
    [(["a", "man's", "hat"], torch.zeros(4, 2, 2)), (["a", "b"], torch.zeros(1, 2, 2)), (["a"], torch.zeros(1, 4))],
)
def test_words_and_maps_that_do_not_pair_up_are_refused(words, attention):
    """Fewer words than maps drew a word with another's map, more raised a bare IndexError, and a flat (T,N)
    map a TypeError from deep inside."""
    with pytest.raises(ValueError, match="one map per word"):
        attention_figure(Image.new("RGB", (32, 32)), words, attention)


def _label_strip(word: str) -> np.ndarray:
    """The label strip that ``attention_figure`` draws above the panel of the one word ``word``."""
    fig = attention_figure(Image.new("RGB", (64, 64)), [word], torch.full((1, 2, 2), 0.25), panel_size=64)
    return np.asarray(fig)[4 : 4 + label_height(64), 72:136]


def test_a_word_beyond_latin_1_never_stops_the_figure_and_is_drawn_where_a_font_has_it(monkeypatch):
    """Pillow's bitmap font (Pillow < 10.1, or without FreeType) raised UnicodeEncodeError on such a word, which
    stopped infer.py before the next image's caption; its default font drew "café" as "caf" and a box. A system
    TrueType font is taken first (LABEL_FONTS), and a bitmap font draws what it cannot encode as "?"."""
    from PIL import ImageFont

    from captioning import visualize

    assert (_label_strip("café") < 128).any()  # drawn, whichever font this system has
    if isinstance(getattr(visualize._font(12), "path", None), str):  # a font file of the system's (LABEL_FONTS)
        # a font with the letter draws it unlike a code point no font has (both were the same box)
        assert not np.array_equal(_label_strip("é"), _label_strip("\u0378"))

    # Pillow without FreeType: truetype raises ImportError (not OSError), load_default(size=...) too, and only
    # load_default() gives its bitmap font
    def no_freetype(*args, **kwargs):
        raise ImportError("The _imagingft C module is not installed")

    monkeypatch.setattr(ImageFont, "truetype", no_freetype)
    monkeypatch.setattr(ImageFont, "core", object())  # what Pillow holds there without the module
    monkeypatch.setattr(visualize, "_font", functools.cache(visualize._font.__wrapped__))
    assert type(visualize._font(12)) is ImageFont.ImageFont
    assert np.array_equal(_label_strip("圆 café"), _label_strip("? café"))


@pytest.mark.parametrize("option, value", [("columns", 0), ("columns", -1), ("panel_size", 0), ("columns", 2.5)])
def test_a_figure_refuses_a_layout_it_cannot_draw_naming_the_option(option, value):
    """columns 0 was a ZeroDivisionError, -1 PIL's "Width and height must be >= 0"."""
    with pytest.raises(ValueError, match=f"{option} must be a whole number of at least 1, got {value}"):
        attention_figure(Image.new("RGB", (32, 32)), ["a"], torch.ones(1, 2, 2) / 4, **{option: value})


def _labels(monkeypatch, words, attention, panel_size=224) -> list[str]:
    """The texts attention_figure writes on its label strips."""
    from PIL import ImageDraw

    drawn = []
    real = ImageDraw.ImageDraw.text
    monkeypatch.setattr(
        ImageDraw.ImageDraw,
        "text",
        lambda self, xy, text, *a, **kw: drawn.append(text) or real(self, xy, text, *a, **kw),
    )
    attention_figure(Image.new("RGB", (64, 64)), words, attention, panel_size=panel_size)
    return drawn


def test_each_label_gives_its_maps_peak_weight_and_a_word_too_long_is_shortened_visibly(monkeypatch):
    """Each panel is scaled to its own peak, so 30% and 90% on one cell both showed a red spot, with nothing to tell
    them apart; a long word was cut at the strip's edge without a mark ("skateboarder", "skateboarding")."""
    maps = torch.full((3, 2, 2), 0.25)
    maps[0] = torch.tensor([[0.9, 0.1 / 3], [0.1 / 3, 0.1 / 3]])
    maps[1] = torch.tensor([[0.3, 0.7 / 3], [0.7 / 3, 0.7 / 3]])
    assert _labels(monkeypatch, ["a", "b", "c"], maps) == ["<image>", "a 90%", "b 30%", "c 25%"]
    monkeypatch.undo()
    short = _labels(monkeypatch, ["skateboarding"], torch.full((1, 8, 8), 1 / 64), panel_size=64)[1]
    assert short.endswith("… 1.6%") and short.startswith("s") and len(short) < len("skateboarding 1.6%")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_a_map_that_is_not_weights_is_refused_naming_its_word(bad):
    """A NaN or inf ended in an IndexError from the colour ramp (stopping infer.py), a negative map drew a blank
    panel."""
    maps = torch.full((2, 2, 2), 0.25)
    maps[1, 0, 1] = bad
    with pytest.raises(ValueError, match=r"the attention map of word 1 \('dog'\) has weights that are not finite"):
        attention_figure(Image.new("RGB", (32, 32)), ["a", "dog"], maps)


def test_maps_that_require_grad_are_drawn():
    """Maps straight from a teacher-forced forward (requires_grad) raised "Can't call numpy() on Tensor"."""
    maps = torch.full((1, 2, 2), 0.25, requires_grad=True)
    assert attention_figure(Image.new("RGB", (32, 32)), ["a"], maps).mode == "RGB"
    assert heatmap(maps[0], 8, 8).shape == (8, 8)
