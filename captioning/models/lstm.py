"""Show-Attend-Tell LSTM decoder (Xu et al. 2015, "Show, Attend and Tell", soft attention).

At each word: attend over the grid with the previous hidden state, gate the context with a
sigmoid of that state (the paper's beta), feed [word embedding, gated context] to an LSTMCell,
predict the next word with the paper's deep output layer (eq. 7),
``p(y_t) ~ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t))``. The initial h and c come from the mean
feature. The deep output matters for trustworthy maps: because the context z_t feeds the word
prediction directly, the easiest way to name an object is to look at it while naming it, rather
than to remember it from an earlier step.
The doubly stochastic regulariser lives in the training loss (it needs the padding mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from captioning.models.attention import build_attention
from captioning.models.base import Decoder, DecoderState


class LSTMDecoder(Decoder):
    per_image_state = ("keys",)

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 128,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        attention: str = "additive",
        dropout: float = 0.3,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.attention = build_attention(attention, feature_dim, hidden_dim, attention_dim)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.gate = nn.Linear(hidden_dim, feature_dim)
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.out_h = nn.Linear(hidden_dim, embed_dim)  # L_h
        self.out_z = nn.Linear(feature_dim, embed_dim, bias=False)  # L_z
        self.out = nn.Linear(embed_dim, vocab_size)  # L_o

    def init_state(self, features: torch.Tensor) -> DecoderState:
        mean = features.mean(dim=1)  # (B,N,C) -> (B,C)
        return {
            "h": torch.tanh(self.init_h(mean)),  # (B,H)
            "c": torch.tanh(self.init_c(mean)),  # (B,H)
            "keys": self.attention.precompute(features),  # (B,N,A): once per image, not per word
        }

    def _advance(
        self, tokens: torch.Tensor, state: DecoderState, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DecoderState]:
        """One LSTM step without the output layer: tokens (R,) for R = B*M rows grouped by image ->
        embedding (R,E), gated context (R,C), attention (R,N), new state (keys stay (B,N,A))."""
        h, c = state["h"], state["c"]
        context, alpha = self.attention(features, state["keys"], h)  # (R,C), (R,N)
        context = torch.sigmoid(self.gate(h)) * context
        emb = self.embed(tokens)  # (R,E)
        h, c = self.cell(torch.cat([emb, context], dim=1), (h, c))  # input (R,E+C)
        return emb, context, alpha, {"h": h, "c": c, "keys": state["keys"]}

    def _output(self, emb: torch.Tensor, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Deep output: (...,E), (...,H), (...,C) -> logits (...,V)."""
        return self.out(self.dropout(emb + self.out_h(h) + self.out_z(context)))

    def step(
        self, tokens: torch.Tensor, state: DecoderState, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DecoderState]:
        emb, context, alpha, state = self._advance(tokens, state, features)
        return self._output(emb, state["h"], context), alpha, state  # (B,V), (B,N)

    def forward(self, features: torch.Tensor, tokens_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B,N,C), tokens_in (B,T) or (B,M,T) (M captions per image) -> logits (B,[M],T,V),
        attention (B,[M],T,N).

        The same function as :meth:`step` word after word, in fewer and larger products: per word, one product of
        h for everything that reads it (the attention's query, the context gate, the cell's hidden gates) and one
        of the context for the cell's input gates; the embedding's share of the input gates for all words at
        once, before the loop; the output layer once, after it. Checkpoints keep the modules' own weights."""
        tokens = tokens_in.flatten(0, 1) if tokens_in.dim() == 3 else tokens_in  # (R,T), R = B*M
        m = tokens.size(0) // features.size(0)
        state = self.init_state(features)
        h, c, keys = state["h"], state["c"], state["keys"]
        if m > 1:  # every caption starts from its image's initial h, c; keys stay one per image
            h, c = h.repeat_interleave(m, 0), c.repeat_interleave(m, 0)
        query, gate, cell = self.attention.query, self.gate, self.cell
        e, a, g = self.embed.embedding_dim, query.out_features, gate.out_features
        emb = self.embed(tokens)  # (R,T,E)
        # word-major, so that each word's slice is contiguous: (T,R,E) -> (T,R,4H), input bias included
        emb_gates = F.linear(emb.transpose(0, 1), cell.weight_ih[:, :e], cell.bias_ih)
        w_h = torch.cat([query.weight, gate.weight, cell.weight_hh])  # (A+C+4H, H)
        b_h = torch.cat([query.bias, gate.bias, cell.bias_hh])  # (A+C+4H,)
        w_context = cell.weight_ih[:, e:]  # (4H, C)
        device = h.device.type
        if torch.is_autocast_enabled(device):
            # autocast caches the casts of parameters only: these joined and sliced weights would be cast again at
            # every word. Once here, as nn.LSTMCell's own weights were
            dtype = torch.get_autocast_dtype(device)
            w_h, b_h, w_context = w_h.to(dtype), b_h.to(dtype), w_context.to(dtype)
        hs, contexts, alphas = [], [], []
        for t in range(tokens.size(1)):
            q, gate_in, h_gates = F.linear(h, w_h, b_h).split([a, g, w_h.size(0) - a - g], dim=1)  # (R,A|C|4H)
            # contiguous: the fused attention kernels would copy the strided slice anyway, and keep the whole product
            # of h for their backward
            context, alpha = self.attention.attend(features, keys, q.contiguous())  # (R,C), (R,N)
            context = torch.sigmoid(gate_in) * context
            # (R,4H): W_hh h + b_hh + W_ic context in one product (the strided slice is the addmm's input term)
            h_gates = torch.addmm(h_gates, context, w_context.t())
            h, c = _lstm_cell(emb_gates[t], h_gates, c)
            hs.append(h)
            contexts.append(context)
            alphas.append(alpha)
        # the output layer runs once over all steps, outside the sequential loop: (R,T,*) -> (R,T,V)
        logits = self._output(emb, torch.stack(hs, 1), torch.stack(contexts, 1))
        alpha = torch.stack(alphas, 1)  # (R,T,N)
        return logits.view(*tokens_in.shape, -1), alpha.view(*tokens_in.shape, -1)


def _lstm_cell(
    input_gates: torch.Tensor, hidden_gates: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """An LSTM cell's pointwise part, gates (R,4H) in the order i, f, g, o with their biases in -> h, c (R,H): on a
    GPU PyTorch's fused kernel (the one nn.LSTMCell runs there), elsewhere and under torch.compile plain ops."""
    if input_gates.is_cuda and not torch.compiler.is_compiling():
        dtype = torch.promote_types(input_gates.dtype, hidden_gates.dtype)  # one dtype, as the kernel needs
        h, c, _ = torch._thnn_fused_lstm_cell(input_gates.to(dtype), hidden_gates.to(dtype), c.to(dtype))
        return h, c
    i, f, g, o = (input_gates + hidden_gates).chunk(4, dim=1)  # (R,H) each
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c
