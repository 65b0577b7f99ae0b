"""Caption search over any :class:`~captioning.models.base.Decoder`: greedy, sampling and batched beam search.

Search only calls ``init_state`` / ``step`` / ``reorder``; it never reaches into a decoder. Every
hypothesis carries the attention map of each of its tokens, which is what the overlays show.
Shape legend: B images, K beams, T tokens, N grid cells, V vocabulary.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from captioning.models.base import Decoder
from captioning.options import LENGTH_PENALTY_RANGE, length_penalty_ok
from captioning.vocab import Vocabulary


@dataclass
class Hypothesis:
    """A decoded caption: word ids (no <start>/<end>), total log-probability (length-normalised
    when a length penalty is used) and attention (T,N) for each word."""

    tokens: list[int]
    score: float
    attention: torch.Tensor


@torch.no_grad()
def greedy(decoder: Decoder, features: torch.Tensor, max_len: int = 20) -> list[Hypothesis]:
    """Most likely word at each step, for B images at once: features (B,N,C) -> B hypotheses."""
    return _single_path(decoder, features, max_len, lambda logp: logp.argmax(-1))


def _single_path(
    decoder: Decoder, features: torch.Tensor, max_len: int, choose: Callable[[torch.Tensor], torch.Tensor]
) -> list[Hypothesis]:
    """Decode one path per image, ``choose`` picking the next word ids (B,) from log-probs (B,V)."""
    _check_max_len(max_len)
    b = features.size(0)
    if b == 0:  # no images: nothing to decode (the decoders' per-image attention cannot split 0 rows)
        return []
    state = decoder.init_state(features)
    tokens = torch.full((b,), Vocabulary.start_id, dtype=torch.long, device=features.device)
    done = torch.zeros(b, dtype=torch.bool, device=features.device)
    scores = torch.zeros(b, device=features.device)
    out_tokens, out_attn = [], []
    for _ in range(max_len):
        logits, alpha, state = decoder.step(tokens, state, features)
        logp = _never_special(logits.float().log_softmax(-1))  # (B,V)
        tokens = choose(logp)  # (B,)
        picked = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (B,)
        scores = scores + torch.where(done, torch.zeros_like(picked), picked)
        tokens = torch.where(done, torch.full_like(tokens, Vocabulary.pad_id), tokens)
        out_tokens.append(tokens)
        out_attn.append(alpha.float())
        done = done | (tokens == Vocabulary.end_id)
        if bool(done.all()):
            break
    if not out_tokens:  # max_len 0: empty captions, as beam search gives
        empty = torch.zeros(0, features.size(1))  # (0,N)
        return [Hypothesis([], 0.0, empty.clone()) for _ in range(b)]
    seq = torch.stack(out_tokens, 1).cpu()  # (B,T)
    attn = torch.stack(out_attn, 1).cpu()  # (B,T,N)
    return [_finish(seq[i].tolist(), float(scores[i]), attn[i]) for i in range(b)]


def _check_max_len(max_len: int) -> None:
    if max_len < 0:
        raise ValueError(f"max_len must be at least 0, got {max_len}")


def _never_special(logp: torch.Tensor) -> torch.Tensor:
    """A caption never contains <pad> or <start>: rule them out of the search."""
    logp[:, Vocabulary.pad_id] = float("-inf")
    logp[:, Vocabulary.start_id] = float("-inf")
    return logp


def _block_repeats(logp: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """Set -inf on words that would complete an n-gram already present in each row's history."""
    rows = history.tolist()
    for r, seq in enumerate(rows):
        prefix = tuple(seq[len(seq) - (n - 1) :]) if n > 1 else ()
        banned = {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix}
        if banned:
            logp[r, list(banned)] = float("-inf")


def _cut(ids: list[int]) -> list[int]:
    """A raw id sequence cut at <end> (exclusive), without <pad>."""
    n = ids.index(Vocabulary.end_id) if Vocabulary.end_id in ids else len(ids)
    return [i for i in ids[:n] if i != Vocabulary.pad_id]


