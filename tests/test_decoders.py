"""Decoder contracts, for every decoder: shapes, step loop == teacher-forced forward, it learns."""

import pytest
import torch

from captioning.decoding import greedy
from captioning.models.encoders import SmallCNN
from captioning.models.lstm import LSTMDecoder
from captioning.models.transformer import TransformerDecoder

B, N, C, T, V = 3, 16, 12, 7, 20

DECODERS = {
    "lstm-additive": lambda v, c: LSTMDecoder(v, c, embed_dim=8, hidden_dim=24, attention_dim=10, attention="additive"),
    "lstm-dot": lambda v, c: LSTMDecoder(v, c, embed_dim=8, hidden_dim=24, attention_dim=10, attention="dot"),
    "transformer": lambda v, c: TransformerDecoder(v, c, dim=24, heads=4, layers=2, max_len=16),
    "transformer-untied-first-layer": lambda v, c: TransformerDecoder(
        v, c, dim=24, heads=2, layers=3, tie_embeddings=False, attention_layer=0, max_len=16
    ),
}


@pytest.fixture(params=sorted(DECODERS))
def make(request):
    return DECODERS[request.param]


@pytest.fixture
def decoder(make):
    torch.manual_seed(0)
    return make(V, C).eval()


def test_forward_shapes_and_attention_is_a_distribution(decoder):
    feats, toks = torch.randn(B, N, C), torch.randint(0, V, (B, T))
    logits, att = decoder(feats, toks)
    assert logits.shape == (B, T, V) and att.shape == (B, T, N)
    torch.testing.assert_close(att.sum(-1), torch.ones(B, T))
    assert (att >= 0).all()


def test_step_loop_equals_teacher_forced_forward(decoder):
    feats, toks = torch.randn(B, N, C), torch.randint(0, V, (B, T))
    logits, att = decoder(feats, toks)
    state = decoder.init_state(feats)
    for t in range(T):
        step_logits, step_att, state = decoder.step(toks[:, t], state, feats)
        torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step_att, att[:, t], rtol=1e-4, atol=1e-5)


def test_cached_step_equals_full_recompute_of_the_prefix(decoder):
    """Each incremental step gives what a fresh forward over the whole prefix gives at its end."""
    feats, toks = torch.randn(B, N, C), torch.randint(0, V, (B, T))
    state = decoder.init_state(feats)
    for t in range(T):
        step_logits, step_att, state = decoder.step(toks[:, t], state, feats)
        full_logits, full_att = decoder(feats, toks[:, : t + 1])
        torch.testing.assert_close(step_logits, full_logits[:, -1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step_att, full_att[:, -1], rtol=1e-4, atol=1e-5)


def test_reorder_selects_rows(decoder):
    feats = torch.randn(B, N, C)
    state = decoder.init_state(feats)
    _, _, state = decoder.step(torch.ones(B, dtype=torch.long), state, feats)
    idx = torch.tensor([2, 0, 0])
    out = decoder.reorder(state, idx)
    for k in state:
        torch.testing.assert_close(out[k], state[k][idx])


def test_encoder_gives_an_8x8_grid_for_64px():
    out = SmallCNN((8, 8, 8, 8))(torch.randn(2, 3, 64, 64))
    assert out.grid == (8, 8) and out.features.shape == (2, 64, 8)


def test_overfits_one_small_batch(make):
    """Image-conditioned captions: the model must tell 4 images apart to get them all right."""
    torch.manual_seed(0)
    enc = SmallCNN((8, 16, 16, 16))
    dec = make(V, 16)
    images = torch.randn(4, 3, 32, 32)
    caps = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 8, 9, 2], [1, 4, 8, 10, 2], [1, 11, 5, 12, 2]])
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    enc.train(), dec.train()
    for _ in range(200):
        logits, _ = dec(enc(images).features, caps[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), caps[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval(), dec.eval()
    with torch.no_grad():
        logits, _ = dec(enc(images).features, caps[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), caps[:, 1:].reshape(-1))
    assert loss.item() < 0.1
    hyps = greedy(dec, enc(images).features, max_len=6)
    assert [h.tokens for h in hyps] == caps[:, 1:-1].tolist()
