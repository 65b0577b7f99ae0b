"""Transformer caption decoder (Vaswani et al. 2017) whose cross-attention maps are exposed.

Pre-norm layers: causal self-attention, cross-attention over the encoder grid, feed-forward.
The attention modules are our own so that they return their weights (PyTorch's
``nn.TransformerDecoderLayer`` does not). The map used for overlays and grounding is the
cross-attention of one layer (``attention_layer``, default the last), averaged over heads.

Incremental decoding: ``init_state`` projects the grid to each layer's cross-attention keys and
values once; ``step`` appends one token's self-attention keys/values to a cache, so a step costs
O(t) rather than recomputing the prefix. All cached tensors are batch-first, so beam search
reorders them with ``index_select(0, idx)`` like any other state.
Shape legend: B batch, T tokens, N grid cells, C encoder channels, D model width, H heads, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from captioning.errors import InputError
from captioning.models.attention import rows_per_image, shift_only
from captioning.models.base import Decoder, DecoderState


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """(length, dim) fixed sinusoidal position encodings."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return pe


class Attention(nn.Module):
    """Multi-head scaled dot-product attention that returns its weights (B,H,Tq,Tk)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise InputError(f"model width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B,T,D) -> (B,H,T,dh)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the keys' half of the bias adds q . b to each query's every score: a shift the softmax drops
        bias = shift_only(self.kv.bias, count=self.kv.out_features // 2)
        k, v = nn.functional.linear(x, self.kv.weight, bias).chunk(2, dim=-1)  # (B,T,D) each
        return self.split(k), self.split(v)  # (B,H,T,dh)

    def forward(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (R,Tq,D) queries; k, v (B,H,Tk,dh); mask (Tq,Tk) True = blocked -> (R,Tq,D), weights.

        R = B*M query rows grouped by image (M = 1 for self-attention): the M rows of an image are
        laid side by side as one (M*Tq)-long query against that image's keys, so the keys and values
        are read once per image. Weights come as (B,H,M*Tq,Tk), which is (R,H,Tq,Tk) when M = 1.
        """
        r, tq, d = x.shape
        b = k.size(0)
        q = self.split(self.q(x.reshape(b, rows_per_image(x, b) * tq, d)))  # (R,Tq,D) -> (B,M*Tq,D) -> (B,H,M*Tq,dh)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B,H,M*Tq,Tk)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        y = self.dropout(weights) @ v  # (B,H,M*Tq,dh)
        y = y.transpose(1, 2).reshape(r, tq, d)  # (B,M*Tq,H,dh) -> (R,Tq,D)
        return self.out(y), weights


class DecoderLayer(nn.Module):
    """Pre-norm: x + SelfAttn(LN x), + CrossAttn(LN x, grid), + FFN(LN x)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.cross_attn = Attention(dim, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        self_kv: tuple[torch.Tensor, torch.Tensor],
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (R,T,D), R = B*M rows grouped by image -> (R,T,D), cross-attention weights (B,H,M*T,N)."""
        y, _ = self.self_attn(self.norm1(x), *self_kv, mask=mask)
        x = x + self.dropout(y)
        y, cross = self.cross_attn(self.norm2(x), *cross_kv)
        x = x + self.dropout(y)
        return x + self.dropout(self.ffn(self.norm3(x))), cross


