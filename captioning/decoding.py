"""Caption search over any :class:`~captioning.models.base.Decoder`: greedy and batched beam search.

Search only calls ``init_state`` / ``step`` / ``reorder``; it never reaches into a decoder. Every
hypothesis carries the attention map of each of its tokens, which is what the overlays show.
Shape legend: B images, K beams, T tokens, N grid cells, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from captioning.models.base import Decoder
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
    b = features.size(0)
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
    seq = torch.stack(out_tokens, 1).cpu()  # (B,T)
    attn = torch.stack(out_attn, 1).cpu()  # (B,T,N)
    return [_finish(seq[i].tolist(), float(scores[i]), attn[i]) for i in range(b)]


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


def _finish(ids: list[int], score: float, attention: torch.Tensor) -> Hypothesis:
    """Cut a raw id sequence at <end> (exclusive) and keep the matching attention rows."""
    n = ids.index(Vocabulary.end_id) if Vocabulary.end_id in ids else len(ids)
    ids = [i for i in ids[:n] if i != Vocabulary.pad_id]
    return Hypothesis(ids, score, attention[: len(ids)])


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
    word that would repeat an n-gram already in the hypothesis.

    Finished beams stay in the beam with a frozen score (they can only be extended by <pad> at
    no cost), so the search ends when every beam of every image has finished or at ``max_len``;
    unfinished beams at ``max_len`` are returned as they are. With ``length_penalty`` alpha > 0,
    final scores are divided by GNMT's ((5 + len) / 6) ** alpha.

    Returns, per image, the ``num_return`` best hypotheses, best first.
    """
    b, n, c = features.shape
    k = beam_size
    device = features.device
    # state that is the same for every beam of an image (per_image_state) keeps one row per image:
    # beams never leave their image, so it is neither copied K times nor reordered, and the decoder
    # reads the image's features once for its K beams
    static = set(getattr(decoder, "per_image_state", ()))
    state = decoder.init_state(features)
    state = {key: t if key in static else t.repeat_interleave(k, dim=0) for key, t in state.items()}  # (B*K,...)
    tokens = torch.full((b * k,), Vocabulary.start_id, dtype=torch.long, device=device)
    # only beam 0 is live at the start, so the K beams do not all pick the same first word
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    scores = scores.view(-1)  # (B*K,)
    finished = torch.zeros(b * k, dtype=torch.bool, device=device)
    history = torch.empty((b * k, 0), dtype=torch.long, device=device)  # (B*K,T)
    alphas, sources = [], []  # per step: attention (B*K,N) of the rows before reordering, src (B*K,)
    for step in range(max_len):
        logits, alpha, state = decoder.step(tokens, state, features)  # rows grouped by image
        logp = _never_special(logits.float().log_softmax(-1))  # (B*K,V)
        v = logp.size(-1)
        if step < min_len:
            logp[:, Vocabulary.end_id] = float("-inf")
        if no_repeat_ngram > 0 and step >= no_repeat_ngram - 1:
            _block_repeats(logp, history, no_repeat_ngram)
        # a finished beam continues only with <pad>, at no cost
        logp.masked_fill_(finished.unsqueeze(1), float("-inf"))
        logp[:, Vocabulary.pad_id].masked_fill_(finished, 0.0)
        cand = (scores.unsqueeze(1) + logp).view(b, k * v)  # (B,K*V)
        top_scores, top_idx = cand.topk(k, dim=1)  # (B,K)
        beam = torch.div(top_idx, v, rounding_mode="floor")  # (B,K) beam each candidate extends
        word = top_idx % v  # (B,K)
        src = (beam + torch.arange(b, device=device).unsqueeze(1) * k).view(-1)  # (B*K,) rows to keep
        moving = decoder.reorder({key: t for key, t in state.items() if key not in static}, src)
        state = {**{key: t for key, t in state.items() if key in static}, **moving}
        history = torch.cat([history.index_select(0, src), word.view(-1, 1)], 1)
        alphas.append(alpha)
        sources.append(src)
        scores = top_scores.view(-1)
        # dead beams (-inf: fewer live candidates than K, e.g. K > V at the first step) count as finished
        finished = finished.index_select(0, src) | (word.view(-1) == Vocabulary.end_id) | torch.isinf(scores)
        tokens = word.view(-1)
        if bool(finished.all()):
            break
    # follow the back-pointers to give each final row the attention of the steps that built it
    row = torch.arange(b * k, device=device)
    attn_steps = []
    for alpha, src in zip(reversed(alphas), reversed(sources)):
        row = src.index_select(0, row)
        attn_steps.append(alpha.float().index_select(0, row))
    attn = torch.stack(attn_steps[::-1], 1).cpu() if attn_steps else torch.empty(b * k, 0, n)  # (B*K,T,N)
    hist, sc = history.cpu(), scores.view(b, k).cpu()
    results = []
    for i in range(b):
        hyps = []
        for j in range(k):
            if sc[i, j] == float("-inf"):
                continue
            h = _finish(hist[i * k + j].tolist(), float(sc[i, j]), attn[i * k + j])
            if length_penalty:
                h.score /= ((5.0 + len(h.tokens) + 1) / 6.0) ** length_penalty
            hyps.append(h)
        hyps.sort(key=lambda h: -h.score)
        results.append(hyps[:num_return])
    return results


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
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def choose(logp: torch.Tensor) -> torch.Tensor:
        scaled = logp / temperature
        if top_k > 0:
            kth = scaled.topk(min(top_k, scaled.size(-1)), dim=-1).values[:, -1:]  # (B,1)
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        return torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(1)  # (B,)

    return _single_path(decoder, features, max_len, choose)
