"""Image encoders: images (B,3,H,W) -> a grid of features (B,N,C).

- :class:`SmallCNN`: a few strided convolutions, fast on a CPU; the default for the shapes set.
  It appends two coordinate channels to its input (CoordConv, Liu et al. 2018) so that features
  know where they are: captions say "left of", and the context vector alone (a weighted sum)
  would otherwise lose the position.
- :class:`TorchvisionEncoder`: a torchvision ResNet cut after a chosen stage, optionally pooled
  to a fixed grid, frozen or fine-tuned.

Constructors build the architecture only. Pretrained weights are loaded explicitly with
:func:`load_encoder_weights` (a torchvision weights name, or a local state-dict file).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from captioning.errors import InputError, InputFileNotFoundError, InputIsADirectoryError, InputUnavailableError
from captioning.models.base import CellCentres, Encoder, EncoderOutput

_RESNET_STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "resnet152": (256, 512, 1024, 2048),
}

#: the encoder names build_encoder takes
ENCODERS = ("small_cnn", *_RESNET_STAGE_CHANNELS)


class _Axis(NamedTuple):
    """One axis of a feature map: ``n`` cells whose windows are centred at ``offset + step * i`` input pixels
    (continuous coordinates: pixel j spans [j, j + 1), so its centre is j + 1/2)."""

    n: int
    offset: float
    step: float


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _window(axis: _Axis, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> _Axis:
    """The axis after a sliding window: output cell o reads input cells o * stride - padding + m * dilation,
    m < kernel, so its centre is the input's centre at o * stride - padding + (kernel - 1) * dilation / 2."""
    span = axis.n + 2 * padding - dilation * (kernel - 1) - 1
    n = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (n - 1) * stride >= axis.n + padding:  # torch drops a last window that starts in the padding
        n -= 1
    return _Axis(n, axis.offset + axis.step * (dilation * (kernel - 1) / 2 - padding), axis.step * stride)


def _trace(module: nn.Module, axes: tuple[_Axis, _Axis]) -> tuple[_Axis, _Axis]:
    """Follow the two axes (y, x) through ``module``'s layers in order: convolutions and pooling move and
    space out the cells' centres, everything else acting per position leaves them."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        if isinstance(module.padding, str):  # Conv2d's "same" / "valid"
            name = type(module).__name__
            raise ValueError(f"cannot place the grid cells of a {name} with padding={module.padding!r}")
        dilation = _pair(getattr(module, "dilation", 1))
        ks, ss, ps = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding)
        ceil = bool(getattr(module, "ceil_mode", False))
        return tuple(_window(a, k, s, p, d, ceil) for a, k, s, p, d in zip(axes, ks, ss, ps, dilation))
    if isinstance(module, (BasicBlock, Bottleneck)):
        main = [module.conv1, module.conv2] + ([module.conv3] if isinstance(module, Bottleneck) else [])
        out = axes
        for conv in main:
            out = _trace(conv, out)
        if module.downsample is not None and _trace(module.downsample, axes) != out:
            raise ValueError("a residual block whose shortcut and main path place the cells differently")
        return out
    if isinstance(module, nn.Sequential):
        for child in module:
            axes = _trace(child, axes)
        return axes
    if isinstance(module, (nn.BatchNorm2d, nn.ReLU, nn.Identity)):
        return axes
    raise ValueError(f"cannot place the grid cells of a {type(module).__name__} layer")


def _centres(body: nn.Module, height: int, width: int, pool: int | None = None) -> CellCentres:
    """The centres of ``body``'s output cells (then adaptive-average-pooled to ``pool`` cells a side) on a
    ``height`` x ``width`` input, as fractions of it."""
    out = []
    for axis, size in zip(_trace(body, (_Axis(height, 0.5, 1.0), _Axis(width, 0.5, 1.0))), (height, width)):
        pos = [axis.offset + axis.step * i for i in range(axis.n)]
        if pool:  # AdaptiveAvgPool2d: output i averages input cells floor(i n / g) .. ceil((i + 1) n / g) - 1
            n = axis.n
            bins = [(i * n // pool, -(-(i + 1) * n // pool)) for i in range(pool)]
            pos = [sum(pos[a:b]) / (b - a) for a, b in bins]
        out.append(tuple(p / size for p in pos))
    return CellCentres(*out)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(Encoder):
    """Four 3x3 conv layers with strides 2, 2, 1, 2: a 64x64 image gives an 8x8 grid.

    The receptive field of a grid cell is 23 px: wide enough to see a whole object centred on
    it, narrow enough that a cell does not describe the whole scene, so naming an object needs
    attention on it (what makes the attention maps meaningful).
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 96, 128), freeze: bool = False):
        super().__init__()
        if len(channels) != 4:
            raise InputError(f"small_cnn takes 4 channel widths, got {list(channels)}")
        c0, c1, c2, c3 = channels
        self.body = nn.Sequential(
            _conv_bn(3 + 2, c0, 2),  # /2, +2 coordinate channels
            _conv_bn(c0, c1, 2),  # /4
            _conv_bn(c1, c2, 1),
            _conv_bn(c2, c3, 2),  # /8
        )
        self.out_dim = c3
        self.set_frozen(freeze)  # frozen: a fixed random projection, for tests and comparisons

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        x = self.body(torch.cat([images, xs, ys], dim=1))  # (B,5,H,W) -> (B,C,h,w)
        gh, gw = x.shape[-2:]
        return EncoderOutput(x.flatten(2).transpose(1, 2), (gh, gw))  # (B,C,h,w) -> (B,N,C)

    def cell_centres(self, height: int, width: int) -> CellCentres:
        """Its receptive fields' centres: cell i at pixel 8 i (+ 1/2), not 8 i + 4 (padded stride-2 convs)."""
        return _centres(self.body, height, width)


