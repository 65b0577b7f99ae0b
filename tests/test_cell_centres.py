"""Where each grid cell sits on the image (``Encoder.cell_centres``), and that overlays and grounding metrics put
the cells there: a strided CNN's cell i looks at a window centred on pixel stride * i (+ 1/2), not on the middle
of a tile (stride * i + stride / 2), so maps drawn as tiles landed half a cell down and right of where the
features came from."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from captioning.metrics import attention_mass, pointing_hits
from captioning.models.base import CellCentres
from captioning.models.encoders import build_encoder
from captioning.visualize import heatmap

# small_cnn on 64 px: cell i of 8 centred on pixel 8 i, i.e. at 8 i + 1/2 in continuous coordinates
SMALL_CNN_64 = CellCentres(*[tuple((8 * i + 0.5) / 64 for i in range(8))] * 2)


@pytest.mark.parametrize(
    ("name", "options", "height", "width"),
    [
        ("small_cnn", {}, 64, 64),
        ("small_cnn", {}, 70, 61),
        ("resnet18", {}, 256, 256),
        ("resnet18", {"stage": 3}, 97, 130),
        ("resnet50", {"grid": 14}, 224, 224),  # pooled up from 7x7: each cell's centre is shared by two
        ("resnet50", {"grid": 14}, 256, 256),  # pooled up from 8x8: bins of one or two cells, uneven spacing
        ("resnet18", {"grid": 3}, 33, 45),
    ],
)
def test_there_is_a_centre_for_every_cell_the_encoder_gives(name, options, height, width):
    encoder = build_encoder(name, **options).eval()
    grid = encoder(torch.zeros(1, 3, height, width)).grid
    centres = encoder.cell_centres(height, width)
    assert centres.grid == grid
    assert all(list(c) == sorted(c) for c in centres)
    if (options.get("grid"), height) == (14, 224):
        assert len(set(centres.ys)) == len(set(centres.xs)) == 7
    assert encoder.optimize_for_inference().cell_centres(height, width) == centres  # BatchNorm folded: same cells


def test_small_cnn_and_resnet_cells_sit_on_their_strides_not_in_the_middle_of_tiles():
    assert build_encoder("small_cnn").cell_centres(64, 64) == SMALL_CNN_64
    resnet = build_encoder("resnet18").cell_centres(256, 256)
    assert resnet.xs == tuple((32 * i + 0.5) / 256 for i in range(8))
    pooled = build_encoder("resnet18", grid=4).cell_centres(256, 256)  # each of 4 cells averages 2 of the 8
    assert pooled.ys == tuple((32 * (2 * i) + 0.5 + 32 * (2 * i + 1) + 0.5) / 2 / 256 for i in range(4))


def test_each_window_layer_gives_torchs_cell_count_and_the_middle_of_the_inputs_it_reads():
    """Every Conv2d / MaxPool2d / AvgPool2d shape over 1-D inputs of 1..24 cells (kernel, stride, padding,
    dilation, ceil mode): the traced count is the layer's output size, and an output whose window lies inside
    the input is centred on the mean position of the inputs it reads (a dilated kernel's taps, not a compact
    window)."""
    from captioning.models.encoders import _Axis, _trace

    checked = 0
    for n in range(1, 25):
        for k, s, p, d, ceil in itertools.product((1, 2, 3, 4, 5), (1, 2, 3), (0, 1, 2), (1, 2), (False, True)):
            if 2 * p > k:
                continue
            layers = [nn.MaxPool2d((1, k), (1, s), (0, p), dilation=(1, d), ceil_mode=ceil)]
            if d == 1:
                layers.append(nn.AvgPool2d((1, k), (1, s), (0, p), ceil_mode=ceil))
            if not ceil:
                conv = nn.Conv2d(1, 1, (1, k), (1, s), (0, p), dilation=(1, d), bias=False)
                nn.init.ones_(conv.weight)
                layers.append(conv)
            for layer in layers:
                try:
                    out = layer(torch.zeros(1, 1, 1, n)).shape[-1]
                except RuntimeError:  # an output of no cells
                    continue
                axis = _trace(layer, (_Axis(1, 0.5, 1.0), _Axis(n, 0.5, 1.0)))[1]
                assert axis.n == out, (layer, n)
                checked += 1
                if isinstance(layer, nn.Conv2d):  # all-ones weights: sums of positions and of taps inside
                    pos = (torch.arange(n, dtype=torch.float32) + 0.5).view(1, 1, 1, n)
                    total, taps = layer(pos)[0, 0, 0], layer(torch.ones_like(pos))[0, 0, 0]
                    for o in range(out):
                        if taps[o] == k:
                            assert abs(float(total[o] / k) - (axis.offset + axis.step * o)) < 1e-4, (layer, n, o)
    assert checked > 2000


def test_pooled_centres_average_the_cells_of_torchs_adaptive_pooling_bins():
    from captioning.models.encoders import _centres

    for n in range(1, 21):
        for g in range(1, 17):
            pos = (torch.arange(n, dtype=torch.float64) + 0.5).view(1, 1, n)
            want = nn.AdaptiveAvgPool1d(g)(pos)[0, 0] / n  # each bin's mean position, as a fraction
            got = _centres(nn.Identity(), 1, n, g).xs
            assert torch.allclose(torch.tensor(got, dtype=torch.float64), want), (n, g)


def test_a_layer_it_cannot_place_or_a_shortcut_that_disagrees_is_an_error():
    from torchvision.models.resnet import BasicBlock

    from captioning.models.encoders import _Axis, _trace

    axes = (_Axis(32, 0.5, 1.0), _Axis(32, 0.5, 1.0))
    fits = BasicBlock(4, 4, stride=2, downsample=nn.Conv2d(4, 4, 1, 2))  # both paths: output o on input 2 o
    assert _trace(fits, axes) == (_Axis(16, 0.5, 2.0),) * 2
    off = BasicBlock(4, 4, stride=2, downsample=nn.Conv2d(4, 4, 3, 2))  # unpadded 3x3: on input 2 o + 1
    with pytest.raises(ValueError, match="shortcut and main path"):
        _trace(off, axes)
    with pytest.raises(ValueError, match="cannot place the grid cells of a Upsample"):
        _trace(nn.Sequential(nn.Conv2d(3, 3, 3), nn.Upsample(scale_factor=2)), axes)


def _linear(encoder: nn.Module) -> nn.Module:
    """The encoder made linear with a symmetric footprint, in float64: every convolution averages its window
    (positive weights, so with positive inputs no ReLU ever cuts), BatchNorm at its identity statistics, and max
    pooling swapped for average pooling over the same window (a max sends the gradient to one input, wherever
    the data puts it). The geometry is unchanged; each cell's gradient is then a pyramid centred on its window."""
    for module in list(encoder.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, 1.0 / module.weight[0].numel())
    return encoder.double().eval()


