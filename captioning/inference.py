"""Inference without Lightning: ``Captioner.from_checkpoint(path).caption(image)``.

A checkpoint carries everything needed (``checkpoint["captioning"]``: vocabulary, model
arguments, preprocessing, grid; ``checkpoint["state_dict"]``: weights). It is read with
``torch.load(weights_only=True)``, so loading never runs code from the file.
"""

from __future__ import annotations

import contextlib
import operator
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from captioning.checkpoint_io import CheckpointError, load_weights_only
from captioning.data.images import load_image, to_rgb
from captioning.data.transforms import EvalTransform
from captioning.decoding import beam_search
from captioning.models.base import CellCentres, Encoder
from captioning.models.net import CaptionNet
from captioning.options import LENGTH_PENALTY_RANGE, length_penalty_ok
from captioning.vocab import Vocabulary, detokenize


@dataclass
class Caption:
    """A generated caption with the attention map (T,h,w) of each of its T tokens.

    ``text`` is for display (``vocab.detokenize``: "a man's hat", where ``tokens`` has "man", "'s").
    ``centres``: where the map's cells sit on the image (fractions of its height and width), what
    :func:`~captioning.visualize.attention_figure` needs to draw the maps where the model looked.
    """

    text: str
    tokens: list[str]
    score: float
    attention: torch.Tensor
    centres: CellCentres | None = None  # None: cells that tile the image


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a captioning checkpoint safely (``weights_only=True``); errors name the file and the cause."""
    ckpt = load_weights_only(path, map_location=map_location)
    if not isinstance(ckpt, dict) or "captioning" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a captioning checkpoint (no 'captioning' metadata or weights)")
    return ckpt


def find_latest_checkpoint(root: str | Path = "runs") -> Path:
    """The best checkpoint (``best*.ckpt``) of the newest run under ``root`` (what ``python train.py``
    writes): the run whose checkpoints folder holds the most recently written checkpoint. A newest run
    without a best checkpoint (its validation never ran) is an error naming its ``last.ckpt``, not a
    silent fall-back to an older, possibly unrelated run's model."""
    root = Path(root)
    runs = {}  # checkpoints folder -> time of its newest checkpoint
    for ckpt in root.glob("**/checkpoints/*.ckpt"):
        if (mtime := _mtime(ckpt)) is not None:
            runs[ckpt.parent] = max(runs.get(ckpt.parent, 0.0), mtime)
    if not runs:
        where = root if root.is_absolute() else f"{root} ({root.absolute()})"  # relative to where it ran
        raise CheckpointError(f"{where}: no checkpoint found; train one with `python train.py` or pass --ckpt")
    newest = max(runs, key=runs.get)
    best = sorted((t, p) for p in newest.glob("best*.ckpt") if (t := _mtime(p)) is not None)  # (mtime, path)
    if best:
        return best[-1][1]
    last = newest / "last.ckpt"
    named = f"its last checkpoint is {last}: pass it" if last.is_file() else "pass a checkpoint"
    raise CheckpointError(
        f"{root}: the newest run ({newest.parent}) has no best checkpoint (best.ckpt needs a validation); "
        f"{named} with --ckpt"
    )


