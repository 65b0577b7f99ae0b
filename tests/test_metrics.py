import pytest
import torch

from captioning.metrics import pointing_hits, score_captions, shapes_scores
from captioning.models.base import CellCentres

OBJ = [
    {"shape": "circle", "color": "red", "size": "small", "box": [0, 0, 15, 15]},
    {"shape": "square", "color": "blue", "size": "large", "box": [40, 40, 63, 63]},
]
CAP = "a small red circle to the left of a large blue square".split()
TILES = CellCentres.tiling((8, 8))  # an 8x8 grid whose cells tile the image (8 px each on 64 px)


def _attention(cells):
    """Attention (T,64) peaked on the given cell for each token of CAP."""
    att = torch.full((len(CAP), 64), 0.001)
    for t, c in enumerate(cells):
        att[t, c] = 1.0
    return att / att.sum(-1, keepdim=True)


def test_coco_metrics_are_perfect_for_an_exact_reference_and_lower_otherwise():
    refs = {"a": [" ".join(CAP), "a red circle and a blue square"], "b": ["a small green triangle"]}
    exact = score_captions(refs, {"a": " ".join(CAP), "b": "a small green triangle"}, meteor=False)
    assert abs(exact["bleu4"] - 1.0) < 1e-6 and abs(exact["rouge_l"] - 1.0) < 1e-9
    worse = score_captions(refs, {"a": "a small red circle right of a large blue square", "b": "a cat"}, meteor=False)
    assert all(worse[k] < exact[k] for k in ("bleu4", "rouge_l", "cider_d"))


def test_pointing_counts_hits_on_the_named_objects():
    # 8x8 grid on 64x64 px: cell 0 centre (4,4) inside the circle; cell 63 centre (60,60) inside the square
    good = _attention([0] * 11 + [63])
    assert pointing_hits(CAP, good, TILES, OBJ, (64, 64)) == (2, 2)
    bad = _attention([63] * 4 + [0] * 8)
    assert pointing_hits(CAP, bad, TILES, OBJ, (64, 64)) == (0, 2)


def test_a_map_with_tied_maxima_points_only_where_all_of_them_touch_the_object():
    # argmax took the first of tied cells: a uniform or all-zero map "pointed" at cell 0, inside the circle
    for flat in (torch.full((len(CAP), 64), 1 / 64), torch.zeros(len(CAP), 64)):
        assert pointing_hits(CAP, flat, TILES, OBJ, (64, 64)) == (0, 2)
    two_cells = torch.zeros(len(CAP), 64)
    two_cells[:, [0, 9]] = 0.5  # both inside the circle's reach; the square's noun sees neither
    assert pointing_hits(CAP, two_cells, TILES, OBJ, (64, 64)) == (1, 2)
    two_cells[:, 27] = 0.5  # a third tied cell outside the circle: no longer a hit
    assert pointing_hits(CAP, two_cells, TILES, OBJ, (64, 64)) == (0, 2)
    assert pointing_hits(CAP, torch.full((len(CAP), 64), float("nan")), TILES, OBJ, (64, 64)) == (0, 2)


def test_pointing_allows_half_a_cell_and_skips_ambiguous_nouns():
    # the circle covers pixels 0..15, i.e. [0,16); half a cell (4 px) more reaches 20. Cell 27 = row 3, col 3:
    # centre (28,28), outside
    assert pointing_hits(CAP, _attention([27] * 12), TILES, OBJ, (64, 64))[0] == 0
    # cell 9 = centre (12,12), inside [0-4, 15+4]
    assert pointing_hits(CAP, _attention([9] * 4 + [63] * 8), TILES, OBJ, (64, 64)) == (2, 2)
    # a bare "circle" when two circles exist matches no single object: not a trial
    two = OBJ + [{"shape": "circle", "color": "green", "size": "large", "box": [40, 0, 63, 20]}]
    assert pointing_hits(["a", "circle"], torch.ones(2, 64) / 64, TILES, two, (64, 64)) == (0, 0)


def test_pointing_tolerance_is_the_same_on_every_side_of_the_box():
    """Pixels 24..31 cover [24,32): cells centred 4 px (half a cell) before and after it both point at it."""
    square = [{"shape": "square", "color": "red", "size": "small", "box": [24, 24, 31, 31]}]
    words = ["a", "small", "red", "square"]
    for cell in (2 * 8 + 2, 4 * 8 + 4, 2 * 8 + 4, 4 * 8 + 2):  # centres (20,20), (36,36), (36,20), (20,36)
        assert pointing_hits(words, torch.eye(64)[[cell] * 4], TILES, square, (64, 64)) == (1, 1), cell
    for cell in (1 * 8 + 1, 5 * 8 + 5):  # centres (12,12), (44,44): 12 px away
        assert pointing_hits(words, torch.eye(64)[[cell] * 4], TILES, square, (64, 64)) == (0, 1), cell


