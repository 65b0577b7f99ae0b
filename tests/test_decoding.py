"""Search: beam 1 == greedy, batch == one at a time, and the edge cases never crash."""

import pytest
import torch

from captioning.decoding import beam_search, greedy, sample
from captioning.models.base import Decoder
from captioning.models.lstm import LSTMDecoder
from captioning.vocab import Vocabulary


def _decoder(v=15):
    torch.manual_seed(1)
    return LSTMDecoder(v, 6, embed_dim=8, hidden_dim=16, attention_dim=8).eval()


def test_beam_size_one_equals_greedy():
    dec, feats = _decoder(), torch.randn(5, 9, 6)
    g = greedy(dec, feats, max_len=10)
    b = beam_search(dec, feats, beam_size=1, max_len=10)
    for gh, bh in zip(g, b):
        assert gh.tokens == bh[0].tokens
        assert abs(gh.score - bh[0].score) < 1e-4
        torch.testing.assert_close(gh.attention, bh[0].attention)


def test_batch_equals_one_image_at_a_time():
    dec, feats = _decoder(), torch.randn(4, 9, 6)
    batched = beam_search(dec, feats, beam_size=3, max_len=10, num_return=3)
    for i in range(4):
        single = beam_search(dec, feats[i : i + 1], beam_size=3, max_len=10, num_return=3)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        for s, b in zip(single, batched[i]):
            assert abs(s.score - b.score) < 1e-4
    # asking for fewer gives the best of them, with the same scores and maps, and with a length penalty
    for penalty in (0.0, 0.7):
        every = beam_search(dec, feats, beam_size=3, max_len=10, num_return=3, length_penalty=penalty)
        best2 = beam_search(dec, feats, beam_size=3, max_len=10, num_return=2, length_penalty=penalty)
        for all_hyps, two in zip(every, best2):
            assert len(two) == 2 and [h.score for h in all_hyps] == sorted((h.score for h in all_hyps), reverse=True)
            for a, b in zip(all_hyps, two):
                assert a.tokens == b.tokens and a.score == b.score
                torch.testing.assert_close(a.attention, b.attention)


def test_beam_is_at_least_as_good_as_greedy_and_attention_is_aligned():
    dec, feats = _decoder(), torch.randn(6, 9, 6)
    for g, b in zip(greedy(dec, feats, max_len=10), beam_search(dec, feats, beam_size=4, max_len=10)):
        assert b[0].score >= g.score - 1e-5
        assert b[0].attention.shape == (len(b[0].tokens), 9)


class _Scripted(Decoder):
    """A decoder whose next-word distribution is fixed: for testing search edge cases."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.vocab_size = logits.numel()

    def init_state(self, features):
        return {"dummy": features.new_zeros(features.size(0), 1)}

    def step(self, tokens, state, features):
        r, n = tokens.size(0), features.size(1)  # rows: B images x M beams
        return self.logits.expand(r, -1), features.new_full((r, n), 1.0 / n), state


class _EndsIfPositive(Decoder):
    """Image i ends at once when features[i, 0, 0] > 0, else says word 4 forever; records each step's batch."""

    def __init__(self, v: int = 6):
        super().__init__()
        self.vocab_size, self.batches = v, []

    def init_state(self, features):
        return {"dummy": features.new_zeros(features.size(0), 1)}

    def step(self, tokens, state, features):
        self.batches.append((tokens.size(0), features.size(0)))
        m = tokens.size(0) // features.size(0)
        ends = (features[:, 0, 0] > 0).repeat_interleave(m)  # (B*M,)
        logits = torch.full((tokens.size(0), self.vocab_size), -10.0)
        logits[:, 4] = torch.where(ends, -5.0, 0.0)
        logits[:, Vocabulary.end_id] = torch.where(ends, 0.0, -20.0)
        n = features.size(1)
        return logits, features.new_full((tokens.size(0), n), 1.0 / n), state