def _gradient_centroids(encoder: nn.Module, size: int, cells: list[int]) -> list[tuple[float, float]]:
    """(y, x) in pixels of the centroid of |d feature / d pixel| of each cell of the (h, w) grid, row-major."""
    image = torch.full((1, 3, size, size), 2.0, dtype=torch.float64, requires_grad=True)
    features = encoder(image).features  # (1,N,C)
    at = torch.arange(size, dtype=torch.float64) + 0.5  # pixel centres
    out = []
    for cell in cells:
        (grad,) = torch.autograd.grad(features[0, cell].sum(), image, retain_graph=True)
        weight = grad.abs().sum((0, 1))  # (H,W)
        weight = weight / weight.sum()
        out.append((float(weight.sum(1) @ at), float(weight.sum(0) @ at)))
    return out


@pytest.mark.parametrize(
    ("name", "size", "inner"),
    [
        # a receptive field of 23 px: cells 2..5 of 8 see no padding on 64 px
        ("small_cnn", 64, [2, 3, 4, 5]),
        # stage 4 sees 435 px: on 512 px, cells 7..8 of 16 see no padding
        ("resnet18", 512, [7, 8]),
    ],
)
def test_each_cell_is_centred_where_its_gradient_says_it_looks(name, size, inner):
    encoder = _linear(build_encoder(name))
    grid = encoder(torch.zeros(1, 3, size, size, dtype=torch.float64)).grid
    centres = encoder.cell_centres(size, size)
    tiles = CellCentres.tiling(grid)
    cells = [r * grid[1] + c for r in inner for c in inner]
    for cell, (y, x) in zip(cells, _gradient_centroids(encoder, size, cells)):
        row, col = divmod(cell, grid[1])
        assert abs(y - centres.ys[row] * size) < 1e-6 and abs(x - centres.xs[col] * size) < 1e-6, (cell, y, x)
        # the tiles' middles are nearly half a cell off
        assert abs(x - tiles.xs[col] * size) > 0.4 * size / grid[1]


