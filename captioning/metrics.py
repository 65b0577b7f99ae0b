"""Caption metrics.

``score_captions`` (from :mod:`captioning.cocoeval`): BLEU-1..4, ROUGE-L, CIDEr-D and, where Java
is there, METEOR, exactly as the coco-caption toolkit computes them. For the shapes set, object /
full accuracy and attention grounding:

Pointing accuracy: over generated shape nouns that match exactly one object of the image (by
the attributes the caption gives), the fraction whose attention argmax cell, its centre mapped
to image pixels, lies inside that object's box enlarged by half a cell. The same is reported for
colour words (``pointing_accuracy_color``), and the mean share of attention inside the named
object's box (``attention_mass_shape`` / ``attention_mass_color``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from captioning.cocoeval import score_captions
from captioning.data.synthetic import fully_correct, objects_correct, parse_caption

__all__ = ["score_captions", "shapes_scores", "grounding_counts", "pointing_hits", "attention_mass"]


def _cell_geometry(grid: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, float, float]:
    gh, gw = grid
    width, height = image_size
    return gh, gw, width / gw, height / gh


def _points_inside(cell: int, box: Sequence[float], grid: tuple[int, int], image_size: tuple[int, int]) -> bool:
    """Is the centre of ``cell`` inside ``box`` (pixels, inclusive) enlarged by half a cell on every side?"""
    gh, gw = grid
    width, height = image_size
    col, row = cell % gw, cell // gw
    x0, y0, x1, y1 = box[0], box[1], box[2] + 1, box[3] + 1  # inclusive pixel box -> its area's edges
    # x0 - cw/2 <= (col + 1/2) cw <= x1 + cw/2 with cw = width/gw, times 2 gw (and rows alike): in integers, so
    # a centre exactly half a cell from the box counts as inside whatever the cell size (in floats, 2.5 * 64/6
    # came out above 32 - 64/6/2, and a centre on that tie fell outside on one side of a box but not the other)
    inside_x = 2 * gw * x0 - width <= (2 * col + 1) * width <= 2 * gw * x1 + width
    return inside_x and 2 * gh * y0 - height <= (2 * row + 1) * height <= 2 * gh * y1 + height


def attention_mass(
    attention: torch.Tensor, box: Sequence[float], grid: tuple[int, int], image_size: tuple[int, int]
) -> float:
    """Share of one attention map (N,) that falls inside ``box`` (pixels, inclusive), each cell's
    weight spread evenly over its area."""
    gh, gw, cw, ch = _cell_geometry(grid, image_size)
    x0, y0, x1, y1 = box[0], box[1], box[2] + 1, box[3] + 1  # inclusive pixel box -> area
    xs = torch.arange(gw, dtype=torch.float64) * cw  # cell left edges
    ys = torch.arange(gh, dtype=torch.float64) * ch
    ox = (torch.clamp(xs + cw, max=x1) - torch.clamp(xs, min=x0)).clamp(min=0) / cw  # (w,) overlap share
    oy = (torch.clamp(ys + ch, max=y1) - torch.clamp(ys, min=y0)).clamp(min=0) / ch  # (h,)
    return float((attention.double().view(gh, gw) * oy[:, None] * ox[None, :]).sum())


def grounding_counts(
    tokens: Sequence[str],
    attention: torch.Tensor,
    grid: tuple[int, int],
    objects: Sequence[dict],
    image_size: tuple[int, int],
) -> dict[str, float]:
    """Pointing hits and attention mass for one caption, per word class.

    attention (T,N) aligned with ``tokens``; image_size (W,H). A named object counts only when
    the attributes said match exactly one object. Returns sums: ``shape_hits``, ``shape_trials``,
    ``shape_mass``, ``color_hits``, ``color_trials``, ``color_mass``.
    """
    out = dict.fromkeys(("shape_hits", "shape_trials", "shape_mass", "color_hits", "color_trials", "color_mass"), 0.0)
    for m in parse_caption(list(tokens))[0]:
        match = [
            o
            for o in objects
            if o["shape"] == m.shape
            and (m.color is None or o["color"] == m.color)
            and (m.size is None or o["size"] == m.size)
        ]
        if len(match) != 1:
            continue
        box = match[0]["box"]
        for kind, pos in (("shape", m.position), ("color", m.color_position)):
            if pos is None or pos >= attention.size(0):
                continue
            out[f"{kind}_trials"] += 1
            out[f"{kind}_hits"] += _points_inside(int(attention[pos].argmax()), box, grid, image_size)
            out[f"{kind}_mass"] += attention_mass(attention[pos], box, grid, image_size)
    return out


def pointing_hits(
    tokens: Sequence[str],
    attention: torch.Tensor,
    grid: tuple[int, int],
    objects: Sequence[dict],
    image_size: tuple[int, int],
) -> tuple[int, int]:
    """(hits, trials) of the shape nouns of one caption (the pointing accuracy of the module doc)."""
    c = grounding_counts(tokens, attention, grid, objects, image_size)
    return int(c["shape_hits"]), int(c["shape_trials"])


def shapes_scores(
    candidates: Sequence[Sequence[str]],
    attentions: Sequence[torch.Tensor],
    grid: tuple[int, int],
    objects: Sequence[Sequence[dict]],
    image_sizes: Sequence[tuple[int, int]],
) -> dict[str, float]:
    """Shapes metrics over a set of images: ``object_accuracy`` and ``full_accuracy`` (per caption), and the
    grounding of :func:`grounding_counts` pooled over all captions: ``pointing_accuracy`` (shape nouns),
    ``pointing_accuracy_color`` (colour words), ``attention_mass_shape`` / ``attention_mass_color`` and
    ``pointing_trials`` (the number of shape nouns scored). A ratio with no trials is reported as 0.0."""
    n = max(len(candidates), 1)
    total: dict[str, float] = {}
    for toks, att, objs, size in zip(candidates, attentions, objects, image_sizes):
        for k, v in grounding_counts(toks, att, grid, objs, size).items():
            total[k] = total.get(k, 0.0) + v
    ratio = lambda a, b: total.get(a, 0.0) / total[b] if total.get(b) else 0.0
    return {
        "object_accuracy": sum(objects_correct(list(c), list(o)) for c, o in zip(candidates, objects)) / n,
        "full_accuracy": sum(fully_correct(list(c), list(o)) for c, o in zip(candidates, objects)) / n,
        "pointing_accuracy": ratio("shape_hits", "shape_trials"),
        "pointing_trials": total.get("shape_trials", 0.0),
        "pointing_accuracy_color": ratio("color_hits", "color_trials"),
        "attention_mass_shape": ratio("shape_mass", "shape_trials"),
        "attention_mass_color": ratio("color_mass", "color_trials"),
    }