def test_finished_images_leave_the_batch_and_results_do_not_change():
    feats = torch.randn(3, 4, 3)
    feats[:, 0, 0] = torch.tensor([1.0, -1.0, 1.0])  # images 0 and 2 end: both beams by the second step
    dec = _EndsIfPositive()
    batched = beam_search(dec, feats, beam_size=2, max_len=5, num_return=2)
    # first step one row per image, then K rows per image, and only image 1's once 0 and 2 have ended
    assert dec.batches == [(3, 3), (6, 3), (2, 1), (2, 1), (2, 1)]
    assert batched[1][0].tokens == [4] * 5 and batched[1][0].attention.shape == (5, 4)
    for i in range(3):
        single = beam_search(dec, feats[i : i + 1], beam_size=2, max_len=5, num_return=2)[0]
        assert [(h.tokens, h.score) for h in single] == [(h.tokens, h.score) for h in batched[i]]
        for s, b in zip(single, batched[i]):
            torch.testing.assert_close(s.attention, b.attention)


def test_num_return_outside_one_to_beam_size_is_an_error():
    """The search keeps beam_size hypotheses: asking for more silently gave fewer, and 0 or -1 sliced the
    ranking to none or to all but the last."""
    dec, feats = _decoder(), torch.randn(2, 9, 6)
    for num_return in (3, 0, -1):
        with pytest.raises(ValueError, match=f"num_return must be between 1 and beam_size \\(2\\), got {num_return}"):
            beam_search(dec, feats, beam_size=2, max_len=4, num_return=num_return)
    assert [len(h) for h in beam_search(dec, feats, beam_size=2, max_len=4, num_return=2)] == [2, 2]


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(min_len=5), r"min_len must be between 0 and max_len \(4\), got 5"),
        (dict(min_len=-1), r"min_len must be between 0 and max_len \(4\), got -1"),
        (dict(no_repeat_ngram=-2), "no_repeat_ngram must be at least 0"),
        (dict(length_penalty=float("nan")), "length_penalty must be a finite number, got nan"),
        (dict(length_penalty=10**400), "length_penalty must be a finite number, got 1000"),  # no float: OverflowError
        (dict(length_penalty=True), "length_penalty must be a finite number, got True"),
    ],
)
def test_search_options_that_cannot_hold_are_refused(option, message):
    """Before, min_len > max_len returned every caption cut at max_len (none could end), and a NaN length
    penalty made every final score NaN, so the returned order was arbitrary."""
    dec, feats = _decoder(), torch.randn(2, 9, 6)
    with pytest.raises(ValueError, match=message):
        beam_search(dec, feats, beam_size=2, max_len=4, **option)
    assert len(beam_search(dec, feats, beam_size=2, max_len=4, min_len=4)) == 2  # min_len = max_len is fine


def test_a_length_penalty_past_a_floats_range_ranks_in_logs():
    """GNMT's ((5 + len) / 6) ** alpha raised OverflowError for alpha 1e308, and fell to 0 (ZeroDivisionError) for
    -2000, once the search was done. The quotient now rounds as a float would (-0.0, -inf), and hypotheses whose
    quotients round alike are ranked by its logarithm: the order exact arithmetic gives. A subnormal penalty is
    taken in logs too."""
    from fractions import Fraction

    from captioning.decoding import _length_normalised

    dec, feats = _decoder(), torch.randn(2, 9, 6)
    for alpha in (1e308, 2000.0, -2000.0, -1e308):
        for hyps in beam_search(dec, feats, beam_size=3, max_len=6, length_penalty=alpha, num_return=3):
            assert len(hyps) == 3 and all(h.score <= 0 for h in hyps)
    # (score, length) pairs ranked by the exact quotient (Fractions, integer alphas), within and beyond a float's
    # range: (-600, 306) and (-100, 304) at alpha 180 overflow the penalty, yet their quotients are normal floats;
    # at 2000 and -2000 most round to -0.0 or -inf alike. Exact ties keep row order: (-0.6, 7), (-0.3, 1) at 1
    pairs = [(-3.0, 4), (-2.5, 9), (-40.0, 30), (-0.5, 2), (-7.25, 12), (-0.0, 5), (-0.6, 7), (-0.3, 1)]
    pairs += [(-600.0, 306), (-100.0, 304), (-5.0, 310), (-1e-3, 299)]
    # at -257 the penalty of 100 and 101 tokens is a subnormal float (3e-321: a few bits), not an error, and the
    # quotients of these two, normal floats, ranked the wrong way
    pairs += [(-2.28e-12, 100), (-1.99518e-13, 101)]
    for alpha in (1, 2, -1, 180, 2000, -2000, -257):
        exact = sorted(pairs, key=lambda p: Fraction(p[0]) / (Fraction(5 + p[1], 6) ** alpha), reverse=True)
        ours = sorted(pairs, key=lambda p: tuple(-x for x in _length_normalised(p[0], p[1], alpha)))
        assert ours == exact, alpha


