"""Decoder contracts, for every decoder: shapes, step loop == teacher-forced forward, it learns."""

import copy

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from captioning.decoding import greedy
from captioning.models.encoders import SmallCNN, build_encoder
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


def test_grouped_teacher_forcing_equals_flat(decoder):
    """M captions per image, tokens (B,M,T), give what the same captions give with each image's features repeated."""
    m = 3
    feats, toks = torch.randn(B, N, C), torch.randint(0, V, (B, m, T))
    logits, att = decoder(feats, toks)  # (B,M,T,V), (B,M,T,N)
    flat_logits, flat_att = decoder(feats.repeat_interleave(m, 0), toks.flatten(0, 1))  # (B*M,T,V), (B*M,T,N)
    assert logits.shape == (B, m, T, V) and att.shape == (B, m, T, N)
    torch.testing.assert_close(logits, flat_logits.view(B, m, T, V), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(att, flat_att.view(B, m, T, N), rtol=1e-4, atol=1e-5)


def test_grouped_step_equals_flat_step(decoder):
    """R = B*M rows with per-image state kept one row per image step as the flat step over repeated features."""
    m = 4
    feats = torch.randn(B, N, C)
    static = set(decoder.per_image_state)
    state = decoder.init_state(feats)
    state = {k: v if k in static else v.repeat_interleave(m, 0) for k, v in state.items()}  # (B*M,...) but static
    flat_feats = feats.repeat_interleave(m, 0)  # (B*M,N,C)
    flat_state = decoder.init_state(flat_feats)
    for _ in range(3):  # different words per row, so the rows of an image drift apart
        toks = torch.randint(0, V, (B * m,))
        logits, att, state = decoder.step(toks, state, feats)
        flat_logits, flat_att, flat_state = decoder.step(toks, flat_state, flat_feats)
        torch.testing.assert_close(logits, flat_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(att, flat_att, rtol=1e-4, atol=1e-5)
        for k in state:
            if k in static:
                assert state[k].size(0) == B  # one row per image, never copied M times
            else:
                torch.testing.assert_close(state[k], flat_state[k], rtol=1e-4, atol=1e-5)


def test_chunked_inference_attention_equals_one_piece(monkeypatch):
    """Without autograd on a CPU the additive score is built a few images at a time: the same result as
    in one piece, with uneven chunks (5 images in chunks of 2, 2, 1) and a single image."""
    from captioning.models import attention

    torch.manual_seed(0)
    att = attention.AdditiveAttention(C, 24, 10)
    m, images = 3, 5
    feats, query = torch.randn(images, N, C), torch.randn(images * m, 24)
    keys = att.precompute(feats)
    whole = att(feats, keys, query)  # autograd on: one piece
    monkeypatch.setattr(attention, "CPU_CHUNK_BYTES", 2 * m * N * 10 * 4)  # 2 images' (M,N,A) fp32
    calls = []
    monkeypatch.setattr(att, "_score", lambda k, q, *a: calls.append(k.size(0)) or type(att)._score(att, k, q, *a))
    with torch.no_grad():
        chunked = att(feats, keys, query)
        single = att(feats[:1], keys[:1], query[:m])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as bf16-mixed validation runs it
            bf16 = att(feats, att.precompute(feats), query)  # bf16 keys: 4 images fit a chunk
    assert calls == [2, 2, 1, 1, 4, 1]
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(single, whole):
        torch.testing.assert_close(got, want[:m], rtol=1e-5, atol=1e-6)
    for got, want in zip(bf16, whole):
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.02)


def test_each_attention_kind_scores_by_its_own_formula():
    """The lstm-additive and lstm-dot decoders ran every contract test, which compare a decoder with itself:
    "dot" built as additive attention passed them all. Scores by hand from each module's weights, with
    autograd on and off (the inference path scores in chunks, via a sigmoid)."""
    torch.manual_seed(0)
    feats, query = torch.randn(2, N, C), torch.randn(2, 24)
    for kind in ("additive", "dot"):
        att = LSTMDecoder(V, C, embed_dim=8, hidden_dim=24, attention_dim=10, attention=kind).attention
        with torch.no_grad():
            k, q = att.key(feats), att.query(query)  # (B,N,A), (B,A)
            if kind == "dot":
                scores = (k @ q.unsqueeze(-1)).squeeze(-1) / 10**0.5
            else:
                scores = att.score(torch.tanh(k + q.unsqueeze(1))).squeeze(-1)
            want = scores.softmax(-1)  # (B,N)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                context, alpha = att(feats, att.precompute(feats), query)
            torch.testing.assert_close(alpha, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(context, (want.unsqueeze(-1) * feats).sum(1), rtol=1e-5, atol=1e-6)


def _shift_biases(decoder) -> list[tuple[torch.Tensor, int | None]]:
    """(bias, how many of its first entries) for each bias that only shifts all the scores of a softmax."""
    if isinstance(decoder, LSTMDecoder):
        att = decoder.attention
        return [(att.score.bias, None) if hasattr(att, "score") else (att.key.bias, None)]
    attentions = [a for layer in decoder.layers for a in (layer.self_attn, layer.cross_attn)]
    return [(a.kv.bias, a.kv.out_features // 2) for a in attentions]


def test_a_bias_that_only_shifts_a_softmax_changes_nothing_and_gets_a_gradient_of_exactly_zero(decoder):
    """Its true gradient is 0; rounding noise in its place made Adam move it by ~lr/10 a step in a direction set
    by summation order, so a DDP run's checkpoint and one process's differed there by 5e-5 after 6 steps."""
    feats, toks = torch.randn(B, N, C), torch.randint(0, V, (B, T))
    logits, att = decoder(feats, toks)
    (logits.square().mean() + att.square().mean()).backward()
    for bias, count in _shift_biases(decoder):
        assert torch.equal(bias.grad[:count], torch.zeros_like(bias[:count]))
        if count is not None:  # the values' half of the Transformer's bias learns
            assert bias.grad[count:].abs().sum() > 0
    with torch.no_grad():
        for bias, count in _shift_biases(decoder):
            bias[:count] += torch.randn_like(bias[:count])
        shifted = decoder(feats, toks)
    torch.testing.assert_close(shifted, (logits.detach(), att.detach()), rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_an_encoder_optimized_for_inference_gives_the_same_features_without_batchnorm(name):
    """Folding BatchNorm into the convolutions (Captioner's encoder) must not change the features."""
    torch.manual_seed(0)
    enc = build_encoder(name, stage=4 if name == "small_cnn" else 2, channels=(8, 8, 8, 8))  # small_cnn: no stages
    with torch.no_grad():  # running statistics far from (0, 1), so a wrong fold would show
        enc.train()(torch.randn(4, 3, 48, 48) * 3 + 2)
    enc.eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = enc(images)
        after = copy.deepcopy(enc).optimize_for_inference()
        out = after(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in after.modules())
    torch.testing.assert_close(out.features, before.features, rtol=1e-4, atol=1e-5)
    assert out.grid == before.grid
    after.train()  # the folded encoder stays in eval mode and frozen: it can no longer be trained
    assert not after.training and not any(p.requires_grad for p in after.parameters())


def test_an_encoder_released_from_freezing_takes_the_mode_its_model_was_put_in():
    """Staged fine-tuning (frozen, then released by a callback): the released encoder stayed in the eval mode it
    was held in while frozen, so its BatchNorm kept the statistics of the data it was pretrained on for the rest of
    the run (Lightning does not call train() again at an epoch's start)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(SmallCNN((8, 8, 8, 8), freeze=True))
    enc = model[0]
    bn = next(m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model.train()
    assert not enc.training  # frozen: eval mode, whatever its model's
    with enc.evaluating():  # as the default cell_centres and the feature cache use it (they recorded eval as asked)
        assert not enc.training
    enc.set_frozen(False)
    assert enc.training and bn.training and all(p.requires_grad for p in enc.parameters())
    before = bn.running_mean.clone()
    enc(torch.randn(2, 3, 32, 32) * 3 + 2)
    assert not torch.equal(bn.running_mean, before)
    enc.set_frozen(True)
    model.eval()
    enc.set_frozen(False)  # released inside a model in eval mode (a validation): eval it stays
    assert not enc.training and not bn.training


def test_overfits_one_small_batch(make):
    """Image-conditioned captions: the model must tell 4 images apart to get them all right."""
    torch.manual_seed(0)
    enc = SmallCNN((8, 16, 16, 16))
    dec = make(V, 16)
    images = torch.randn(4, 3, 32, 32)
    caps = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 8, 9, 2], [1, 4, 8, 10, 2], [1, 11, 5, 12, 2]])
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    enc.train(), dec.train()
    # 400 steps: at 200, 1 seed in 8 left a Transformer short of the captions (loss 0.08-0.21), which seed
    # it was depending on the CPU's rounding; at 400, 32 of 32 (4 decoders x seeds 0-7) got every caption
    for _ in range(400):
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


aten = torch.ops.aten
#: ops whose output size depends on the values: on a GPU they copy a count back to the host and wait
_SIZED_BY_VALUES = {aten.nonzero.default, aten.masked_select.default}
#: indexing ops that are such an op (a nonzero()) when an index is a boolean mask
_MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value back to the host (``int(t)``, ``t.item()``, ``bool(t)``) and ops
    whose output size depends on the values (``nonzero``, ``masked_select``, ``t[mask]`` and its backward):
    on a GPU each one waits for every queued kernel. On a CPU the second kind reads nothing back through
    ``_local_scalar_dense``, so it is counted by name."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._local_scalar_dense.default or func in _SIZED_BY_VALUES:
            self.reads += 1
        elif func in _MASK_INDEXING and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_step_and_forward_never_read_a_value_back_to_the_host(decoder):
    feats, toks = torch.randn(B, N, C), torch.randint(0, V, (B, T))
    with HostReads() as mode:
        decoder(feats, toks)
        state = decoder.init_state(feats)
        for t in range(T):
            _, _, state = decoder.step(toks[:, t], state, feats)
    assert mode.reads == 0
    with HostReads() as mode:  # the counter itself sees a read
        int(toks.max())
    assert mode.reads == 1
    with HostReads() as mode:  # and a boolean-mask index, forward and backward
        x = feats.requires_grad_()
        x[toks[:, 0] > V // 2].sum().backward()
    assert mode.reads == 2


def test_a_transformer_refuses_an_attention_layer_it_does_not_have():
    for bad in (2, -3):
        with pytest.raises(ValueError, match=f"attention_layer must be in \\[-2, 1\\] for 2 layers, got {bad}"):
            TransformerDecoder(V, C, dim=8, heads=2, layers=2, attention_layer=bad)
    assert TransformerDecoder(V, C, dim=8, heads=2, layers=2, attention_layer=-2).attention_layer == 0


def test_a_transformer_returns_the_chosen_layers_cross_attention_and_unties_when_told():
    """The "transformer-untied-first-layer" decoder above passed every contract test with the last layer's
    map and tied weights too: forward and step agree with each other whichever layer they both return."""
    torch.manual_seed(0)
    feats, toks = torch.randn(B, N, C), torch.randint(0, V, (B, T))
    for layer in (0, 1, -1):
        decoder = TransformerDecoder(V, C, dim=24, heads=2, layers=3, attention_layer=layer, max_len=16).eval()
        seen = []  # each layer's cross-attention weights (B,H,T,N), in order
        for block in decoder.layers:
            block.cross_attn.register_forward_hook(lambda module, args, out, seen=seen: seen.append(out[1]))
        _, att = decoder(feats, toks)
        torch.testing.assert_close(att, seen[layer].mean(1))  # heads averaged
        seen.clear()
        _, step_att, _ = decoder.step(toks[:, 0], decoder.init_state(feats), feats)
        torch.testing.assert_close(step_att, seen[layer].mean(1).squeeze(1))
    for tie in (True, False):
        decoder = TransformerDecoder(V, C, dim=24, heads=2, layers=1, tie_embeddings=tie)
        assert (decoder.out.weight is decoder.embed.weight) == tie


def test_a_transformer_refuses_positions_past_its_table():
    decoder = TransformerDecoder(V, C, dim=24, heads=4, layers=1, max_len=4).eval()
    feats = torch.randn(B, N, C)
    with pytest.raises(ValueError, match="longer than the decoder's max_len"):
        decoder(feats, torch.randint(0, V, (B, 5)))
    state = decoder.init_state(feats)
    for _ in range(4):
        _, _, state = decoder.step(torch.zeros(B, dtype=torch.long), state, feats)
    with pytest.raises(ValueError, match="longer than the decoder's max_len"):
        decoder.step(torch.zeros(B, dtype=torch.long), state, feats)


@pytest.mark.parametrize("decoder_name", ["lstm", "transformer"])
def test_a_training_step_never_reads_a_value_back_to_the_host(decoder_name):
    """CaptionModule.loss + backward on a grouped batch: on a GPU, a host read would stall every step."""
    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    torch.manual_seed(0)
    module = CaptionModule(
        vocab=[*SPECIALS, *"abcdefgh"], encoder="small_cnn", decoder=decoder_name, image_size=64, label_smoothing=0.1
    )
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(4, 12, (2, 3, 6))  # (B,3,H,W), (B,M,L)
    tokens[..., 0] = 1  # <start>
    tokens[1, 2] = 0  # image 1 has two captions: an all-<pad> row, which the loss leaves out
    with HostReads() as mode:
        loss, _ = module.loss(images, tokens)
        loss.backward()
    assert mode.reads == 0


def test_a_transformer_module_refuses_a_search_longer_than_its_position_table():
    """max_decode_len > max_len used to pass construction and a whole epoch, then stop the first validation."""
    from captioning.decoding import beam_search
    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    small = dict(vocab=[*SPECIALS, *"abcdef"], decoder="transformer", hidden_dim=16, num_heads=2, num_layers=1)
    small |= dict(encoder_channels=(8, 8, 8, 8), max_len=8)
    with pytest.raises(ValueError, match=r"model.max_decode_len \(9\) is more than model.max_len \(8\)"):
        CaptionModule(**small, max_decode_len=9)
    torch.manual_seed(0)
    module = CaptionModule(**small, max_decode_len=8).eval()
    feats = torch.randn(2, 16, module.net.encoder.out_dim)
    # the limit is exact: a search that never ends early reads positions 0 .. max_len - 1
    hyps = beam_search(module.net.decoder, feats, beam_size=2, max_len=8, min_len=8)
    assert [len(h[0].tokens) for h in hyps] == [8, 8]
    # the LSTM has no position table, so nothing limits its search
    CaptionModule(**{**small, "decoder": "lstm"}, max_decode_len=9)


def test_a_captioner_made_directly_refuses_a_search_longer_than_the_position_table():
    """from_checkpoint caps the search at the table (and warns); a Captioner made from a net directly took any
    max_len, and failed mid-search once a caption got that long (a review's repro: a 16-position table, max_len
    24, the end word made unlikely)."""
    from captioning.inference import Captioner
    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS, Vocabulary

    tokens = [*SPECIALS, *"abcdef"]
    small = dict(vocab=tokens, decoder="transformer", hidden_dim=16, num_heads=2, num_layers=1, max_len=8)
    net = CaptionModule(**small, encoder_channels=(8, 8, 8, 8), max_decode_len=8).net
    made = dict(vocab=Vocabulary(tokens), image_size=32, mean=[0.5] * 3, std=[0.25] * 3, grid=(1, 1))
    with pytest.raises(ValueError, match=r"max_len 9 is more than the transformer decoder's position table covers"):
        Captioner(net, **made, max_len=9)
    with pytest.raises(ValueError, match="max_len must be at least 1"):
        Captioner(net, **made, max_len=0)
    # the end word never wins: every caption runs to max_len, the table's last position
    end = torch.tensor([Vocabulary(tokens).end_id])
    net.decoder.out.register_forward_hook(lambda module, args, logits: logits.index_fill(-1, end, -1e4))
    caption = Captioner(net, **made, max_len=8).caption(Image.new("RGB", (32, 32)))
    assert len(caption.tokens) == 8


def step_loop(decoder, feats, toks):
    """The teacher-forced pass word by word through ``step`` (the modules one at a time, nn.LSTMCell for the
    LSTM): the reference for a decoder's own ``forward``. tokens (R,T) grouped by image -> logits (R,T,V),
    attention (R,T,N)."""
    state = decoder.init_state(feats)
    m = toks.size(0) // feats.size(0)
    static = set(decoder.per_image_state)
    state = {k: v if k in static else v.repeat_interleave(m, 0) for k, v in state.items()}
    logits, alphas = [], []
    for t in range(toks.size(1)):
        step_logits, alpha, state = decoder.step(toks[:, t], state, feats)
        logits.append(step_logits)
        alphas.append(alpha)
    return torch.stack(logits, 1), torch.stack(alphas, 1)


def gradients(decoder, feats, run):
    """Gradients of a fixed random function of ``run()``'s logits and attention, for every parameter and the
    features."""
    decoder.zero_grad()
    feats.grad = None
    logits, alpha = run()
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device) for x in (logits, alpha)]
    loss = (logits * weights[0]).sum() + (alpha * weights[1]).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in decoder.named_parameters() if p.grad is not None}
    return {**grads, "features": feats.grad.clone()}


@pytest.mark.parametrize("attention", ["additive", "dot"])
def test_the_lstms_lean_forward_is_its_step_in_value_and_gradient(attention):
    """The LSTM's forward takes each word's products of h as one, the embedding's share of the cell's input gates
    for all words before the loop, and the cell's pointwise part by hand: in float64, its logits, attention and
    every gradient (weights, biases, features) are those of the word-by-word step through the modules."""
    torch.manual_seed(0)
    decoder = LSTMDecoder(V, C, embed_dim=8, hidden_dim=24, attention_dim=10, attention=attention, dropout=0.0)
    decoder = decoder.double().train()
    m = 2
    feats = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    toks = torch.randint(0, V, (B, m, T))
    logits, alpha = decoder(feats, toks)
    ref_logits, ref_alpha = step_loop(decoder, feats, toks.flatten(0, 1))
    torch.testing.assert_close(logits.flatten(0, 1), ref_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(alpha.flatten(0, 1), ref_alpha, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # without autograd a CPU scores the attention in chunks (validation runs so)
        for got, want in zip(decoder(feats, toks), (logits, alpha)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    lean = gradients(decoder, feats, lambda: [x.flatten(0, 1) for x in decoder(feats, toks)])
    ref = gradients(decoder, feats, lambda: step_loop(decoder, feats, toks.flatten(0, 1)))
    assert lean.keys() == ref.keys() and len(ref) == len(list(decoder.parameters())) + 1  # every one, features too
    for name in ref:
        torch.testing.assert_close(lean[name], ref[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("dtype", "tol", "grad_tol"), [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 2e-2, 5e-2)])
def test_the_lstms_lean_forward_on_cuda_is_its_step(dtype, tol, grad_tol):
    """On a GPU the lean forward's cell is PyTorch's fused LSTM kernel, fed gates from other products than
    nn.LSTMCell's: the same logits, attention and gradients as the step through nn.LSTMCell, in float32 and
    under bfloat16 autocast (as training runs)."""
    torch.manual_seed(0)
    decoder = LSTMDecoder(V, 64, embed_dim=32, hidden_dim=48, attention_dim=40, dropout=0.0).cuda().train()
    feats = torch.randn(4, 49, 64, device="cuda", requires_grad=True)
    toks = torch.randint(0, V, (4, 3, 9), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits, alpha = decoder(feats, toks)
        ref_logits, ref_alpha = step_loop(decoder, feats, toks.flatten(0, 1))
        assert (logits.dtype, alpha.dtype) == (ref_logits.dtype, ref_alpha.dtype)
        torch.testing.assert_close(logits.flatten(0, 1).float(), ref_logits.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(alpha.flatten(0, 1).float(), ref_alpha.float(), rtol=tol, atol=tol)
        lean = gradients(decoder, feats, lambda: [x.flatten(0, 1).float() for x in decoder(feats, toks)])
        ref = gradients(decoder, feats, lambda: [x.float() for x in step_loop(decoder, feats, toks.flatten(0, 1))])
    assert lean.keys() == ref.keys() and len(ref) == len(list(decoder.parameters())) + 1
    for name in ref:
        scale = ref[name].abs().max().clamp_min(1e-6)
        assert (lean[name] - ref[name]).abs().max() / scale < grad_tol, name


@pytest.mark.parametrize("tanh_directly", [True, False])
def test_the_cpu_inference_score_is_the_same_with_tanh_or_through_the_sigmoid(monkeypatch, tanh_directly):
    """CPU_TANH picks how the no-autograd CPU score takes its tanh; either way the scores are the autograd path's
    (which takes tanh directly), and the way asked for is the one taken."""
    from captioning.models import attention

    torch.manual_seed(0)
    att = attention.AdditiveAttention(C, 24, 10)
    feats, query = torch.randn(4, N, C), torch.randn(4 * 3, 24)
    keys = att.precompute(feats)
    want = att(feats, keys, query)  # autograd on
    monkeypatch.setattr(attention, "CPU_TANH", tanh_directly)
    seen = []
    monkeypatch.setattr(att, "_score", lambda k, q, via: seen.append(via) or type(att)._score(att, k, q, via))
    with torch.no_grad():
        got = att(feats, keys, query)
    assert seen == [not tanh_directly]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_the_cpu_tanh_rule_follows_the_maker_unless_told(monkeypatch, tmp_path):
    from captioning.models import attention

    for vendor, intel in [("GenuineIntel", True), ("AuthenticAMD", False)]:
        cpuinfo = tmp_path / f"{vendor}.txt"
        cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 6\n")
        assert attention._cpu_is_intel(str(cpuinfo)) is intel
    assert attention._cpu_is_intel(str(tmp_path / "missing")) is False  # unreadable: the sigmoid, as before
    for intel in (True, False):
        monkeypatch.setattr(attention, "_cpu_is_intel", lambda: intel)  # noqa: B023 (called at once)
        monkeypatch.setattr(attention, "CPU_TANH", None)
        assert attention.cpu_tanh_directly() is intel
        monkeypatch.setattr(attention, "CPU_TANH", not intel)  # told: the maker no longer matters
        assert attention.cpu_tanh_directly() is (not intel)


class Casts(TorchDispatchMode):
    """Records the shape of every tensor cast to another dtype."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._to_copy.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_the_lstms_lean_forward_casts_its_joined_weights_once_under_autocast():
    """Autocast caches the casts of parameters, not of the weights the lean forward joins or slices: those are cast
    once before the loop over words, not at every word."""
    torch.manual_seed(0)
    decoder = LSTMDecoder(V, C, embed_dim=8, hidden_dim=24, attention_dim=10).train()
    joined = (10 + C + 4 * 24, 24)  # [query; gate; W_hh] (A+C+4H, H)
    context_part = (4 * 24, C)  # W_ih's context columns (4H, C)
    feats = torch.randn(B, N, C)
    for t in (2, 6):
        with torch.autocast("cpu", dtype=torch.bfloat16), Casts() as casts:
            logits, _ = decoder(feats, torch.randint(0, V, (B, t)))
        assert logits.dtype == torch.bfloat16
        assert casts.shapes.count(joined) == 1 and casts.shapes.count(context_part) == 1, casts.shapes


def test_build_encoder_refuses_what_it_would_have_ignored_and_names_every_encoder():
    """build_encoder("small_cnn", grid=4) built the 8x8 grid without a word (the config path refused it, the Python
    API did not); an unknown name listed the ResNets alone; a grid of 2.5 failed inside torch."""
    from captioning.errors import InputError

    for options in ({"grid": 4}, {"stage": 2}):
        with pytest.raises(InputError, match="small_cnn has no stages or pooling"):
            build_encoder("small_cnn", **options)
    with pytest.raises(InputError, match=r"encoder must be 'small_cnn' or one of \['resnet101'"):
        build_encoder("vgg16")
    for grid in (2.5, -1, True):
        with pytest.raises(InputError, match=f"encoder grid must be a whole number .*got {grid!r}"):
            build_encoder("resnet18", grid=grid)
    assert build_encoder("resnet18", grid=0).pool_grid == 0  # 0: no pooling, as the option says
