"""The contracts between encoder, decoder and search (stable: change only with every caller).

Shape legend: B batch, K beams, T tokens, N grid cells (h*w), C channels, D model width,
V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

DecoderState = dict[str, torch.Tensor]  # every tensor batch-first, so search can index_select(0, idx)


class EncoderOutput(NamedTuple):
    features: torch.Tensor  # (B,N,C)
    grid: tuple[int, int]  # (h,w) with h*w == N, row-major


class Encoder(nn.Module):
    """``images (B,3,H,W) -> EncoderOutput(features (B,N,C), grid (h,w))``; ``out_dim`` == C."""

    out_dim: int
    #: weights fixed and BatchNorm statistics too: a frozen encoder stays in eval mode
    freeze: bool = False

    def set_frozen(self, freeze: bool) -> None:
        """Fix (or release) every weight of the encoder; see :attr:`freeze`."""
        self.freeze = freeze
        self.requires_grad_(not freeze)
        self.train(self.training)

    def train(self, mode: bool = True) -> Encoder:
        # a frozen BatchNorm must not update its running statistics, whatever mode the model is put in
        return super().train(mode and not self.freeze)

    def forward(self, images: torch.Tensor) -> EncoderOutput:  # pragma: no cover - interface
        raise NotImplementedError


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