def test_model_that_never_ends_stops_at_max_len():
    logits = torch.full((6,), -10.0)
    logits[4] = 0.0  # always word 4, never <end>
    dec, feats = _Scripted(logits), torch.randn(2, 4, 3)
    for h in beam_search(dec, feats, beam_size=3, max_len=7):
        assert h[0].tokens == [4] * 7 and h[0].attention.shape == (7, 4)
    assert greedy(dec, feats, max_len=7)[0].tokens == [4] * 7


def test_max_len_zero_gives_empty_captions_in_every_search_and_negative_is_an_error():
    dec, feats = _decoder(), torch.randn(3, 9, 6)
    searches = [
        lambda m: [h[0] for h in beam_search(dec, feats, beam_size=2, max_len=m)],
        lambda m: greedy(dec, feats, max_len=m),
        lambda m: sample(dec, feats, max_len=m, generator=torch.Generator().manual_seed(0)),
    ]
    for search in searches:
        hyps = search(0)
        assert len(hyps) == 3
        for h in hyps:
            assert h.tokens == [] and h.score == 0.0 and h.attention.shape == (0, 9)
        with pytest.raises(ValueError, match="max_len must be at least 0, got -1"):
            search(-1)


def test_all_beams_end_at_first_step_and_beam_wider_than_vocab():
    logits = torch.full((5,), -10.0)
    logits[Vocabulary.end_id] = 0.0
    dec, feats = _Scripted(logits), torch.randn(2, 4, 3)
    for hyps in beam_search(dec, feats, beam_size=12, max_len=5, num_return=12):
        assert hyps[0].tokens == [] and hyps[0].attention.shape == (0, 4)
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)  # no duplicate hypotheses
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def _enumerate(dec, feats, max_len, length_penalty=0.0):
    """Exhaustive search: every word sequence that ends with <end> or reaches max_len, as (score, words),
    best first. With a length penalty, GNMT's |Y| is the number of scored tokens: the words, plus <end>
    when the sequence ended."""
    words = [i for i in range(dec.vocab_size) if i not in (Vocabulary.pad_id, Vocabulary.start_id)]
    found = []
    frontier = [((), 0.0, dec.init_state(feats))]
    for depth in range(max_len):
        nxt = []
        for seq, score, state in frontier:
            last = torch.tensor([seq[-1] if seq else Vocabulary.start_id])
            logits, _, new_state = dec.step(last, state, feats)
            logp = logits.log_softmax(-1)[0]
            for w in words:
                s = score + float(logp[w])
                if w == Vocabulary.end_id or depth == max_len - 1:
                    out = seq if w == Vocabulary.end_id else seq + (w,)
                    scored = len(out) + (w == Vocabulary.end_id)
                    found.append((s / ((5.0 + scored) / 6.0) ** length_penalty, out))
                else:
                    nxt.append((seq + (w,), s, new_state))
        frontier = nxt
    return sorted(found, key=lambda x: -x[0])


def _enumerate_best(dec, feats, max_len):
    return _enumerate(dec, feats, max_len)[0]


def test_beam_search_finds_the_exhaustive_optimum():
    """With a beam as wide as the search space, beam search must equal exhaustive enumeration."""
    for seed in range(3):
        torch.manual_seed(seed)
        dec = LSTMDecoder(6, 4, embed_dim=4, hidden_dim=8, attention_dim=4).eval()
        feats = torch.randn(1, 5, 4) * 2
        score, seq = _enumerate_best(dec, feats, max_len=3)
        hyp = beam_search(dec, feats, beam_size=16, max_len=3)[0][0]
        assert tuple(hyp.tokens) == seq
        assert abs(hyp.score - score) < 1e-4


