"""CaptionNet: an encoder and a decoder built from plain keyword arguments.

The same arguments are stored in every checkpoint (``checkpoint["captioning"]["model"]``), so
inference rebuilds the network without Lightning and without unpickling any code.
"""

from __future__ import annotations

import torch
from torch import nn

from captioning.errors import InputError
from captioning.models.base import Decoder, Encoder, EncoderOutput
from captioning.models.encoders import build_encoder
from captioning.models.lstm import LSTMDecoder
from captioning.models.transformer import TransformerDecoder

#: the options only one decoder reads: the other ignores them
DECODER_ONLY_OPTIONS = {
    "lstm": ("embed_dim", "attention_dim", "attention"),
    "transformer": ("num_heads", "num_layers", "ffn_dim", "tie_embeddings", "attention_layer", "max_len"),
}


def ignored_options(decoder: str) -> tuple[str, ...]:
    """The options of the other decoders, which ``decoder`` ignores."""
    return tuple(k for name, keys in DECODER_ONLY_OPTIONS.items() if name != decoder for k in keys)


class CaptionNet(nn.Module):
    """Encoder + decoder. ``decoder="lstm"`` uses embed_dim, hidden_dim, attention_dim and
    attention; ``decoder="transformer"`` uses hidden_dim as the model width D, num_heads,
    num_layers, ffn_dim, tie_embeddings, attention_layer and max_len."""

    def __init__(
        self,
        vocab_size: int,
        encoder: str = "small_cnn",
        encoder_stage: int = 4,
        encoder_grid: int | None = None,
        encoder_channels: tuple[int, ...] = (32, 64, 96, 128),
        freeze_encoder: bool = False,
        decoder: str = "lstm",
        embed_dim: int = 128,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        attention: str = "additive",
        dropout: float = 0.3,
        num_heads: int = 4,
        num_layers: int = 2,
        ffn_dim: int | None = None,
        tie_embeddings: bool = True,
        attention_layer: int = -1,
        max_len: int = 64,
    ):
        super().__init__()
        self.encoder: Encoder = build_encoder(encoder, encoder_stage, encoder_grid, freeze_encoder, encoder_channels)
        if decoder == "lstm":
            self.decoder: Decoder = LSTMDecoder(
                vocab_size, self.encoder.out_dim, embed_dim, hidden_dim, attention_dim, attention, dropout
            )
        elif decoder == "transformer":
            self.decoder = TransformerDecoder(
                vocab_size,
                self.encoder.out_dim,
                dim=hidden_dim,
                heads=num_heads,
                layers=num_layers,
                ffn_dim=ffn_dim,
                dropout=dropout,
                max_len=max_len,
                tie_embeddings=tie_embeddings,
                attention_layer=attention_layer,
            )
        else:
            raise InputError(f"decoder must be 'lstm' or 'transformer', got {decoder!r}")

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        return self.encoder(images)  # (B,3,H,W) -> (B,N,C), (h,w)

    def forward(self, images: torch.Tensor, tokens_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced: images (B,3,H,W), tokens_in (B,T) -> logits (B,T,V), attention (B,T,N)."""
        return self.decoder(self.encode(images).features, tokens_in)