class TransformerDecoder(Decoder):
    """Transformer decoder over the encoder grid.

    Args:
        vocab_size, feature_dim: V and C.
        dim, heads, layers, ffn_dim: D, H, depth, feed-forward width (default 4 D).
        dropout: dropout on attention weights and residual branches.
        max_len: longest sequence the position table covers.
        tie_embeddings: share the input embedding and output projection weights.
        attention_layer: the layer whose cross-attention (heads averaged) is returned (-1 = last).
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        dim: int = 256,
        heads: int = 4,
        layers: int = 2,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        max_len: int = 64,
        tie_embeddings: bool = True,
        attention_layer: int = -1,
    ):
        super().__init__()
        self.vocab_size, self.dim = vocab_size, dim
        if not -layers <= attention_layer < layers:  # a wrap-around would show (and train) another layer
            raise InputError(
                f"attention_layer must be in [{-layers}, {layers - 1}] for {layers} layers, got {attention_layer}"
            )
        self.attention_layer = attention_layer % layers
        self.embed = nn.Embedding(vocab_size, dim)
        self.register_buffer("positions", sinusoidal_positions(max_len, dim), persistent=False)
        self.memory = nn.Sequential(nn.Linear(feature_dim, dim), nn.LayerNorm(dim))
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn_dim or 4 * dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.out.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=dim**-0.5)
        self.per_image_state = tuple(f"cross_{kv}{i}" for i in range(layers) for kv in "kv")

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens (B,T) at positions start .. start+T-1 (every row at the same positions) -> (B,T,D).

        ``start`` is a Python int (0 in teacher forcing, the cache length in a step), so the bounds
        check never reads a tensor back from the device: no host sync per step."""
        end = start + tokens.size(1)
        if end > self.positions.size(0):
            raise ValueError(f"caption longer than the decoder's max_len ({self.positions.size(0)})")
        pos = self.positions[start:end].unsqueeze(0)  # (1,T,D)
        return self.dropout(self.embed(tokens) * math.sqrt(self.dim) + pos)

    def _cross_kv(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        memory = self.memory(features)  # (B,N,C) -> (B,N,D)
        # contiguous once per image: the split's transposed views would make every step's two
        # attention products copy them, (B,H,N,dh) twice per layer and word
        return [
            tuple(t.contiguous() for t in layer.cross_attn.keys_values(memory)) for layer in self.layers
        ]  # (B,H,N,dh) pairs

    def forward(self, features: torch.Tensor, tokens_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced, all positions in one parallel pass: tokens_in (B,T) or (B,M,T) ->
        logits (B,[M],T,V), attention (B,[M],T,N)."""
        tokens = tokens_in.flatten(0, 1) if tokens_in.dim() == 3 else tokens_in  # (R,T), R = B*M
        r, t = tokens.shape
        x = self._embed(tokens, 0)  # (R,T,D)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # (T,T) True above the diagonal
        cross_kv = self._cross_kv(features)
        attention = None
        for i, layer in enumerate(self.layers):
            self_kv = layer.self_attn.keys_values(layer.norm1(x))
            x, cross = layer(x, self_kv, cross_kv[i], causal)
            if i == self.attention_layer:
                attention = cross.mean(1).view(r, t, -1)  # (B,H,M*T,N) -> (B,M*T,N) -> (R,T,N)
        logits = self.out(self.norm(x))  # (R,T,V)
        return logits.view(*tokens_in.shape, -1), attention.view(*tokens_in.shape, -1)

    def init_state(self, features: torch.Tensor) -> DecoderState:
        state: DecoderState = {}
        for i, (k, v) in enumerate(self._cross_kv(features)):
            state[f"cross_k{i}"], state[f"cross_v{i}"] = k, v  # (B,H,N,dh): once per image
            empty = k.new_zeros(k.size(0), k.size(1), 0, k.size(3))  # (B,H,0,dh); per row once expanded
            state[f"self_k{i}"], state[f"self_v{i}"] = empty, empty
        return state

    def step(
        self, tokens: torch.Tensor, state: DecoderState, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DecoderState]:
        # every row is at the same step: the position is the length of the self-attention cache
        x = self._embed(tokens.unsqueeze(1), state["self_k0"].size(2))  # (R,1,D)
        new: DecoderState = {}
        attention = None
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.keys_values(layer.norm1(x))  # (R,H,1,dh)
            k = torch.cat([state[f"self_k{i}"], k], dim=2)  # (R,H,t+1,dh): the cache grows by one
            v = torch.cat([state[f"self_v{i}"], v], dim=2)
            cross_kv = (state[f"cross_k{i}"], state[f"cross_v{i}"])
            x, cross = layer(x, (k, v), cross_kv, None)
            new[f"self_k{i}"], new[f"self_v{i}"] = k, v
            new[f"cross_k{i}"], new[f"cross_v{i}"] = cross_kv
            if i == self.attention_layer:
                attention = cross.mean(1).view(tokens.size(0), -1)  # (B,H,M,N) -> (B,M,N) -> (R,N)
        return self.out(self.norm(x)).squeeze(1), attention, new  # (R,V), (R,N)
