"""Caption metrics: corpus BLEU-4 (via NLTK) and, for the shapes set, object / full accuracy
and attention grounding (pointing accuracy).

Pointing accuracy: over generated shape nouns that match exactly one object of the image (by
the attributes the caption gives), the fraction whose attention argmax cell, its centre mapped
to image pixels, lies inside that object's box enlarged by half a cell.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from captioning.data.synthetic import fully_correct, objects_correct, parse_caption


def bleu4(references: Sequence[Sequence[Sequence[str]]], candidates: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 of tokenised ``candidates`` against their lists of tokenised ``references``."""
    from nltk.translate.bleu_score import corpus_bleu

    if not candidates:
        return 0.0
    return float(corpus_bleu([list(map(list, r)) for r in references], [list(c) for c in candidates]))


def pointing_hits(
    tokens: Sequence[str],
    attention: torch.Tensor,
    grid: tuple[int, int],
    objects: Sequence[dict],
    image_size: tuple[int, int],
) -> tuple[int, int]:
    """(hits, trials) for one caption. attention (T,N) aligned with ``tokens``; image_size (W,H)."""
    gh, gw = grid
    width, height = image_size
    cell_w, cell_h = width / gw, height / gh
    hits = trials = 0
    for m in parse_caption(list(tokens))[0]:
        match = [
            o
            for o in objects
            if o["shape"] == m.shape
            and (m.color is None or o["color"] == m.color)
            and (m.size is None or o["size"] == m.size)
        ]
        if len(match) != 1 or m.position >= attention.size(0):
            continue
        cell = int(attention[m.position].argmax())
        cx, cy = (cell % gw + 0.5) * cell_w, (cell // gw + 0.5) * cell_h
        x0, y0, x1, y1 = match[0]["box"]
        trials += 1
        hits += int(x0 - cell_w / 2 <= cx <= x1 + cell_w / 2 and y0 - cell_h / 2 <= cy <= y1 + cell_h / 2)
    return hits, trials


def shapes_scores(
    candidates: Sequence[Sequence[str]],
    attentions: Sequence[torch.Tensor],
    grid: tuple[int, int],
    objects: Sequence[Sequence[dict]],
    image_sizes: Sequence[tuple[int, int]],
) -> dict[str, float]:
    """object_accuracy, full_accuracy and pointing_accuracy over a set of shapes images."""
    n = max(len(candidates), 1)
    hits = trials = 0
    for toks, att, objs, size in zip(candidates, attentions, objects, image_sizes):
        h, t = pointing_hits(toks, att, grid, objs, size)
        hits, trials = hits + h, trials + t
    return {
        "object_accuracy": sum(objects_correct(list(c), list(o)) for c, o in zip(candidates, objects)) / n,
        "full_accuracy": sum(fully_correct(list(c), list(o)) for c, o in zip(candidates, objects)) / n,
        "pointing_accuracy": hits / trials if trials else 0.0,
        "pointing_trials": float(trials),
    }
