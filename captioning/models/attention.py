"""Soft attention over the encoder grid (Xu et al. 2015, "Show, Attend and Tell").

A score per grid cell, a softmax into weights alpha, the weighted sum of features as the context.
The part of the score that depends only on the image (the key projection) is computed once per
image by :meth:`precompute`, not at every word.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _attend(scores: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B,N), features (B,N,C) -> context (B,C), alpha (B,N): softmax, then the weighted sum."""
    alpha = scores.softmax(dim=-1)
    context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B,1,N)@(B,N,C) -> (B,C)
    return context, alpha


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
        """features (B,N,C), keys (B,N,A), query (B,Q) -> context (B,C), alpha (B,N)."""
        hidden = keys + self.query(query).unsqueeze(1)  # (B,N,A): the largest tensor of a step
        scores = self.score(hidden.tanh_()).squeeze(-1)  # in place: one (B,N,A) buffer, not two -> (B,N)
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
        """features (B,N,C), keys (B,N,A), query (B,Q) -> context (B,C), alpha (B,N)."""
        q = self.query(query).unsqueeze(2)  # (B,A,1)
        scores = torch.bmm(keys, q).squeeze(2) * self.scale  # (B,N)
        return _attend(scores, features)


def build_attention(kind: str, feature_dim: int, query_dim: int, attention_dim: int) -> nn.Module:
    """``kind``: "additive" (MLP) or "dot"."""
    if kind == "additive":
        return AdditiveAttention(feature_dim, query_dim, attention_dim)
    if kind == "dot":
        return DotAttention(feature_dim, query_dim, attention_dim)
    raise ValueError(f"attention must be 'additive' or 'dot', got {kind!r}")
