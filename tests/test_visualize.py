"""Attention overlays: maps land on the cells they weigh, equal weights look equal, shapes are kept."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from captioning.visualize import attention_figure, heatmap


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


def test_a_wide_image_keeps_its_shape_and_the_grid_covers_it_row_major():
    image = Image.new("RGB", (400, 200), (200, 200, 200))
    one = torch.zeros(2, 4)
    one[0, 3] = 1.0  # top right
    heat = heatmap(one, 224, 112)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert y < 56 and x >= 168
    fig = attention_figure(image, ["a", "b"], torch.stack([one, one.flip(0)]), panel_size=224)
    assert fig.size == (3 * (224 + 4) + 4, 112 + 8)  # three 224x112 panels in a row, 4 px apart
    tall = attention_figure(image.rotate(90, expand=True), ["a"], one.t()[None], panel_size=224)
    assert tall.size == (2 * (112 + 4) + 4, 224 + 8)
