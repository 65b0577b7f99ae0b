"""Soft attention over the encoder grid (Xu et al. 2015, "Show, Attend and Tell").

A score per grid cell, a softmax into weights alpha, the weighted sum of features as the context.
The part of the score that depends only on the image (the key projection) is computed once per
image by :meth:`precompute`, not at every word. Queries come grouped by image (B*M rows for B
images: an image's M captions in training, its M beams in search), and each image's keys and
features are read once for all of its M queries.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rows_per_image(query: torch.Tensor, images: int) -> int:
    """Rows of queries per image: queries come grouped by image, row r belongs to image r // M."""
    rows = query.size(0)
    if rows % images:
        raise ValueError(f"{rows} query rows cannot be grouped over {images} images")
    return rows // images


def _attend(scores: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B,M,N), features (B,N,C) -> context (B*M,C), alpha (B*M,N): softmax, then the weighted sum.

    The M queries of an image (its captions in training, its beams in search) read the image's
    features once, in one (M,N)@(N,C) product, instead of each reading its own copy.
    """
    alpha = scores.softmax(dim=-1)
    context = torch.bmm(alpha, features)  # (B,M,N)@(B,N,C) -> (B,M,C)
    return context.flatten(0, 1), alpha.flatten(0, 1)


class AdditiveAttention(nn.Module):
    """score_n = v^T tanh(W_f f_n + W_h h) (Bahdanau-style MLP scoring, as in Show-Attend-Tell)."""

    def __init__(self, feature_dim: int, query_dim: int, attention_dim: int):
        super().__init__()
        self.key = nn.Linear(feature_dim, attention_dim)
        self.query = nn.Linear(query_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def precompute(self, features: torch.Tensor) -> torch.Tensor:
        return self.key(features)  # (B,N,C) -> (B,N,A)

    def forward(
        self, features: torch.Tensor, keys: torch.Tensor, query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B,N,C), keys (B,N,A), query (B*M,Q) grouped by image -> context (B*M,C), alpha (B*M,N)."""
        b, n, a = keys.shape
        q = self.query(query).view(b, rows_per_image(query, b), 1, a)  # (B,M,1,A)
        hidden = keys.unsqueeze(1) + q  # (B,M,N,A): the largest tensor of a step
        # tanh in place: one (B,M,N,A) buffer, not two; the score is a matrix-vector product against
        # the Linear(A,1)'s weight row, not a GEMM with a one-column output -> (B,M,N)
        scores = torch.matmul(hidden.tanh_(), self.score.weight[0]) + self.score.bias
        return _attend(scores, features)


class DotAttention(nn.Module):
    """score_n = (W_f f_n) . (W_h h) / sqrt(A): scaled dot-product scoring."""

    def __init__(self, feature_dim: int, query_dim: int, attention_dim: int):
        super().__init__()
        self.key = nn.Linear(feature_dim, attention_dim)
        self.query = nn.Linear(query_dim, attention_dim)
        self.scale = 1.0 / math.sqrt(attention_dim)

    def precompute(self, features: torch.Tensor) -> torch.Tensor:
        return self.key(features)  # (B,N,C) -> (B,N,A)

    def forward(
        self, features: torch.Tensor, keys: torch.Tensor, query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B,N,C), keys (B,N,A), query (B*M,Q) grouped by image -> context (B*M,C), alpha (B*M,N)."""
        b, n, a = keys.shape
        q = self.query(query).view(b, rows_per_image(query, b), a)  # (B,M,A)
        scores = torch.bmm(q, keys.transpose(1, 2)) * self.scale  # (B,M,A)@(B,A,N) -> (B,M,N)
        return _attend(scores, features)


def build_attention(kind: str, feature_dim: int, query_dim: int, attention_dim: int) -> nn.Module:
    """``kind``: "additive" (MLP) or "dot"."""
    if kind == "additive":
        return AdditiveAttention(feature_dim, query_dim, attention_dim)
    if kind == "dot":
        return DotAttention(feature_dim, query_dim, attention_dim)
    raise ValueError(f"attention must be 'additive' or 'dot', got {kind!r}")
