"""Attention overlays: the only file that draws.

One panel for the image, then one per generated word with its attention map upsampled to the image
(linear between the cells' centres, each cell at the centre of the image window its features were
computed from: :class:`~captioning.models.base.CellCentres`, which a caption carries; no overshoot,
the nearest cell's value past the outermost centres), coloured and blended over it, the word written
on the panel. Panels keep the image's aspect ratio (up to 4:1; longer images are stretched to it): the
model saw the whole image (squashed to its input size, not cropped), so the grid covers the whole
picture however it is shaped. The image is drawn as the model saw it: a PIL image given as it was
opened is normalised like the loader does (EXIF orientation, transparency on white, 16-bit greyscale
scaled), so the maps land where the model looked.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from captioning.data.images import to_rgb
from captioning.models.base import CellCentres

# a "jet"-like colour ramp: dark blue -> cyan -> yellow -> red
_RAMP = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], dtype=np.float32)


def _colorize(values: np.ndarray) -> np.ndarray:
    """values in [0,1] (H,W) -> RGB (H,W,3) uint8."""
    pos = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    frac = (pos - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[hi] * frac).astype(np.uint8)


#: TrueType fonts tried for the overlay's words before Pillow's own (Pillow finds them by name in the system's font
#: folders): Pillow's default font draws few letters beyond ASCII (a word such as "café" showed "caf" and a box),
#: and its bitmap font (Pillow < 10.1, or one built without FreeType) cannot encode beyond Latin-1 at all
LABEL_FONTS = ("DejaVuSans.ttf", "Arial Unicode.ttf", "Arial.ttf", "arial.ttf")


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for name in LABEL_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:  # not on this system
            continue
        except ImportError:  # Pillow without FreeType: no TrueType font at all
            break
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow < 10.1, or without FreeType: the one fixed-size bitmap font
        return ImageFont.load_default()


def _draw_word(tag: Image.Image, word: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, note: str = "") -> None:
    """``word`` and its ``note`` on the label strip ``tag``; a word too long for it is shortened with "…" (cut at
    the strip's edge, "skateboarder" and "skateboarding" looked the same), the note kept whole. With a bitmap font,
    characters beyond Latin-1 are drawn as "?" (they raised UnicodeEncodeError, which stopped infer.py before the
    next image's caption)."""
    draw = ImageDraw.Draw(tag)
    tail, mark = (f" {note}" if note else ""), "…"
    try:
        draw.textlength(word + mark + tail, font=font)
    except UnicodeEncodeError:  # a bitmap font: Latin-1 only, the rest as "?"
        word, mark, tail = (t.encode("latin-1", "replace").decode("latin-1") for t in (word, mark, tail))
    shown = word
    while len(shown) > 1 and draw.textlength(shown + (mark if shown != word else "") + tail, font=font) > tag.width - 6:
        shown = shown[:-1]
    draw.text((4, 2), (shown if shown == word else shown + mark) + tail, fill=(0, 0, 0), font=font)


# the most a panel's longer side is of its shorter one: a panorama of 3000x2 px kept its shape as a 224x1
# panel, with no room for the word nor a visible map. Longer images are stretched across to this (the
# model saw every image squashed to a square, and its grid covers the whole image, so the maps stay put)
MAX_PANEL_ASPECT = 4


def _panel_size(image: Image.Image, longest: int) -> tuple[int, int]:
    """(width, height) of a panel whose longer side is ``longest``, with the image's aspect ratio up to
    ``MAX_PANEL_ASPECT``: 1."""
    w, h = image.size
    shortest = max(1, -(-longest // MAX_PANEL_ASPECT))  # ceil
    if w >= h:
        return longest, max(shortest, round(longest * h / w))
    return max(shortest, round(longest * w / h)), longest


def overlay(
    image: Image.Image,
    attention: np.ndarray | torch.Tensor,
    size: int | tuple[int, int],
    centres: CellCentres | None = None,
) -> Image.Image:
    """Blend one attention map (h,w) over ``image`` resized to ``size`` (width, height; an int: square); the
    cells placed at ``centres`` (as in :func:`heatmap`)."""
    width, height = (size, size) if isinstance(size, int) else size
    base = to_rgb(image)  # what the model saw: an EXIF-rotated photo upright, transparency on white
    if base.size != (width, height):
        base = base.resize((width, height), Image.BICUBIC)
    heat = heatmap(attention, width, height, centres)
    blended = 0.45 * np.asarray(base, dtype=np.float32) + 0.55 * _colorize(heat).astype(np.float32)
    return Image.fromarray(blended.astype(np.uint8))


def _spread(centres: Sequence[float], pixels: int) -> np.ndarray:
    """(pixels, n): how much of each of n cells a pixel's value takes, linear between the two cells whose
    centres (fractions of the extent) are either side of the pixel's centre, all of the nearest one's past
    the first or last centre: bilinear upsampling for cells that are not evenly placed on the image."""
    unique, cell_at = np.unique(np.asarray(centres, dtype=np.float64), return_inverse=True)
    at = (np.arange(pixels) + 0.5) / pixels  # (P,) pixel centres
    one_hot = np.eye(len(unique))
    spread = np.stack([np.interp(at, unique, one_hot[j]) for j in range(len(unique))], axis=1)  # (P,U)
    # cells pooled from one share its centre and its pixels: their weights add up there
    return spread[:, cell_at.reshape(-1)]  # (P,n)


def heatmap(
    attention: np.ndarray | torch.Tensor, width: int, height: int, centres: CellCentres | None = None
) -> np.ndarray:
    """One attention map (h,w), row-major like the grid, upsampled to (height,width) and divided by its
    largest value: 1 where the map peaks, 0.5 where the weight is half the peak's. ``centres``: where the
    cells sit on the image (a caption's ``centres``); None: cells that tile it.

    Not min-max scaled: subtracting the minimum stretched a diffuse map (weights between 0.014 and 0.018)
    to the whole colour ramp, so it looked as sharply focused as a peaked one, and drew an exactly uniform
    map as no attention at all (all 0)."""
    att = torch.as_tensor(attention).detach().to(torch.float64).cpu().numpy()  # (h,w); detached: maps from a graph
    centres = CellCentres.tiling(att.shape) if centres is None else centres
    if centres.grid != att.shape:
        raise ValueError(f"an attention map of {att.shape[0]}x{att.shape[1]} cells with centres for {centres.grid}")
    # linear, not cubic: a cubic overshoots next to the border, so of two cells with equal weight the
    # one at the edge looked hotter (and a corner cell peaked at the image corner, not its centre)
    heat = _spread(centres.ys, height) @ att @ _spread(centres.xs, width).T  # (height,h)(h,w)(w,width)
    heat = heat.astype(np.float32)  # (height,width), >= 0 (weights >= 0 of weights >= 0)
    return heat / heat.max() if heat.max() > 0 else heat


def _share(weight: float) -> str:
    """A map's largest weight as a percentage: whole ones, and one decimal below 10% (an 8x8 grid's uniform map
    is 1.6%)."""
    return f"{weight:.0%}" if weight >= 0.095 else f"{weight:.1%}"


def _label_font(panel_size: int) -> ImageFont.ImageFont:
    return _font(max(12, panel_size // 12))


def label_height(panel_size: int = 224) -> int:
    """Pixels of the strip above each panel of :func:`attention_figure` that holds its word."""
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((4, 2), "Ag", font=_label_font(panel_size))[3] + 4


def attention_figure(
    image: Image.Image,
    words: Sequence[str],
    attention: np.ndarray | torch.Tensor,
    panel_size: int = 224,
    columns: int = 5,
    centres: CellCentres | None = None,
) -> Image.Image:
    """The image followed by one overlay panel per word; attention (T,h,w) aligned with ``words`` (one map per
    word), its cells placed at ``centres`` (a caption's ``centres``; None: cells that tile the image, which is not
    where a strided CNN's cells look). Panels are ``panel_size`` on the image's longer side and keep its aspect
    ratio up to 4:1; each word is written in a strip above its panel (:func:`label_height`), not on it, where it
    hid the heat of the top-left cells.

    Each panel's heat is its own map divided by its own largest weight (:func:`heatmap`; the ramp runs dark blue,
    blue, cyan, yellow, red, dark red), so a map with 30% of its weight on one cell and one with 90% both show a red
    spot: the label gives that largest weight beside the word ("dog 30%", the share of the word's attention on its
    top cell), which says how focused the map is. Weights must be finite and at least 0."""
    for name, value in (("panel_size", panel_size), ("columns", columns)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # 0 columns: a ZeroDivisionError
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    shape = tuple(attention.shape)
    if len(shape) != 3 or shape[0] != len(words):
        raise ValueError(
            f"attention must be (T,h,w) with one map per word: {len(words)} words, attention of shape {shape} "
            "(a Caption's tokens and attention go together; a flat (T,N) map needs reshaping to its grid)"
        )
    # the loader's normalisation, as Captioner applies it: the attention grid is in the frame of the
    # EXIF-transposed image, so an image drawn as stored put each map on the wrong region (and with a
    # rotated aspect); convert("RGB") also showed 16-bit greyscale white and transparency black
    image = to_rgb(image)
    n = len(words) + 1
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    pad = 4
    pw, ph = _panel_size(image, panel_size)
    strip = label_height(panel_size)
    fig = Image.new("RGB", (cols * (pw + pad) + pad, rows * (strip + ph + pad) + pad), (255, 255, 255))
    font = _label_font(panel_size)
    maps = torch.as_tensor(attention).detach().to(torch.float64).cpu()  # (T,h,w)
    for t, w in enumerate(words):  # a NaN ended in an IndexError from the colour ramp; a negative map drew blank
        if not bool(torch.isfinite(maps[t]).all()) or bool((maps[t] < 0).any()):
            raise ValueError(f"the attention map of word {t} ({w!r}) has weights that are not finite numbers >= 0")
    base = image.resize((pw, ph), Image.BICUBIC)  # once, not per word
    panels = [(base, "<image>", "")]
    panels += [
        (overlay(base, maps[t], (pw, ph), centres), w, _share(float(maps[t].max()))) for t, w in enumerate(words)
    ]
    for k, (panel, label, note) in enumerate(panels):
        x, y = pad + (k % cols) * (pw + pad), pad + (k // cols) * (strip + ph + pad)
        tag = Image.new("RGB", (pw, strip), (255, 255, 255))  # the word and its map's peak weight
        _draw_word(tag, label, font, note)
        fig.paste(tag, (x, y))
        fig.paste(panel, (x, y + strip))
    return fig