def _finish(ids: list[int], score: float, attention: torch.Tensor) -> Hypothesis:
    """Cut a raw id sequence at <end> (exclusive) and keep the matching attention rows."""
    ids = _cut(ids)
    # a copy, not a view: a view would keep (and pickle, e.g. when DDP gathers validation outputs)
    # the whole batch's (R,T,N) attention for every hypothesis
    return Hypothesis(ids, score, attention[: len(ids)].clone())


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    features: torch.Tensor,
    *,
    beam_size: int = 3,
    max_len: int = 20,
    length_penalty: float = 0.0,
    min_len: int = 0,
    no_repeat_ngram: int = 0,
    num_return: int = 1,
) -> list[list[Hypothesis]]:
    """Beam search over B images x K beams at once.

    ``min_len`` forbids <end> before that many words; ``no_repeat_ngram`` = n > 0 forbids any
    word that would repeat an n-gram already in the hypothesis. A beam that the two leave no word to
    take dies, unless they leave its image no candidate at all (a tiny vocabulary): then the image's
    beams stop there and are returned like ones cut at ``max_len``.

    Finished beams stay in the beam with a frozen score (they can only be extended by <pad> at
    no cost, and live extensions never push them out: the beam's live part narrows as captions end),
    so the search ends when every beam of every image has finished or at ``max_len``; unfinished beams
    at ``max_len`` are returned as they are. With ``length_penalty`` alpha > 0,
    final scores are divided by GNMT's ((5 + len) / 6) ** alpha, len counting the scored tokens: the
    words and, for a hypothesis that ended, its <end>.

    Returns, per image, the ``num_return`` (1 .. ``beam_size``) best hypotheses, best first; fewer only
    where fewer than that many word sequences exist (a beam wider than the vocabulary allows).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    # the search keeps only beam_size hypotheses per image: more could not be returned, and a slice by
    # num_return <= 0 gave none (0) or all but the last (-1) without a word
    if not 1 <= num_return <= beam_size:
        raise ValueError(f"num_return must be between 1 and beam_size ({beam_size}), got {num_return}")
    _check_max_len(max_len)
    # min_len > max_len is a contradiction (it returned every beam cut at max_len, unsaid); min_len = max_len
    # is allowed: it forces exactly max_len steps, which the benchmarks use
    if not 0 <= min_len <= max_len:
        raise ValueError(f"min_len must be between 0 and max_len ({max_len}), got {min_len}")
    if no_repeat_ngram < 0:
        raise ValueError(f"no_repeat_ngram must be at least 0 (0: no blocking), got {no_repeat_ngram}")
    if not length_penalty_ok(length_penalty):  # a NaN made every final score NaN, and the order arbitrary
        raise ValueError(f"length_penalty must be {LENGTH_PENALTY_RANGE}, got {length_penalty}")
    b, n, _ = features.shape
    if b == 0:  # no images: nothing to decode (the decoders' per-image attention cannot split 0 rows)
        return []
    k = beam_size
    device = features.device
    # state that is the same for every beam of an image (per_image_state) keeps one row per image:
    # beams never leave their image, so it is neither copied K times nor reordered, and the decoder
    # reads the image's features once for its K beams
    static = set(getattr(decoder, "per_image_state", ()))
    # the first step runs one row per image (M = 1): its K beams would all start from the same state and
    # <start>, so K rows would compute the same step K times; its top K words then fan it out to K rows
    state = decoder.init_state(features)
    tokens = torch.full((b,), Vocabulary.start_id, dtype=torch.long, device=device)  # (B*M,)
    scores = torch.zeros(b, device=device)  # (B*M,)
    finished = torch.zeros(b, dtype=torch.bool, device=device)  # (B*M,)
    # only n-gram blocking reads the word history during the search; otherwise the words are followed
    # back once at the end, like the attention, instead of reordering a (B*K,T) copy at every step
    history = torch.empty((b, 0), dtype=torch.long, device=device) if no_repeat_ngram > 0 else None  # (B*M,T)
    row_of_image = torch.arange(b, device=device).unsqueeze(1)  # (B,1)
    beam_of_row = torch.arange(k, device=device)  # (K,)
    images = list(range(b))  # the caller's index of each image still searched
    results: list[list[Hypothesis]] = [[] for _ in range(b)]
    words, alphas, sources = [], [], []  # per step: word (B*K,), attention (B*M,N) before reordering, src (B*K,)
    every = _host_read_every(device)
    for step in range(max_len):
        logits, alpha, state = decoder.step(tokens, state, features)  # rows grouped by image
        logp = _never_special(logits.float().log_softmax(-1))  # (B*M,V)
        v = logp.size(-1)
        m = logp.size(0) // b
        if step < min_len:
            logp[:, Vocabulary.end_id] = float("-inf")
        if history is not None and step >= no_repeat_ngram - 1:
            _block_repeats(logp, history, no_repeat_ngram)
        # a finished beam continues only with <pad>, at no cost
        logp.masked_fill_(finished.unsqueeze(1), float("-inf"))
        logp[:, Vocabulary.pad_id].masked_fill_(finished, 0.0)
        cand = (scores.unsqueeze(1) + logp).view(b, m * v)  # (B,M*V)
        if step < min_len or history is not None:
            # an image that min_len and n-gram blocking leave no candidate at all (a tiny vocabulary): its
            # beams stop where they are, like ones cut at max_len (<pad> at no cost), or it would have no
            # hypothesis to return. Only then: where any candidate is left, a stuck beam dies as before, so
            # that it never beats a longer caption that keeps to min_len
            none_left = (cand.amax(1) == float("-inf")).repeat_interleave(m)  # (B*M,)
            stuck = none_left & (logp.amax(1) == float("-inf"))  # (B*M,) rows of such images with no word
            logp[:, Vocabulary.pad_id].masked_fill_(stuck, 0.0)
            cand = (scores.unsqueeze(1) + logp).view(b, m * v)  # (B,M*V)
        # a finished beam keeps its place: ranked on the same sums, live extensions whose partial score was
        # higher pushed it out of the beam, and once they fell below it (scores only fall) the search
        # returned a caption it scored worse than one it had finished. Its <pad> goes first (+inf), and its
        # score is put back below
        held = finished & torch.isfinite(scores)  # (B*M,) (dead beams, -inf, hold nothing)
        cand.view(b, m, v)[..., Vocabulary.pad_id].masked_fill_(held.view(b, m), float("inf"))
        if m * v < k:  # fewer candidates than beams (K > V at the first step): the missing ones are dead
            cand = torch.nn.functional.pad(cand, (0, k - m * v), value=float("-inf"))  # (B,K)
        top_scores, top_idx = cand.topk(k, dim=1)  # (B,K)
        # beam each candidate extends; a padding column (dead, -inf) is pointed at the image's last row
        beam = torch.div(top_idx, v, rounding_mode="floor").clamp_(max=m - 1)  # (B,K)
        word = (top_idx % v).view(-1)  # (B*K,)
        src = (beam + row_of_image * m).view(-1)  # (B*K,) rows to keep, among this step's B*M
        top_scores = torch.where(top_scores == float("inf"), scores.index_select(0, src).view(b, k), top_scores)
        state = _select(decoder, state, static, src)
        if history is not None:
            history = torch.cat([history.index_select(0, src), word.view(-1, 1)], 1)  # (B*K,T+1)
        words.append(word)
        alphas.append(alpha)
        sources.append(src)
        scores = top_scores.view(-1)
        # dead beams (-inf: fewer live candidates than K, e.g. K > V at the first step) count as finished
        # <pad> is picked only by finished beams and those of an image left no candidate
        finished = finished.index_select(0, src) | (word == Vocabulary.end_id) | (word == Vocabulary.pad_id)
        finished |= torch.isinf(scores)
        tokens = word
        # reading ``finished`` on the host is a device sync: only from min_len on (no beam can end
        # before, bar a stuck one), and every few steps off the CPU; the extra steps only extend finished
        # beams by <pad>
        if step < min_len or step % every != every - 1:
            continue
        done = finished.view(b, k).all(1)  # (B,) images whose K beams have all ended
        n_done = int(done.sum())
        if n_done == b:
            break
        if n_done:  # their hypotheses are final: take them out, so later steps compute only live images
            gone = done.nonzero().squeeze(1)  # (B_done,)
            gone_rows = (gone.unsqueeze(1) * k + beam_of_row).view(-1)  # (B_done*K,)
            hyps = _trace(
                words, alphas, sources, gone_rows, scores.index_select(0, gone_rows), n, length_penalty, k, num_return
            )
            for i, h in zip(gone.tolist(), hyps):
                results[images[i]] = h
            keep = (~done).nonzero().squeeze(1)  # (B',)
            keep_rows = (keep.unsqueeze(1) * k + beam_of_row).view(-1)  # (B'*K,)
            # the rows after this step are renumbered to the kept ones; the back-pointers follow
            words[-1], sources[-1] = word.index_select(0, keep_rows), src.index_select(0, keep_rows)
            state = _select(decoder, state, static, keep_rows, keep)  # (B',...), (B'*K,...)
            features = features.index_select(0, keep)  # (B',N,C)
            scores, finished, tokens = (t.index_select(0, keep_rows) for t in (scores, finished, tokens))
            if history is not None:
                history = history.index_select(0, keep_rows)
            images = [images[i] for i in keep.tolist()]
            b = len(images)
            row_of_image = row_of_image[:b]
    rows = torch.arange(scores.numel(), device=device)  # B*K, or B when no step ran
    per_image = rows.numel() // b
    for i, h in zip(images, _trace(words, alphas, sources, rows, scores, n, length_penalty, per_image, num_return)):
        results[i] = h
    return results


def _host_read_every(device: torch.device) -> int:
    """Steps between beam search's reads of ``finished`` on the host: each waits for the device's queued
    kernels, so off the CPU only every 4th step. A function, so that the CPU tests also run the GPU's way."""
    return 1 if device.type == "cpu" else 4


