"""Attention overlays: the only file that draws.

One panel for the image, then one per generated word with its attention map upsampled smoothly
(bicubic) to the image, coloured and blended over it, the word written on the panel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

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


def overlay(image: Image.Image, attention: np.ndarray | torch.Tensor, size: int) -> Image.Image:
    """Blend one attention map (h,w) over ``image`` resized to ``size`` x ``size``."""
    base = image.convert("RGB")
    if base.size != (size, size):
        base = base.resize((size, size), Image.BICUBIC)
    att = torch.as_tensor(attention, dtype=torch.float32).cpu().numpy()
    heat = np.asarray(Image.fromarray(att, mode="F").resize((size, size), Image.BICUBIC))
    heat = heat - heat.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    blended = 0.45 * np.asarray(base, dtype=np.float32) + 0.55 * _colorize(heat).astype(np.float32)
    return Image.fromarray(blended.astype(np.uint8))


def attention_figure(
    image: Image.Image,
    words: Sequence[str],
    attention: np.ndarray | torch.Tensor,
    panel_size: int = 224,
    columns: int = 5,
) -> Image.Image:
    """The image followed by one overlay panel per word; attention (T,h,w) aligned with ``words``."""
    n = len(words) + 1
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    pad = 4
    fig = Image.new("RGB", (cols * (panel_size + pad) + pad, rows * (panel_size + pad) + pad), (255, 255, 255))
    font = _font(max(12, panel_size // 12))
    base = image.convert("RGB").resize((panel_size, panel_size), Image.BICUBIC)  # once, not per word
    panels = [(base.copy(), "<image>")]
    panels += [(overlay(base, attention[t], panel_size), w) for t, w in enumerate(words)]
    for k, (panel, label) in enumerate(panels):
        x, y = pad + (k % cols) * (panel_size + pad), pad + (k // cols) * (panel_size + pad)
        draw = ImageDraw.Draw(panel)
        box = draw.textbbox((4, 2), label, font=font)
        draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
        draw.text((4, 2), label, fill=(255, 255, 255), font=font)
        fig.paste(panel, (x, y))
    return fig