def test_the_default_for_an_encoder_that_does_not_say_is_cells_that_tile_the_image():
    from captioning.models.base import Encoder, EncoderOutput

    class Patches(Encoder):  # 16 px patches, a ViT-style grid
        out_dim = 4

        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 4, 16, 16)

        def forward(self, images):
            x = self.embed(images)  # (B,C,h,w)
            return EncoderOutput(x.flatten(2).transpose(1, 2), tuple(x.shape[-2:]))

    assert Patches().cell_centres(32, 64) == CellCentres((0.25, 0.75), (0.125, 0.375, 0.625, 0.875))


def test_the_overlay_peaks_on_the_cells_centre():
    for row, col in ((4, 4), (2, 5), (0, 0), (7, 7)):
        one = torch.zeros(8, 8)
        one[row, col] = 1.0
        heat = heatmap(one, 64, 64, SMALL_CNN_64)
        peak = np.argwhere(heat == heat.max())
        if 0 < row < 7 and 0 < col < 7:  # pixel 8 i's centre is the cell's: the one and only peak
            assert peak.tolist() == [[8 * row, 8 * col]], (row, col)
            tiled = heatmap(one, 64, 64)
            # drawn as tiles, the same map peaked half a cell further down and right (pixels 8 i + 3 and 8 i + 4)
            assert np.argwhere(tiled == tiled.max()).min(0).tolist() == [8 * row + 3, 8 * col + 3]
        assert [8 * row, 8 * col] in peak.tolist()  # a border cell holds its value out to the edge


def test_the_figure_draws_each_word_with_the_centres_it_is_given():
    from captioning.visualize import attention_figure, label_height, overlay

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    one = torch.zeros(1, 8, 8)
    one[0, 4, 4] = 1.0
    figure = np.asarray(attention_figure(image, ["w"], one, panel_size=64, centres=SMALL_CNN_64), dtype=np.int16)
    strip = label_height(64)  # the word's strip above its panel
    panel = figure[4 + strip : 4 + strip + 64, 4 + 64 + 4 : 4 + 64 + 4 + 64]  # the word's panel
    want = np.asarray(overlay(image, one[0], 64, SMALL_CNN_64), dtype=np.int16)
    tiled = np.asarray(overlay(image, one[0], 64), dtype=np.int16)
    assert np.abs(panel - want).max() <= 1 < np.abs(panel - tiled).max()


def test_the_overlay_of_tiles_is_bilinear_upsampling_and_cells_sharing_a_centre_add_up():
    att = torch.rand(3, 5)
    want = torch.nn.functional.interpolate(att[None, None], size=(97, 61), mode="bilinear", align_corners=False)[0, 0]
    assert np.abs(heatmap(att, 61, 97) - (want / want.max()).numpy()).max() < 1e-5
    shared = CellCentres((0.5,), (0.25, 0.25, 0.75))  # cells 0 and 1 pooled from one
    heat = heatmap(torch.tensor([[0.5, 0.3, 0.2]]), 40, 1, shared)
    assert heat[0, 0] == pytest.approx(1.0) and heat[0, -1] == pytest.approx(0.2 / 0.8)
    with pytest.raises(ValueError, match="8x8 cells with centres for"):
        heatmap(torch.rand(8, 8), 64, 64, CellCentres.tiling((4, 4)))