def _select(
    decoder: Decoder, state: dict, static: set[str], rows: torch.Tensor, images: torch.Tensor | None = None
) -> dict:
    """Keep state ``rows`` (through the decoder's ``reorder``); the per-image (``static``) state keeps
    its rows, or ``images`` of them when images leave the search."""
    moving = decoder.reorder({key: t for key, t in state.items() if key not in static}, rows)
    kept = {key: t if images is None else t.index_select(0, images) for key, t in state.items() if key in static}
    return {**kept, **moving}


def _trace(
    words: list[torch.Tensor],
    alphas: list[torch.Tensor],
    sources: list[torch.Tensor],
    row: torch.Tensor,
    scores: torch.Tensor,
    n: int,
    length_penalty: float,
    per_image: int,
    num_return: int,
) -> list[list[Hypothesis]]:
    """The ``num_return`` best hypotheses of each image, best first, from the final rows ``row`` (R,),
    ``per_image`` rows per image, with their ``scores`` (R,). The back-pointers give each row the words
    and attention of the steps that built it (per step: word (R_t,), attention (R_t-1,N) of the rows
    before reordering, source row (R_t,) among them)."""
    r = row.numel()
    word_steps, attn_steps = [], []
    for word, alpha, src in zip(reversed(words), reversed(alphas), reversed(sources)):
        word_steps.append(word.index_select(0, row))
        row = src.index_select(0, row)
        attn_steps.append(alpha.float().index_select(0, row))
    hist = torch.stack(word_steps[::-1], 1).tolist() if word_steps else [[] for _ in range(r)]  # (R,T)
    attn = torch.stack(attn_steps[::-1], 1).cpu() if attn_steps else torch.empty(r, 0, n)  # (R,T,N)
    sc = scores.tolist()
    results = []
    for first in range(0, r, per_image):
        ranked = []  # (final score, row): ranked first, so only the kept ones copy their attention
        for i in range(first, first + per_image):
            if sc[i] == float("-inf"):
                continue
            # GNMT's |Y| counts the tokens the score sums over: the words, and <end> only where the
            # hypothesis ended (a beam cut at max_len has no <end> log-probability in its score)
            length = len(_cut(hist[i])) + (Vocabulary.end_id in hist[i])
            ranked.append((*_length_normalised(sc[i], length, length_penalty), i))
        ranked.sort(key=lambda x: (-x[0], -x[1]))  # stable: ties keep row order
        results.append([_finish(hist[i], score, attn[i]) for score, _, i in ranked[:num_return]])
    return results


