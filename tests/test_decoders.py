"""Decoder contracts: shapes, step loop == teacher-forced forward, and it can learn."""

import pytest
import torch

from captioning.decoding import greedy
from captioning.models.encoders import SmallCNN
from captioning.models.lstm import LSTMDecoder

B, N, C, T, V = 3, 16, 12, 7, 20


@pytest.fixture(params=["additive", "dot"])
def decoder(request):
    torch.manual_seed(0)
    return LSTMDecoder(V, C, embed_dim=8, hidden_dim=24, attention_dim=10, attention=request.param).eval()


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
        torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step_att, att[:, t], rtol=1e-5, atol=1e-5)


def test_reorder_selects_rows(decoder):
    state = decoder.init_state(torch.randn(B, N, C))
    idx = torch.tensor([2, 0, 0])
    out = decoder.reorder(state, idx)
    for k in state:
        torch.testing.assert_close(out[k], state[k][idx])


def test_encoder_gives_an_8x8_grid_for_64px():
    out = SmallCNN((8, 8, 8, 8))(torch.randn(2, 3, 64, 64))
    assert out.grid == (8, 8) and out.features.shape == (2, 64, 8)


def test_overfits_one_small_batch():
    """Image-conditioned captions: the model must tell 4 images apart to get them all right."""
    torch.manual_seed(0)
    enc = SmallCNN((8, 16, 16, 16))
    dec = LSTMDecoder(V, 16, embed_dim=16, hidden_dim=48, attention_dim=16, dropout=0.0)
    images = torch.randn(4, 3, 32, 32)
    caps = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 8, 9, 2], [1, 4, 8, 10, 2], [1, 11, 5, 12, 2]])
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    for _ in range(200):
        logits, _ = dec(enc(images).features, caps[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), caps[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    enc.eval(), dec.eval()
    hyps = greedy(dec, enc(images).features, max_len=6)
    assert [h.tokens for h in hyps] == caps[:, 1:-1].tolist()