class TorchvisionEncoder(Encoder):
    """A torchvision ResNet cut after ``stage`` (1-4), optionally adaptive-pooled to ``grid``.

    ``freeze`` keeps the backbone's weights fixed and its BatchNorm in eval mode.
    """

    def __init__(self, arch: str = "resnet50", stage: int = 4, grid: int | None = None, freeze: bool = True):
        super().__init__()
        if arch not in _RESNET_STAGE_CHANNELS:
            raise InputError(f"encoder arch must be one of {sorted(_RESNET_STAGE_CHANNELS)}, got {arch!r}")
        if stage not in (1, 2, 3, 4):
            raise InputError(f"encoder stage must be 1..4, got {stage}")
        if grid is not None and (isinstance(grid, bool) or not isinstance(grid, int) or grid < 0):
            raise InputError(f"encoder grid must be a whole number of cells a side (0 or None: no pool), got {grid!r}")
        net = torchvision.models.get_model(arch, weights=None)
        layers = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4]
        self.arch = arch
        self.body = nn.Sequential(*layers[: 4 + stage])
        self.pool_grid = grid  # cells a side after pooling (None: the stage's own grid)
        self.pool = nn.AdaptiveAvgPool2d(grid) if grid else nn.Identity()
        self.out_dim = _RESNET_STAGE_CHANNELS[arch][stage - 1]
        self.set_frozen(freeze)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        x = self.pool(self.body(images))  # (B,3,H,W) -> (B,C,h,w)
        gh, gw = x.shape[-2:]
        return EncoderOutput(x.flatten(2).transpose(1, 2), (gh, gw))  # (B,N,C)

    def cell_centres(self, height: int, width: int) -> CellCentres:
        """Its receptive fields' centres (cell i of stage 4 at pixel 32 i + 1/2), averaged over each pooling bin."""
        return _centres(self.body, height, width, self.pool_grid or None)