def _length_normalised(score: float, length: int, alpha: float) -> tuple[float, float]:
    """(final score, tie-break) of a hypothesis of ``length`` scored tokens: GNMT's score / ((5 + length) / 6) **
    alpha, and, where that quotient is not a normal float, its logarithm negated to rank such ones among themselves.

    For a long caption and a large |alpha| the penalty overflowed (OverflowError), fell to 0 (ZeroDivisionError)
    once the search was done, or became subnormal (a few bits of precision). The quotient is then taken in logs,
    -exp(ln(-score) - alpha ln((5 + length) / 6)), and where it rounds to -0.0 or -inf (or a subnormal) alike for
    several hypotheses, the tie-break orders them as exact arithmetic does; only past |alpha| ln((5 + length) / 6)
    ~ 1.8e308 does it fall back to row order. A normal quotient has no tie-break: ties keep row order, as before."""
    if not alpha:
        return score, 0.0
    if score >= 0.0:  # a sum of log-probabilities is 0 only for a certain caption: the best, whatever its length
        return score, math.inf
    base = (5.0 + length) / 6.0
    log_magnitude = math.log(-score) - alpha * math.log(base)  # ln|quotient|
    try:
        penalty = base**alpha
    except OverflowError:
        penalty = math.inf
    if sys.float_info.min <= penalty < math.inf:
        quotient = score / penalty
    else:  # the penalty past a float's range either way, or subnormal (a few bits of precision left): in logs
        try:
            quotient = -math.exp(log_magnitude)
        except OverflowError:
            quotient = -math.inf
    normal = sys.float_info.min <= abs(quotient) < math.inf
    return quotient, 0.0 if normal else -log_magnitude


