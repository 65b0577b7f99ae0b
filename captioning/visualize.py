"""Attention overlays: the only file that draws.

One panel for the image, then one per generated word with its attention map upsampled (bilinear,
cell centres at the centres of the image regions they cover, no overshoot at the border) to the
image, coloured and blended over it, the word written on the panel. Panels keep the image's aspect
ratio (up to 4:1; longer images are stretched to it): the model saw the whole image (squashed to its
input size, not cropped), so the grid covers the whole picture however it is shaped. The image is
drawn as the model saw it: a PIL image given as it was opened is normalised like the loader does
(EXIF orientation, transparency on white, 16-bit greyscale scaled), so the maps land where the model
looked.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from captioning.data.images import to_rgb

# a "jet"-like colour ramp: dark blue -> cyan -> yellow -> red
_RAMP = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], dtype=np.float32)


def _colorize(values: np.ndarray) -> np.ndarray:
    """values in [0,1] (H,W) -> RGB (H,W,3) uint8."""
    pos = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    frac = (pos - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[hi] * frac).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


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


def overlay(image: Image.Image, attention: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> Image.Image:
    """Blend one attention map (h,w) over ``image`` resized to ``size`` (width, height; an int: square)."""
    width, height = (size, size) if isinstance(size, int) else size
    base = to_rgb(image)  # what the model saw: an EXIF-rotated photo upright, transparency on white
    if base.size != (width, height):
        base = base.resize((width, height), Image.BICUBIC)
    heat = heatmap(attention, width, height)
    blended = 0.45 * np.asarray(base, dtype=np.float32) + 0.55 * _colorize(heat).astype(np.float32)
    return Image.fromarray(blended.astype(np.uint8))


def heatmap(attention: np.ndarray | torch.Tensor, width: int, height: int) -> np.ndarray:
    """One attention map (h,w), row-major like the grid, upsampled to (height,width) and divided by its
    largest value: 1 where the map peaks, 0.5 where the weight is half the peak's.

    Not min-max scaled: subtracting the minimum stretched a diffuse map (weights between 0.014 and 0.018)
    to the whole colour ramp, so it looked as sharply focused as a peaked one, and drew an exactly uniform
    map as no attention at all (all 0)."""
    att = torch.as_tensor(attention, dtype=torch.float32).cpu()
    # bilinear, not bicubic: bicubic overshoots next to the border, so of two cells with equal weight
    # the one at the edge looked hotter (and a corner cell peaked at the image corner, not its centre)
    heat = torch.nn.functional.interpolate(att[None, None], size=(height, width), mode="bilinear", align_corners=False)
    heat = heat[0, 0].numpy()  # (height,width), >= 0 (bilinear weights of weights >= 0)
    return heat / heat.max() if heat.max() > 0 else heat


def attention_figure(
    image: Image.Image,
    words: Sequence[str],
    attention: np.ndarray | torch.Tensor,
    panel_size: int = 224,
    columns: int = 5,
) -> Image.Image:
    """The image followed by one overlay panel per word; attention (T,h,w) aligned with ``words``.
    Panels are ``panel_size`` on the image's longer side and keep its aspect ratio up to 4:1."""
    # the loader's normalisation, as Captioner applies it: the attention grid is in the frame of the
    # EXIF-transposed image, so an image drawn as stored put each map on the wrong region (and with a
    # rotated aspect); convert("RGB") also showed 16-bit greyscale white and transparency black
    image = to_rgb(image)
    n = len(words) + 1
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    pad = 4
    pw, ph = _panel_size(image, panel_size)
    fig = Image.new("RGB", (cols * (pw + pad) + pad, rows * (ph + pad) + pad), (255, 255, 255))
    font = _font(max(12, panel_size // 12))
    base = image.resize((pw, ph), Image.BICUBIC)  # once, not per word
    panels = [(base.copy(), "<image>")]
    panels += [(overlay(base, attention[t], (pw, ph)), w) for t, w in enumerate(words)]
    for k, (panel, label) in enumerate(panels):
        x, y = pad + (k % cols) * (pw + pad), pad + (k // cols) * (ph + pad)
        draw = ImageDraw.Draw(panel)
        box = draw.textbbox((4, 2), label, font=font)
        draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
        draw.text((4, 2), label, fill=(255, 255, 255), font=font)
        fig.paste(panel, (x, y))
    return fig