def test_pointing_and_attention_mass_use_the_cells_regions_around_their_centres():
    """On 64 px with centres 8 i + 1/2, cell i's region (the pixels nearer its centre than any other's) is
    [8 i - 3.5, 8 i + 4.5], cut to the image: cell 0 has [0, 4.5], cell 7 [52.5, 64]."""
    words = ["a", "small", "red", "square"]
    square = [{"shape": "square", "color": "red", "size": "small", "box": [24, 24, 31, 31]}]  # [24, 32)
    cell = lambda r, c: torch.eye(64)[[r * 8 + c] * 4]  # noqa: E731
    assert pointing_hits(words, cell(4, 4), SMALL_CNN_64, square, (64, 64)) == (1, 1)  # [28.5, 36.5] touches
    assert pointing_hits(words, cell(2, 2), SMALL_CNN_64, square, (64, 64)) == (0, 1)  # [12.5, 20.5] does not
    assert pointing_hits(words, cell(2, 2), CellCentres.tiling((8, 8)), square, (64, 64)) == (1, 1)  # tile [16, 24]
    assert pointing_hits(words, cell(5, 5), SMALL_CNN_64, square, (64, 64)) == (0, 1)  # [36.5, 44.5]
    right = torch.zeros(64)
    right[7] = 1.0  # row 0, column 7: [52.5, 64] x [0, 4.5]
    assert attention_mass(right, [58, 0, 63, 63], SMALL_CNN_64, (64, 64)) == pytest.approx(6 / 11.5)
    assert attention_mass(right, [0, 4, 63, 63], SMALL_CNN_64, (64, 64)) == pytest.approx(0.5 / 4.5)
    # the regions share the whole image out: a uniform map's mass over it is 1, also with cells sharing a centre
    # and a last centre past the edge (10 px regions cut to 0 px count where they end)
    assert attention_mass(torch.full((64,), 1 / 64), [0, 0, 63, 63], SMALL_CNN_64, (64, 64)) == pytest.approx(1.0)
    odd = CellCentres((0.5,), (0.2, 0.2, 0.6, 1.2, 1.4))
    uniform = torch.full((5,), 0.2)
    assert attention_mass(uniform, [0, 0, 99, 9], odd, (100, 10)) == pytest.approx(1.0)
    # [0, 40) belongs to the two cells at 0.2, [40, 90) to 0.6, [90, 100) to 1.2, nothing to 1.4
    assert attention_mass(uniform, [0, 0, 39, 9], odd, (100, 10)) == pytest.approx(0.4)
    assert attention_mass(uniform, [0, 0, 19, 9], odd, (100, 10)) == pytest.approx(0.2)  # half of each one's region
    assert attention_mass(uniform, [40, 0, 89, 9], odd, (100, 10)) == pytest.approx(0.2)


def test_validation_grounds_each_word_where_its_cell_looks(tmp_path):
    """The module scores pointing with its encoder's centres: a map on cell (2, 2) misses the square at
    [24, 32) (its tile [16, 24] would have touched it), one on cell (4, 4) hits it."""
    from captioning.data.records import CaptionRecord
    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    module = CaptionModule(vocab=[*SPECIALS, "a", "small", "red", "square"], embed_dim=8, hidden_dim=8, image_size=64)
    assert module.cell_centres == SMALL_CNN_64
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    square = {"shape": "square", "color": "red", "size": "small", "box": [24, 24, 31, 31]}
    record = CaptionRecord(tmp_path / "a.png", ["a small red square"], [["a", "small", "red", "square"]], "a", "val")
    record.objects = [square]
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(records=lambda split: [record]), sanity_checking=False)
    tokens = module.vocab.encode(["a", "small", "red", "square"])[1:]  # what search returns: words, then <end>
    for (row, col), hit in (((2, 2), 0.0), ((4, 4), 1.0)):
        attention = torch.eye(64)[[row * 8 + col] * len(tokens)]  # (T,N)
        metrics, _ = module._score_outputs("val", [(0, tokens, attention)], meteor=False)
        assert metrics["pointing_accuracy"] == hit and metrics["pointing_accuracy_color"] == hit, (row, col)


def test_a_caption_carries_where_its_cells_sit(tiny_ckpt, tiny_shapes):
    from captioning.inference import Captioner

    cap = Captioner.from_checkpoint(tiny_ckpt).caption(tiny_shapes.parent / "images" / "000000.png")
    assert cap.attention.shape[1:] == (8, 8) and cap.centres == SMALL_CNN_64  # the tiny run: small_cnn on 64 px