@torch.no_grad()
def test_length_penalty_ranks_finished_and_cut_hypotheses_alike():
    """A beam wide enough to keep every sequence must rank them as exhaustive enumeration does, with a
    length penalty too: a hypothesis cut at max_len has no <end> in its score, so its length counts one
    token fewer than an ended one's (counting one more favoured cut hypotheses over ended ones)."""
    for seed in range(3):
        torch.manual_seed(seed)
        dec = LSTMDecoder(6, 4, embed_dim=4, hidden_dim=8, attention_dim=4).eval()
        feats = torch.randn(1, 5, 4) * 2
        for alpha in (1.0, 2.0):
            want = _enumerate(dec, feats, max_len=3, length_penalty=alpha)[:4]
            got = beam_search(dec, feats, beam_size=64, max_len=3, length_penalty=alpha, num_return=4)[0]
            assert [tuple(h.tokens) for h in got] == [seq for _, seq in want]
            for h, (score, _) in zip(got, want):
                assert abs(h.score - score) < 1e-4


def test_min_len_and_ngram_blocking():
    logits = torch.full((7,), -10.0)
    logits[Vocabulary.end_id] = 0.0
    logits[4], logits[5] = -1.0, -1.5
    dec, feats = _Scripted(logits), torch.randn(1, 4, 3)
    assert beam_search(dec, feats, beam_size=2, max_len=6)[0][0].tokens == []
    assert beam_search(dec, feats, beam_size=2, max_len=6, min_len=2)[0][0].tokens == [4, 4]
    blocked = beam_search(dec, feats, beam_size=3, max_len=6, min_len=4, no_repeat_ngram=2)[0][0].tokens
    bigrams = list(zip(blocked, blocked[1:]))
    assert len(blocked) >= 4 and len(bigrams) == len(set(bigrams))


def test_a_beam_left_no_word_by_min_len_and_ngram_blocking_stops_there_instead_of_vanishing():
    """One word besides the specials: <end> is forbidden until min_len and the word may appear once, so
    after one word no beam has a word to take. The beam stops there, like one cut at max_len; it used
    to die, and the image came back with no hypothesis at all."""
    logits = torch.tensor([0.0, 0.0, 0.0, -1.0, -2.0])  # pad, start, end, unk, one word (4)
    logp = logits.log_softmax(-1)
    dec, feats = _Scripted(logits), torch.randn(3, 4, 3)
    for k in (1, 2, 5):
        found = beam_search(dec, feats, beam_size=k, max_len=6, min_len=4, no_repeat_ngram=1, num_return=k)
        assert len(found) == 3
        for hyps in found:
            assert hyps, "an image got no hypothesis"
            # word 4, unk or both, each once: every such sequence, best first, with its summed log-prob
            assert all(len(set(h.tokens)) == len(h.tokens) <= 2 and set(h.tokens) <= {3, 4} for h in hyps)
            assert hyps[0].tokens in ([3, 4], [4, 3])
            assert abs(hyps[0].score - float(logp[3] + logp[4])) < 1e-5
            assert hyps[0].attention.shape == (2, 4)


def test_a_stuck_beam_never_beats_a_caption_that_keeps_to_min_len():
    """Three words, n-gram blocking and a long min_len: beams get stuck (no word left) while others go on.
    A stuck beam must die, as before, wherever its image has any candidate left: kept with a frozen score, it
    outranked the longer captions that keep to min_len (its score sums fewer words and no <end>). Only an
    image left no candidate at all gets its stuck beams back, so that it still has a caption."""
    fallbacks = 0
    for seed in range(24):
        torch.manual_seed(seed)
        dec = LSTMDecoder(6, 6, embed_dim=8, hidden_dim=16, attention_dim=8).eval()  # words 3, 4, 5
        feats = torch.randn(4, 9, 6)
        for min_len in (6, 8):
            found = beam_search(dec, feats, beam_size=4, max_len=12, min_len=min_len, no_repeat_ngram=2, num_return=4)
            for hyps in found:
                assert hyps, (seed, min_len)  # every image gets a caption
                keep = [h for h in hyps if len(h.tokens) >= min_len]
                if keep:  # a stuck (shorter) hypothesis never comes back beside one that keeps to min_len
                    assert keep == hyps, (seed, min_len, [h.tokens for h in hyps])
                else:
                    fallbacks += 1
    assert fallbacks > 0  # the fallback itself was exercised


