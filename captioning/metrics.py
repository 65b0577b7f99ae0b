"""Caption metrics.

``score_captions`` (from :mod:`captioning.cocoeval`): BLEU-1..4, ROUGE-L, CIDEr-D and, where Java
is there, METEOR, exactly as the coco-caption toolkit computes them. For the shapes set, object /
full accuracy and attention grounding:

Pointing accuracy: over generated shape nouns that match exactly one object of the image (by
the attributes the caption gives), the fraction whose attention argmax cell's region touches that
object's box (where several cells share the maximum, every one of them must: a flat map points
nowhere). A cell's region is the part of the image nearer its centre than any other cell's, the
centre being where its features were computed from (:class:`~captioning.models.base.CellCentres`:
for a strided CNN, not the middle of a tile); for cells that tile the image it is the tile, and the
rule reads "the cell's centre lies inside the box enlarged by half a cell". The same is reported for
colour words (``pointing_accuracy_color``), and the mean share of attention inside the named
object's box (``attention_mass_shape`` / ``attention_mass_color``), each cell's weight spread evenly
over its region.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from captioning.cocoeval import score_captions
from captioning.data.synthetic import fully_correct, objects_correct, parse_caption
from captioning.models.base import CellCentres

__all__ = ["score_captions", "shapes_scores", "grounding_counts", "pointing_hits", "attention_mass"]


def _regions(centres: Sequence[float], extent: float) -> list[tuple[float, float]]:
    """Each cell's region along one axis of ``extent`` px: the points nearer its centre (a fraction of the
    extent) than any other cell's, cut to the image. Cells that share a centre share its region."""
    unique = sorted(set(centres))
    cuts = [(a + b) / 2 * extent for a, b in zip(unique, unique[1:])]
    bounds = [min(max(x, 0.0), extent) for x in [0.0, *cuts, extent]]  # a centre past the edge: cut off
    at = {c: (bounds[i], bounds[i + 1]) for i, c in enumerate(unique)}
    return [at[c] for c in centres]