def _mtime(path: Path) -> float | None:
    """When ``path`` was last written, None where it is not there: a dangling link, or a checkpoint that a
    running training replaced between the listing and this look (a traceback before)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _whole_number(name: str, value: object) -> int:
    """``value`` as an int of at least 1, or ValueError naming ``name``: an int, a numpy or torch integer, an
    integral float such as a stored 24.0 (2.5 failed only in the search's range()); no bool."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        # a bool is an int to Python (True was a beam of 1, a stored max_len True one word), and a torch bool
        # tensor an index
        if isinstance(value, bool) or getattr(value, "dtype", None) == torch.bool:
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _search_settings(beam_size: int, max_len: int, length_penalty: float) -> tuple[int, int, float]:
    """The search settings as the beam search takes them, or ValueError: ``beam_size`` and ``max_len`` whole
    numbers of at least 1 (:func:`_whole_number`), ``length_penalty`` a finite real number."""
    beam_size, max_len = _whole_number("beam_size", beam_size), _whole_number("max_len", max_len)
    if not length_penalty_ok(length_penalty):
        raise ValueError(f"length_penalty must be {LENGTH_PENALTY_RANGE}, got {length_penalty!r}")
    return beam_size, max_len, float(length_penalty)


class Captioner:
    """Captions images with a trained model and returns each word's attention map."""

    def __init__(
        self,
        net: CaptionNet,
        vocab: Vocabulary,
        image_size: int,
        mean: list[float],
        std: list[float],
        grid: tuple[int, int],
        beam_size: int = 3,
        max_len: int = 24,
        device: str | torch.device = "cpu",
        length_penalty: float = 0.0,
    ):
        beam_size, max_len, length_penalty = _search_settings(beam_size, max_len, length_penalty)
        # checked here, not at the first image (torchvision's "std evaluated to zero", a shape mismatch)
        if not (image_size >= 1 and len(mean) == 3 and len(std) == 3 and all(x > 0 for x in std)):
            raise ValueError(
                f"image_size must be at least 1, and mean and std 3 values (R, G, B), std each > 0; got "
                f"{image_size}, {list(mean)}, {list(std)}"
            )
        positions = getattr(net.decoder, "positions", None)  # the transformer's position table (P,D)
        if positions is not None and max_len > positions.size(0):
            # else the search fails only once some caption gets that long, mid-search (from_checkpoint caps it)
            raise ValueError(
                f"max_len {max_len} is more than the transformer decoder's position table covers "
                f"({positions.size(0)} words)"
            )
        # the caller's own module (moved to the device): its train/eval mode is left as it is, and each search
        # runs in eval mode (_caption_batch), whatever the caller sets between calls
        self.net = net.to(device)
        self.vocab = vocab
        self.transform = EvalTransform(image_size, mean, std)
        self.grid = tuple(grid)
        # where each cell's features come from on the (squashed) image, for overlays: not the middle of a tile
        self.centres = net.encoder.cell_centres(image_size, image_size)
        self.beam_size, self.max_len, self.length_penalty = beam_size, max_len, length_penalty
        self.device = torch.device(device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        beam_size: int | None = None,
        length_penalty: float | None = None,
    ) -> Captioner:
        """Rebuild the model from a checkpoint written by training (on any device, CPU by default). The
        search settings default to the checkpoint's: those its validation scores were measured with."""
        device = torch.device(device or "cpu")
        # the caller's settings, checked before the checkpoint's (whose errors name the file)
        _search_settings(1 if beam_size is None else beam_size, 1, 0.0 if length_penalty is None else length_penalty)
        ckpt = read_checkpoint(path, map_location="cpu")
        meta = ckpt["captioning"]
        try:
            vocab = Vocabulary(meta["vocab"])
            model = dict(meta["model"])
            if model.get("encoder", "small_cnn") == "small_cnn":
                # a ResNet's stage and pooling, which small_cnn never had: training refuses them now, but a checkpoint
                # from before may hold them, and they changed nothing in it
                model.pop("encoder_stage", None)
                model.pop("encoder_grid", None)
            with torch.random.fork_rng(devices=[]):  # its random initial weights, replaced below, drew from the
                net = CaptionNet(len(vocab), **model)  # caller's seeded generator
            pre, search, grid = meta["preprocess"], meta.get("search", {}), tuple(meta["grid"])
            image_size, mean, std = pre["image_size"], pre["mean"], pre["std"]
            state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a damaged or hand-edited file
            what = f"no {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise CheckpointError(f"{path}: the captioning metadata is incomplete or malformed ({what})") from None
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not match the stored model configuration ({e})") from None
        net.encoder.optimize_for_inference()  # BatchNorm folded into the convolutions: this net only infers
        net.eval()
        try:  # what is left to check is the checkpoint's (the caller's settings passed above)
            max_len = _whole_number("max_len", search.get("max_len", 24))
            positions = getattr(net.decoder, "positions", None)  # the transformer's position table (P,D)
            if positions is not None and max_len > positions.size(0):
                # a checkpoint from before training refused this: its search would step past the table
                warnings.warn(
                    f"{path}: its search length ({max_len}) is more than the transformer's position table covers "
                    f"({positions.size(0)}); captions are cut at {positions.size(0)} words",
                    stacklevel=2,
                )
                max_len = positions.size(0)
            captioner = cls(
                net,
                vocab,
                image_size,
                mean,
                std,
                grid,
                beam_size=beam_size if beam_size is not None else search.get("beam_size", 3),
                max_len=max_len,
                device=device,
                length_penalty=length_penalty if length_penalty is not None else search.get("length_penalty", 0.0),
            )
        except (TypeError, ValueError) as e:  # a damaged or hand-edited file: a traceback before, not naming it
            raise CheckpointError(f"{path}: its stored search or preprocessing settings are malformed ({e})") from None
        if captioner.centres.grid != grid:  # a hand-edited file: its maps would not fit the grid it names
            h, w = captioner.centres.grid
            raise CheckpointError(
                f"{path}: its grid {list(grid)} is not the {h}x{w} grid its encoder gives {image_size} px images"
            )
        return captioner

    @torch.no_grad()
    def caption(self, image: str | Path | Image.Image, beam_size: int | None = None) -> Caption:
        """Caption one image (a path or a PIL image)."""
        return self.caption_batch([image], beam_size)[0]

    @torch.no_grad()
    def caption_batch(
        self, images: list[str | Path | Image.Image], beam_size: int | None = None, batch_size: int = 32
    ) -> list[Caption]:
        """Caption several images, ``batch_size`` at a time through one batched beam search each (the same
        captions as one at a time; the batch bounds memory, so a long list does not hold every image's
        activations at once). Paths are read only when their batch comes."""
        if isinstance(images, (str, os.PathLike, Image.Image)):  # a str would be captioned letter by letter
            raise TypeError(f"caption_batch takes a list of images, got one {type(images).__name__}: use caption()")
        batch_size = _whole_number("batch_size", batch_size)  # 2.0 failed in range(), True was a batch of 1
        beam_size = self.beam_size if beam_size is None else beam_size
        beam_size, _, _ = _search_settings(beam_size, self.max_len, self.length_penalty)
        out = []
        for first in range(0, len(images), batch_size):
            out += self._caption_batch(images[first : first + batch_size], beam_size)
        return out

    def _caption_batch(self, images: list[str | Path | Image.Image], beam_size: int) -> list[Caption]:
        # a PIL image given directly is normalised as a file is (alpha onto white, EXIF orientation,
        # 16-bit scaled), so an image gives the same caption whether passed as a path or as an image
        pil = [_as_rgb(im) for im in images]
        x = torch.stack([self.transform(im) for im in pil]).to(self.device)  # (B,3,H,W)
        # eval mode for the search, then the mode the net had: a net in training mode decoded with dropout on (its
        # captions changed from call to call), and Captioner(net) had switched the caller's net to eval for good
        with _evaluating(self.net):
            enc = self.net.encode(x)
            hyps = beam_search(
                self.net.decoder,
                enc.features,
                beam_size=beam_size,
                max_len=self.max_len,
                length_penalty=self.length_penalty,
            )
        h, w = enc.grid
        out = []
        for hyp in hyps:
            best = hyp[0]
            words = [self.vocab.tokens[i] for i in best.tokens]
            attention = best.attention.reshape(-1, h, w)  # (T,N) -> (T,h,w)
            out.append(Caption(detokenize(words), words, best.score, attention, self.centres))
        return out


@contextlib.contextmanager
def _evaluating(net: nn.Module) -> Iterator[None]:
    """``net`` in eval mode inside the ``with``, then every module back in its own mode (and an encoder with the mode
    asked of it, see :meth:`Encoder.evaluating`): a caller's net may hold modules in different modes."""
    modes = [(m, m.training) for m in net.modules()]
    asked = [(m, m._mode_asked) for m in net.modules() if isinstance(m, Encoder)]
    net.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for m, mode in asked:
            m._mode_asked = mode


def _as_rgb(image: str | os.PathLike | Image.Image) -> Image.Image:
    """A path read by the loader, or a PIL image normalised as the loader does; anything else (a tensor,
    an array) is a TypeError saying what is taken, not an AttributeError from deep inside PIL code."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    raise TypeError(
        f"an image to caption is a path or a PIL image, got {type(image).__name__} "
        "(an array: PIL.Image.fromarray(array) first)"
    )