def test_no_images_give_no_results_in_every_search():
    dec, feats = _decoder(), torch.randn(0, 9, 6)
    assert beam_search(dec, feats, beam_size=3, max_len=5) == []
    assert greedy(dec, feats, max_len=5) == []
    assert sample(dec, feats, max_len=5) == []


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sampling_is_seeded_and_top1_is_greedy():
    from captioning.decoding import sample

    dec, feats = _decoder(), torch.randn(4, 9, 6)
    a = sample(dec, feats, max_len=8, generator=torch.Generator().manual_seed(0))
    b = sample(dec, feats, max_len=8, generator=torch.Generator().manual_seed(0))
    assert [h.tokens for h in a] == [h.tokens for h in b]
    top1 = sample(dec, feats, max_len=8, top_k=1)
    assert [h.tokens for h in top1] == [h.tokens for h in greedy(dec, feats, max_len=8)]
    # top_k keeps exactly k words where several tie at the k-th value (it kept them all: top_k 1 drew among ties)
    logits = torch.full((9,), -10.0)
    logits[4:7] = 0.0  # words 4, 5, 6 tie
    tied, feats = _Scripted(logits), torch.randn(1, 4, 3)
    for k in (1, 2):
        words = {
            w for seed in range(30) for w in sample(tied, feats, max_len=6, top_k=k, generator=_seeded(seed))[0].tokens
        }
        assert len(words) == k and words <= {4, 5, 6}, (k, words)


def test_hypotheses_own_their_attention_rather_than_viewing_the_batch():
    """A view would keep (and pickle, when DDP gathers validation outputs) the whole batch's attention."""
    torch.manual_seed(0)
    decoder = LSTMDecoder(12, 6, embed_dim=8, hidden_dim=16, attention_dim=8).eval()
    feats = torch.randn(5, 9, 6)
    found = [h for hyps in beam_search(decoder, feats, beam_size=3, max_len=6, num_return=3) for h in hyps]
    found += greedy(decoder, feats, max_len=6)
    for h in found:
        att = h.attention
        assert att.shape == (len(h.tokens), 9)
        assert att.untyped_storage().nbytes() == att.numel() * att.element_size()


class _EndsAfter(Decoder):
    """Image i prefers <end> from its step ``features[i, 0, 0]`` on, and before that random words that differ by
    step (``features[i, 3 + t % 6]``), so that no two hypotheses tie."""

    def __init__(self, v: int = 8):
        super().__init__()
        self.vocab_size = v

    def init_state(self, features):
        return {"t": features.new_zeros(features.size(0), 1)}  # (R,1) steps taken

    def step(self, tokens, state, features):
        m = tokens.size(0) // features.size(0)
        per_row = features.repeat_interleave(m, 0)  # (R,N,C), rows grouped by image
        table = per_row[:, 3:9, : self.vocab_size]  # (R,6,V)
        at = (state["t"].long() % 6).unsqueeze(-1).expand(-1, 1, self.vocab_size)  # (R,1,V)
        logits = table.gather(1, at).squeeze(1)  # (R,V)
        due = state["t"][:, 0] >= per_row[:, 0, 0]  # (R,)
        logits[:, Vocabulary.end_id] = torch.where(due, 10.0, -10.0)
        n = features.size(1)
        return logits, per_row[:, 2, :n].softmax(-1), {"t": state["t"] + 1}