def build_encoder(
    name: str = "small_cnn",
    stage: int = 4,
    grid: int | None = None,
    freeze: bool = False,
    channels: tuple[int, ...] = (32, 64, 96, 128),
) -> Encoder:
    """``name``: "small_cnn" or a torchvision ResNet name ("resnet18" ... "resnet152"); ``stage`` and ``grid`` (0 or
    None: no pooling) shape a ResNet's grid, and are refused for small_cnn, which has neither."""
    if name == "small_cnn":
        if stage != 4 or grid:  # ignored before: grid 4 built the 8x8 grid without a word
            raise InputError(
                f"small_cnn has no stages or pooling (its grid is the image size / 8): stage {stage} and grid {grid} "
                "shape a ResNet's grid; leave them at 4 and None"
            )
        return SmallCNN(tuple(channels), freeze)
    if name not in _RESNET_STAGE_CHANNELS:
        raise InputError(f"encoder must be 'small_cnn' or one of {sorted(_RESNET_STAGE_CHANNELS)}, got {name!r}")
    return TorchvisionEncoder(name, stage, grid, freeze)


def load_encoder_weights(encoder: Encoder, weights: str) -> None:
    """Load pretrained weights into a :class:`TorchvisionEncoder`.

    ``weights`` is a local file (a state dict of the full torchvision model, loaded with
    ``weights_only=True``) or a torchvision weights name such as ``"DEFAULT"`` or
    ``"IMAGENET1K_V2"`` (fetched through torchvision's weights API, which downloads once into
    the torch hub cache). A file may hold the state dict under ``"state_dict"`` or ``"model"`` (as
    training checkpoints do) and with the ``"module."`` prefix of a DataParallel / DDP model; BatchNorm
    ``num_batches_tracked`` counters may be absent (files from before PyTorch 0.4.1 have none, and
    ``load_state_dict`` itself accepts that).
    """
    if not isinstance(encoder, TorchvisionEncoder):
        raise InputError(f"pretrained weights need a torchvision encoder, not {type(encoder).__name__}")
    path = Path(weights)
    if path.suffix in (".pt", ".pth", ".bin") or path.exists():
        if path.is_dir():
            raise InputIsADirectoryError(f"{path}: a folder, not an encoder weights file")
        if not path.is_file():
            raise InputFileNotFoundError(f"{path}: encoder weights file not found")
        # torchvision's reference training scripts save their argparse options beside the weights ("args"):
        # a plain attribute bag, safe to allow (torch >= 2.5; before, such a file is refused below)
        allow = getattr(torch.serialization, "safe_globals", None)
        try:
            with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"{path}: cannot load encoder weights ({e})") from e
        for wrapper in ("state_dict", "model"):  # a training checkpoint: the weights and more
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{path}: not a state dict (a dict of tensors) but a {type(state).__name__}")
        if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel / DDP wrapper
            state = {k[len("module.") :]: v for k, v in state.items()}
    else:
        enum = torchvision.models.get_model_weights(encoder.arch)
        try:
            spec = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
        except KeyError:
            raise InputError(
                f"unknown weights {weights!r} for {encoder.arch}: no such file, nor one of torchvision's names "
                f"{['DEFAULT', *(w.name for w in enum)]}"
            ) from None
        try:
            state = spec.get_state_dict(progress=True)
        except OSError as e:  # offline (URLError), a proxy, a full or read-only hub cache
            raise InputUnavailableError(
                f"{weights}: cannot get torchvision's {encoder.arch} weights {spec.name} from {spec.url} ({e}); "
                "without a network, pass a local state-dict file"
            ) from e
    # torchvision's names ("conv1.weight", "layer1.0...") -> our Sequential's indices
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    mapped = {}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head in names and names.index(head) < len(encoder.body):
            mapped[f"{names.index(head)}.{rest}"] = v
    # check everything before copying anything, so a wrong file leaves the encoder untouched
    own = encoder.body.state_dict()
    # a missing BatchNorm counter is filled in by load_state_dict (0); it is not used with momentum set
    missing = [k for k in own if k not in mapped and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in mapped if k not in own]
    shapes = [
        f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in mapped and mapped[k].shape != v.shape
    ]
    problems = [
        f"{what} {items[:5]}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if items
    ]
    if problems:
        if not mapped:  # no ResNet names at all: show the file's own, so another prefix or format is plain
            problems.append(f"none of its {len(state)} keys is a ResNet's (first: {list(state)[:3]})")
        raise InputError(f"{weights}: weights do not fit {encoder.arch}: " + "; ".join(problems))
    encoder.body.load_state_dict(mapped)