def _points_inside(cell: int, box: Sequence[float], centres: CellCentres, image_size: tuple[int, int]) -> bool:
    """Does the region of ``cell`` touch ``box`` (pixels, inclusive)? For cells that tile the image: is the
    cell's centre inside the box enlarged by half a cell on every side?"""
    gw = len(centres.xs)
    width, height = image_size
    (xa, xb), (ya, yb) = _regions(centres.xs, width)[cell % gw], _regions(centres.ys, height)[cell // gw]
    x0, y0, x1, y1 = box[0], box[1], box[2] + 1, box[3] + 1  # inclusive pixel box -> its area's edges
    # a region ending exactly on the box's edge touches it, whatever float rounding made of the ends (at 6
    # cells over 64 px, 2.5 * 64/6 came out above 32 - 64/6/2, so such a tie fell outside on one side of a
    # box but not on the other)
    tie = 1e-9 * max(width, height)
    return xa <= x1 + tie and xb >= x0 - tie and ya <= y1 + tie and yb >= y0 - tie


def _shares(centres: Sequence[float], extent: float, lo: float, hi: float) -> torch.Tensor:
    """(n,) the share of each cell's region (along one axis) that lies in [lo, hi]; a region of no length
    (its centre cut off past the edge) counts as inside where its end does."""
    out = [
        max(0.0, min(b, hi) - max(a, lo)) / (b - a) if b > a else float(lo <= a <= hi)
        for a, b in _regions(centres, extent)
    ]
    return torch.tensor(out, dtype=torch.float64)


def attention_mass(
    attention: torch.Tensor, box: Sequence[float], centres: CellCentres, image_size: tuple[int, int]
) -> float:
    """Share of one attention map (N,) that falls inside ``box`` (pixels, inclusive), each cell's
    weight spread evenly over its region."""
    width, height = image_size
    x0, y0, x1, y1 = box[0], box[1], box[2] + 1, box[3] + 1  # inclusive pixel box -> area
    ox = _shares(centres.xs, width, x0, x1)  # (w,)
    oy = _shares(centres.ys, height, y0, y1)  # (h,)
    return float((attention.double().view(*centres.grid) * oy[:, None] * ox[None, :]).sum())


def _points_at(weights: torch.Tensor, box: Sequence[float], centres: CellCentres, image_size: tuple[int, int]) -> bool:
    """Whether a map (N,) points at ``box``: every cell holding its largest weight touches it. argmax alone took
    the first of tied cells, so a uniform (or all-zero) map pointed at the top-left cell and hit every object there."""
    top = (weights == weights.max()).nonzero().flatten().tolist()  # the tied maxima, one cell when no tie
    return bool(top) and all(_points_inside(cell, box, centres, image_size) for cell in top)  # NaN: no cell


def grounding_counts(
    tokens: Sequence[str],
    attention: torch.Tensor,
    centres: CellCentres,
    objects: Sequence[dict],
    image_size: tuple[int, int],
) -> dict[str, float]:
    """Pointing hits and attention mass for one caption, per word class.

    attention (T,N) aligned with ``tokens``, its cells at ``centres``; image_size (W,H). A named object
    counts only when the attributes said match exactly one object. Returns sums: ``shape_hits``,
    ``shape_trials``, ``shape_mass``, ``color_hits``, ``color_trials``, ``color_mass``. A Caption's (T,h,w) maps
    are taken as (T,N).
    """
    cells = centres.grid[0] * centres.grid[1]
    if attention.dim() == 3:  # (T,h,w), as Captioner returns them -> (T,N); read as (T,N), rows were taken as cells
        attention = attention.flatten(1)
    if attention.dim() != 2 or attention.size(1) != cells:
        raise ValueError(
            f"attention must be (T,N) or (T,h,w) over the {cells} cells of centres, got {tuple(attention.shape)}"
        )
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
            out[f"{kind}_hits"] += _points_at(attention[pos], box, centres, image_size)
            out[f"{kind}_mass"] += attention_mass(attention[pos], box, centres, image_size)
    return out


def pointing_hits(
    tokens: Sequence[str],
    attention: torch.Tensor,
    centres: CellCentres,
    objects: Sequence[dict],
    image_size: tuple[int, int],
) -> tuple[int, int]:
    """(hits, trials) of the shape nouns of one caption (the pointing accuracy of the module doc)."""
    c = grounding_counts(tokens, attention, centres, objects, image_size)
    return int(c["shape_hits"]), int(c["shape_trials"])


def shapes_scores(
    candidates: Sequence[Sequence[str]],
    attentions: Sequence[torch.Tensor],
    centres: CellCentres,
    objects: Sequence[Sequence[dict]],
    image_sizes: Sequence[tuple[int, int]],
) -> dict[str, float]:
    """Shapes metrics over a set of images: ``object_accuracy`` and ``full_accuracy`` (per caption), and the
    grounding of :func:`grounding_counts` pooled over all captions: ``pointing_accuracy`` (shape nouns),
    ``pointing_accuracy_color`` (colour words), ``attention_mass_shape`` / ``attention_mass_color`` and
    ``pointing_trials`` (the number of shape nouns scored). A ratio with no trials is reported as 0.0."""
    lengths = {len(candidates), len(attentions), len(objects), len(image_sizes)}
    if len(lengths) > 1:  # zip cut them to the shortest: grounding scored fewer captions than the accuracies
        raise ValueError(
            f"one attention, object list and image size per caption: got {len(candidates)} captions, "
            f"{len(attentions)} attentions, {len(objects)} object lists, {len(image_sizes)} image sizes"
        )
    n = max(len(candidates), 1)
    total: dict[str, float] = {}
    for toks, att, objs, size in zip(candidates, attentions, objects, image_sizes):
        for k, v in grounding_counts(toks, att, centres, objs, size).items():
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