def test_the_gpus_every_fourth_step_reads_give_the_cpus_results(monkeypatch):
    """Off the CPU, beam search reads ``finished`` on the host only every 4th step (a device sync each), so
    finished beams run up to 3 more steps on <pad> and images leave the batch later: a path the CPU suite
    never took. Forced here on the CPU, it must give the same hypotheses as reading at every step."""
    import captioning.decoding

    dec, removed = _EndsAfter(), []
    select = captioning.decoding._select

    def recording(decoder, state, static, rows, images=None):
        removed.append(images is not None)  # images given: some leave the batch
        return select(decoder, state, static, rows, images)

    monkeypatch.setattr(captioning.decoding, "_select", recording)
    for seed in range(8):
        torch.manual_seed(seed)
        feats = torch.randn(5, 9, 9)  # (B,N,C)
        feats[:, 0, 0] = torch.tensor([1.0, 3.0, 5.0, 9.0, 12.0])  # each image ends at its own step
        options = dict(beam_size=1 + seed % 3, max_len=14, min_len=seed % 3, no_repeat_ngram=seed % 3)
        options |= dict(length_penalty=0.7 * (seed % 2), num_return=1 + seed % 3 // 2)
        monkeypatch.setattr(captioning.decoding, "_host_read_every", lambda device: 1)
        every_step = beam_search(dec, feats, **options)
        monkeypatch.setattr(captioning.decoding, "_host_read_every", lambda device: 4)
        every_fourth = beam_search(dec, feats, **options)
        for cpu, gpu in zip(every_step, every_fourth, strict=True):
            assert [(h.tokens, h.score) for h in cpu] == [(h.tokens, h.score) for h in gpu]
            for a, b in zip(cpu, gpu):
                torch.testing.assert_close(a.attention, b.attention)
    assert any(removed)  # images did leave the batch part-way


class _ByLastWord(Decoder):
    """Next-word log-probabilities that depend on the last word only (a table)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table, self.vocab_size = table, table.size(1)

    def init_state(self, features):
        return {"dummy": features.new_zeros(features.size(0), 1)}

    def step(self, tokens, state, features):
        n = features.size(1)
        return self.table[tokens], features.new_full((tokens.size(0), n), 1.0 / n), state


def test_a_finished_caption_is_never_pushed_out_of_the_beam_by_live_ones():
    """K = 2: after <start>, <end> 0.2 and A 0.8; after A, C or D (0.5 each); after those nothing is likely. The
    finished "" (log 0.2 = -1.61) was pushed out at step 2 by A C and A D (-0.92 each), which then fell to -4.8:
    the search returned a caption it scored far below one it had finished."""
    p = torch.full((7, 7), 1e-6)  # <pad> <start> <end> <unk> A C D
    p[1, 2], p[1, 4] = 0.2, 0.8
    p[4, 5] = p[4, 6] = 0.5
    p[5, :] = p[6, :] = 0.2
    dec, feats = _ByLastWord((p / p.sum(1, keepdim=True)).log()), torch.zeros(1, 4, 3)
    best = beam_search(dec, feats, beam_size=2, max_len=4)[0][0]
    assert best.tokens == [] and best.score == pytest.approx(torch.tensor(0.2).log().item(), abs=1e-4)
    # and in general: what a shorter search (the same first steps) had finished, a longer one still beats
    torch.manual_seed(0)
    for seed in range(3):
        dec, feats = _decoder(v=6 + seed), torch.randn(4, 9, 6)
        for max_len in range(1, 8):
            shorter = beam_search(dec, feats, beam_size=2, max_len=max_len, num_return=2)
            longer = beam_search(dec, feats, beam_size=2, max_len=max_len + 1)
            for before, after in zip(shorter, longer):
                ended = [h.score for h in before if len(h.tokens) < max_len]  # ended with <end> by then
                assert all(after[0].score >= s - 1e-5 for s in ended), (seed, max_len)


def test_sampling_refuses_a_temperature_it_cannot_use_and_a_tiny_one_is_greedy():
    """inf and NaN passed the "> 0" check and failed inside torch.multinomial at the first draw, as did a
    temperature so small that every scaled log-probability overflowed to -inf; a negative top_k meant none."""
    dec, feats = _decoder(), torch.randn(3, 9, 6)
    for bad in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            sample(dec, feats, max_len=6, temperature=bad)
    with pytest.raises(ValueError, match="top_k must be at least 0"):
        sample(dec, feats, max_len=6, top_k=-3)
    tiny = sample(dec, feats, max_len=6, temperature=1e-39, generator=torch.Generator().manual_seed(0))
    assert [h.tokens for h in tiny] == [h.tokens for h in greedy(dec, feats, max_len=6)]