def test_a_centre_half_a_cell_from_a_box_points_at_it_whatever_the_cell_size():
    """6 rows over 64 px (cells of 10.67 px): row 3's centre lies half a cell below a box ending at pixel row 31, and
    row 2's half a cell above one starting at row 32. In floats the second missed by a rounding error."""
    words = ["a", "small", "red", "square"]
    for cell, box in ((3, [0, 0, 63, 31]), (2, [0, 32, 63, 63])):
        square = [{"shape": "square", "color": "red", "size": "small", "box": box}]
        assert pointing_hits(words, torch.eye(6)[[cell] * 4], CellCentres.tiling((6, 1)), square, (64, 64)) == (1, 1), (
            cell,
            box,
        )
    for cell, box in ((4, [0, 0, 63, 31]), (1, [0, 32, 63, 63])):  # a whole cell further: outside
        square = [{"shape": "square", "color": "red", "size": "small", "box": box}]
        assert pointing_hits(words, torch.eye(6)[[cell] * 4], CellCentres.tiling((6, 1)), square, (64, 64)) == (0, 1), (
            cell,
            box,
        )
    # 3 columns over 18 px: the cut between cells 1 and 2 comes out at 12.000000000000002 in floats, past the right
    # edge (12) of a box ending at pixel 11, which cell 2 (from 12 to 18) touches
    square = [{"shape": "square", "color": "red", "size": "small", "box": [0, 0, 11, 5]}]
    assert pointing_hits(words, torch.eye(3)[[2] * 4], CellCentres.tiling((1, 3)), square, (18, 6)) == (1, 1)
    square = [{"shape": "square", "color": "red", "size": "small", "box": [0, 0, 5, 11]}]  # the same down the image
    assert pointing_hits(words, torch.eye(3)[[2] * 4], CellCentres.tiling((3, 1)), square, (6, 18)) == (1, 1)


def test_rows_run_down_the_image_and_columns_across_it():
    """Cell i is row i // width (y) and column i % width (x). The other tests only use cells on the grid's
    diagonal with boxes symmetric about it, where swapping rows and columns changes nothing."""
    top_right = [{"shape": "circle", "color": "red", "size": "small", "box": [48, 0, 63, 15]}]
    words = ["a", "small", "red", "circle"]
    row0_col7, row7_col0 = 0 * 8 + 7, 7 * 8 + 0  # centres (60, 4) inside the box, (4, 60) far from it
    assert pointing_hits(words, torch.eye(64)[[row0_col7] * 4], TILES, top_right, (64, 64)) == (1, 1)
    assert pointing_hits(words, torch.eye(64)[[row7_col0] * 4], TILES, top_right, (64, 64)) == (0, 1)
    from captioning.metrics import attention_mass

    box = top_right[0]["box"]  # cells (0, 6), (0, 7), (1, 6), (1, 7)
    assert attention_mass(torch.eye(64)[row0_col7], box, TILES, (64, 64)) == 1.0
    assert attention_mass(torch.eye(64)[row7_col0], box, TILES, (64, 64)) == 0.0
    # a wide 2x4 grid over a 64x32 image (16 px cells): the box [40, 0, 63, 7] covers the top half of cell 3
    wide = torch.zeros(8)
    wide[3] = 1.0  # row 0, column 3
    assert attention_mass(wide, [40, 0, 63, 7], CellCentres.tiling((2, 4)), (64, 32)) == 0.5
    assert attention_mass(wide.roll(4), [40, 0, 63, 7], CellCentres.tiling((2, 4)), (64, 32)) == 0.0  # row 1, column 3


def test_shapes_scores_object_and_full_accuracy():
    swapped = "a large blue square to the left of a small red circle".split()
    wrong = "a small red circle".split()
    out = shapes_scores([CAP, swapped, wrong], [_attention([0] * 12)] * 3, TILES, [OBJ] * 3, [(64, 64)] * 3)
    assert abs(out["object_accuracy"] - 2 / 3) < 1e-9
    assert abs(out["full_accuracy"] - 1 / 3) < 1e-9


def test_attention_mass_and_colour_pointing():
    from captioning.metrics import attention_mass

    uniform = torch.full((64,), 1 / 64)
    # the circle box [0,0,15,15] is exactly the 2x2 top-left cells of an 8x8 grid on 64 px
    assert abs(attention_mass(uniform, [0, 0, 15, 15], TILES, (64, 64)) - 4 / 64) < 1e-9
    # a box covering half of cell 0 horizontally
    one_hot = torch.zeros(64)
    one_hot[0] = 1.0
    assert abs(attention_mass(one_hot, [0, 0, 3, 7], TILES, (64, 64)) - 0.5) < 1e-9
    att = _attention([0] * 11 + [63])  # colour words too: "red" -> circle cell, "blue" -> cell 0 (miss)
    out = shapes_scores([CAP], [att], TILES, [OBJ], [(64, 64)])
    assert out["pointing_accuracy_color"] == 0.5 and out["pointing_accuracy"] == 1.0
    # "circle" peaks on cell 0 of the 4 cells of its box, "square" on cell 63 of the 9 of its box; every other
    # cell holds 0.001, and a map sums to 1 + 63 * 0.001
    assert out["attention_mass_shape"] == pytest.approx((1.003 / 1.063 + 1.008 / 1.063) / 2, rel=1e-6)


def test_a_captions_grid_shaped_maps_score_as_their_flat_rows_and_mismatched_inputs_are_refused():
    """Captioner's (T,h,w) maps were read as (T,N) without a word: the row and column numbers of the maximum taken as
    cells, pointing 0 where it was 1; and lists of different lengths were cut to the shortest by zip."""
    att = _attention([0] * 11 + [63])  # (T,64)
    flat = shapes_scores([CAP], [att], TILES, [OBJ], [(64, 64)])
    assert flat["pointing_accuracy"] == 1.0
    assert shapes_scores([CAP], [att.view(len(CAP), 8, 8)], TILES, [OBJ], [(64, 64)]) == flat
    with pytest.raises(ValueError, match=r"attention must be \(T,N\) or \(T,h,w\) over the 64 cells"):
        shapes_scores([CAP], [att[:, :32]], TILES, [OBJ], [(64, 64)])
    with pytest.raises(ValueError, match="got 2 captions, 1 attentions, 2 object lists, 2 image sizes"):
        shapes_scores([CAP, CAP], [att], TILES, [OBJ, OBJ], [(64, 64)] * 2)