@torch.no_grad()
def sample(
    decoder: Decoder,
    features: torch.Tensor,
    *,
    max_len: int = 20,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> list[Hypothesis]:
    """Draw one caption per image from the model (temperature, optional top-k), for B images at once.

    The score is the sum of the model's (untempered) log-probabilities of the drawn words, as
    self-critical training needs (Rennie et al. 2017).
    """
    # NaN and inf passed a "> 0" check and made every draw fail inside torch.multinomial
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if top_k < 0:  # a negative top_k meant no top-k, silently
        raise ValueError(f"top_k must be at least 0 (0: every word), got {top_k}")

    def choose(logp: torch.Tensor) -> torch.Tensor:
        # the best word at 0 before dividing: a tiny temperature then sends the others to -inf, not every word
        scaled = (logp - logp.amax(-1, keepdim=True)) / temperature  # (B,V)
        if 0 < top_k < scaled.size(-1):
            # exactly k words: a threshold at the k-th value kept every word tied with it (top_k 1 drew among ties)
            kept = scaled.topk(top_k, dim=-1).indices  # (B,k)
            outside = torch.ones_like(scaled, dtype=torch.bool).scatter_(1, kept, False)  # (B,V)
            scaled = scaled.masked_fill(outside, float("-inf"))
        probs = scaled.softmax(-1)  # (B,V)
        if generator is not None and generator.device != probs.device:  # draw where the generator lives
            return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(probs.device)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)

    return _single_path(decoder, features, max_len, choose)
