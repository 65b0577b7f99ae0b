"""The contracts between encoder, decoder and search (stable: change only with every caller).

Shape legend: B batch, K beams, T tokens, N grid cells (h*w), C channels, D model width,
V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

DecoderState = dict[str, torch.Tensor]  # every tensor batch-first, so search can index_select(0, idx)


class EncoderOutput(NamedTuple):
    features: torch.Tensor  # (B,N,C)
    grid: tuple[int, int]  # (h,w) with h*w == N, row-major


class CellCentres(NamedTuple):
    """Where each grid cell sits on the image: the centre of the image window its features are computed
    from, as a fraction of the image's height (``ys``, one per grid row) and width (``xs``, one per
    column), 0 the top/left edge and 1 the bottom/right one (a last window hanging over the edge may be
    centred past 1). Non-decreasing; cells pooled from one cell share its centre. Fractions, not pixels,
    so they hold for the image at any size (the model sees it squashed to its input size).

    A strided convolution's cells do not tile the image: a ResNet cell's window is centred on pixel
    32 i (0.5 px from its top-left corner for i = 0), not 32 i + 16, so a map drawn as if the cells tiled
    it lands half a cell down and right of where the features looked."""

    ys: tuple[float, ...]
    xs: tuple[float, ...]

    @classmethod
    def tiling(cls, grid: tuple[int, int]) -> CellCentres:
        """Cells that tile the image, cell i of n centred at (i + 1/2) / n (a patch embedding's grid)."""
        return cls(*(tuple((i + 0.5) / n for i in range(n)) for n in grid))

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.ys), len(self.xs)


class Encoder(nn.Module):
    """``images (B,3,H,W) -> EncoderOutput(features (B,N,C), grid (h,w))``; ``out_dim`` == C."""

    out_dim: int
    #: weights fixed and BatchNorm statistics too: a frozen encoder stays in eval mode
    freeze: bool = False

    #: the mode the encoder was last put in (``train(mode)``), which a frozen encoder does not take
    _mode_asked: bool = True

    def set_frozen(self, freeze: bool) -> None:
        """Fix (or release) every weight of the encoder; see :attr:`freeze`. Released, it takes the mode its model
        was last put in (train() or eval()), not the eval mode it was held in while frozen."""
        self.freeze = freeze
        self.requires_grad_(not freeze)
        self.train(self._mode_asked)

    def train(self, mode: bool = True) -> Encoder:
        # a frozen BatchNorm must not update its running statistics, whatever mode the model is put in
        self._mode_asked = mode
        return super().train(mode and not self.freeze)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[Encoder]:
        """In eval mode inside the ``with``, then back in the mode it was in, and with the mode asked of it: the
        usual ``was = m.training; m.eval(); ...; m.train(was)`` recorded a frozen encoder's eval mode as asked,
        so once released it stayed in eval mode."""
        was, asked = self.training, self._mode_asked
        self.eval()
        try:
            yield self
        finally:
            self.train(was)
            self._mode_asked = asked

    def optimize_for_inference(self) -> Encoder:
        """Freeze the encoder for good, fold each BatchNorm into the convolution before it and keep the
        convolution weights channels-last: the same features (to float rounding) from fewer passes over
        the activations (64 shapes images: ~18 ms against 25-32 ms on the 2-core CPU). In place, and for
        inference only: the folded encoder cannot be trained any more, since the BatchNorm statistics
        are baked into its weights."""
        self.set_frozen(True)  # eval mode from now on: folding uses the running statistics
        fold_batchnorm(self)
        return self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> EncoderOutput:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def cell_centres(self, height: int, width: int) -> CellCentres:
        """Where the grid cells of a ``height`` x ``width`` input sit on it. This default assumes cells that
        tile the image (right for a patch embedding); a convolutional encoder overrides it with its
        receptive fields' centres."""
        p = next(self.parameters())
        with self.evaluating():
            grid = self(torch.zeros(1, 3, height, width, device=p.device, dtype=p.dtype)).grid
        return CellCentres.tiling((int(grid[0]), int(grid[1])))


def fold_batchnorm(module: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d that directly follows a Conv2d into that convolution: within an
    ``nn.Sequential`` (conv, bn, ...) or as a block's ``convX`` / ``bnX`` pair (torchvision ResNet blocks).
    The BatchNorm becomes an ``nn.Identity``. Returns how many were folded. Inference only: the folded
    convolution uses the BatchNorm's running statistics."""
    folded = 0
    for name, child in list(module.named_children()):
        folded += fold_batchnorm(child)
        if isinstance(child, nn.BatchNorm2d) and name.startswith("bn"):
            conv = getattr(module, "conv" + name[2:], None)
            if isinstance(conv, nn.Conv2d):
                setattr(module, "conv" + name[2:], fuse_conv_bn_eval(conv.eval(), child.eval()))
                setattr(module, name, nn.Identity())
                folded += 1
    if isinstance(module, nn.Sequential):
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module[i], module[i + 1] = fuse_conv_bn_eval(conv.eval(), bn.eval()), nn.Identity()
                folded += 1
    return folded


class Decoder(nn.Module):
    """A caption decoder that attends over encoder features.

    ``forward`` is teacher-forced; ``init_state``/``step`` decode one token at a time and must give
    the same logits as ``forward`` for the same prefix.
    """

    vocab_size: int
    #: state keys whose value is the same for every beam of an image (e.g. projected features):
    #: beam search, whose beams never leave their image, can skip reordering them
    per_image_state: tuple[str, ...] = ()

    def forward(self, features: torch.Tensor, tokens_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B,N,C), tokens_in (B,T) -> logits (B,T,V), attention (B,T,N); or tokens_in
        (B,M,T), M captions per image, -> (B,M,T,V), (B,M,T,N), each image's features read once."""
        raise NotImplementedError  # pragma: no cover - interface

    def init_state(self, features: torch.Tensor) -> DecoderState:
        """features (B,N,C) -> state, a dict of batch-first tensors."""
        raise NotImplementedError  # pragma: no cover - interface

    def step(
        self, tokens: torch.Tensor, state: DecoderState, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DecoderState]:
        """tokens (R,) -> logits (R,V), attention (R,N), new state.

        R = B*M rows grouped by image (row r decodes for image r // M): the state tensors named in
        ``per_image_state`` keep B rows, every other state tensor has R rows.
        """
        raise NotImplementedError  # pragma: no cover - interface

    @staticmethod
    def reorder(state: DecoderState, index: torch.Tensor) -> DecoderState:
        """Select batch rows ``index`` (B',) of every state tensor (beam search reordering)."""
        return {k: v.index_select(0, index) for k, v in state.items()}
