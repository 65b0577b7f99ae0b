"""Soft attention over the encoder grid (Xu et al. 2015, "Show, Attend and Tell").

A score per grid cell, a softmax into weights alpha, the weighted sum of features as the context.
The part of the score that depends only on the image (the key projection) is computed once per
image by :meth:`precompute`, not at every word. Queries come grouped by image (B*M rows for B
images: an image's M captions in training, its M beams in search), and each image's keys and
features are read once for all of its M queries.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import nn

from captioning.errors import InputError
from captioning.models.fused_attention import additive_scores, fused_available

#: Without autograd on a CPU, the additive score's (B,M,N,A) tensor is built a few images at a time,
#: at most this many bytes each: a new multi-megabyte buffer at every step made the allocator hand
#: memory back to the system and fault it in again (a batched search of 64 shapes images x 5 beams
#: spent up to ~40% of its time so, depending on the allocator's history); chunks stay in the
#: allocator's free lists and in the cache. With autograd on a CPU, or on a GPU without Triton, it is one
#: tensor; on a GPU with Triton the fused kernels never build it (AdditiveAttention.fused).
CPU_CHUNK_BYTES = 1 << 20

#: How the CPU inference score takes its tanh in float32: directly (True) or as 2 sigmoid(2x) - 1 (False, the same
#: function to float32 rounding). None (default): directly on Intel CPUs, through the sigmoid on others. PyTorch's
#: CPU tanh goes to MKL, whose fast path is for Intel's own CPUs: per element of one score chunk, 2 threads
#: (``benchmarks/cpu_elementwise.py``), an AMD EPYC VM took 2.3 ns for tanh against 0.5 for the sigmoid, and an
#: Intel Xeon VM 0.155 for tanh against 0.252 for the sigmoid of 2x. A rule by maker, not a timing, so that a
#: machine always scores the same way (a timing that came out differently in two processes could flip a tie).
CPU_TANH: bool | None = None


@functools.cache
def _cpu_is_intel(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU says it is Intel's ("GenuineIntel" in /proc/cpuinfo); False where unreadable."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


def cpu_tanh_directly() -> bool:
    """Whether the CPU inference score takes tanh directly (see :data:`CPU_TANH`)."""
    return _cpu_is_intel() if CPU_TANH is None else CPU_TANH


def shift_only(bias: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """``bias`` as it is, with a gradient of exactly 0 on its first ``count`` entries (all by default): for a
    bias that only shifts all the scores a softmax normalises by the same amount (the additive score's bias;
    a key's bias, which adds q . b to every key's score). Such a shift changes nothing downstream, so its true
    gradient is 0 and autograd returns rounding noise (~1e-9) instead. Adam divides by the noise's own size, so
    the bias took steps of about lr/10 in a direction set by summation order: a 2-process DDP run and one
    process on the same batches ended with the additive score's bias 5e-5 apart after 6 steps on an AVX2
    CPU, every other weight within 2e-6. Kept as a parameter, at its initial value, so checkpoints keep
    their layout; DDP still gets a (zero) gradient for it."""
    if not (bias.requires_grad and torch.is_grad_enabled()):
        return bias
    head = bias if count is None else bias[:count]
    head = head.detach() + head * 0  # forward: the bias exactly; backward: 0 * grad
    return head if count is None else torch.cat((head, bias[count:]))


def rows_per_image(query: torch.Tensor, images: int) -> int:
    """Rows of queries per image: queries come grouped by image, row r belongs to image r // M."""
    rows = query.size(0)
    if rows % images:
        raise ValueError(f"{rows} query rows cannot be grouped over {images} images")
    return rows // images


def _attend(scores: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B,M,N), features (B,N,C) -> context (B*M,C), alpha (B*M,N): softmax, then the weighted sum.

    The M queries of an image (its captions in training, its beams in search) read the image's
    features once, in one (M,N)@(N,C) product, instead of each reading its own copy.
    """
    alpha = scores.softmax(dim=-1)
    context = torch.bmm(alpha, features)  # (B,M,N)@(B,N,C) -> (B,M,C)
    return context.flatten(0, 1), alpha.flatten(0, 1)


class AdditiveAttention(nn.Module):
    """score_n = v^T tanh(W_f f_n + W_h h) (Bahdanau-style MLP scoring, as in Show-Attend-Tell).

    ``fused`` (default True): where Triton can run (a GPU), the score ``v^T tanh(keys + q)`` comes from the kernels
    of :mod:`captioning.models.fused_attention`, which never build the (B,M,N,A) tensor that eager PyTorch writes
    and reads many times per word (most of an LSTM training step's GPU time); the same function, computed in
    float32. Set it False for the eager version (e.g. to compare). Under ``torch.compile`` the eager version is
    traced, which the compiler fuses itself.
    """

    fused: bool = True
    #: whether the kernels ran in this process; until they have, a failure to compile them (no C compiler for
    #: Triton's launcher, say) warns once and sets ``_fused_broken``: every instance then takes the eager score,
    #: instead of the run stopping
    _fused_ran: bool = False
    _fused_broken: bool = False

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
        """features (B,N,C), keys (B,N,A), query (B*M,Q) grouped by image -> context (B*M,C), alpha (B*M,N)."""
        return self.attend(features, keys, self.query(query))

    def attend(
        self, features: torch.Tensor, keys: torch.Tensor, projected: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` from the query's projection ``projected`` = ``self.query(query)`` (B*M,A), which a caller
        may take from a larger product (the LSTM's one product of h a word)."""
        b, n, a = keys.shape
        q = projected.view(b, rows_per_image(projected, b), 1, a)  # (B,M,1,A)
        v = self.score.weight[0]  # (A,)
        if keys.device.type == "cpu" and not torch.is_grad_enabled():
            # see CPU_CHUNK_BYTES; each chunk's (b',M,N) scores are small. No out= here: autocast
            # does not apply to out= calls, and under bf16 the chunk and the weight row differ in dtype
            via_sigmoid = keys.dtype == q.dtype == torch.float32 and not cpu_tanh_directly()
            per = max(1, CPU_CHUNK_BYTES // (q.size(1) * n * a * keys.element_size()))  # images per chunk
            chunks = [self._score(keys[i : i + per], q[i : i + per], via_sigmoid) for i in range(0, b, per)]
            scores = chunks[0] if len(chunks) == 1 else torch.cat(chunks)  # (B,M,N)
            if via_sigmoid:  # v^T tanh(x) = 2 v^T sigmoid(2x) - sum(v)
                scores = scores * 2 - v.sum()
            return _attend(scores + self.score.bias, features)
        scores = None
        if self.fused and not self._fused_broken and fused_available(keys) and not torch.compiler.is_compiling():
            scores = self._fused_score(keys, q.squeeze(2))  # (B,M,N), or None where the kernels cannot compile
        if scores is None:
            scores = self._score(keys, q)
        return _attend(scores + shift_only(self.score.bias), features)

    def _fused_score(self, keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
        """keys (B,N,A), queries (B,M,A) -> v^T tanh(keys + q), (B,M,N), from the fused kernels; None (with a warning,
        once) when their first compile in this process fails: the eager score is the same function. (The backward
        kernel compiles at the first backward, outside this: where it alone fails to build, the error is raised.)"""
        try:
            scores = additive_scores(keys, q, self.score.weight[0])
        except (torch.cuda.OutOfMemoryError, ValueError, TypeError):
            raise  # out of memory (a caller may shrink its batch) or a bad input: not the kernels' fault
        except Exception as e:  # Triton's compile or launcher build: an environment problem, not a wrong input
            if AdditiveAttention._fused_ran:
                raise  # they compiled and ran before: this is a real error
            AdditiveAttention._fused_broken = True
            warnings.warn(
                f"the fused attention kernels failed to compile ({type(e).__name__}: {e}); the LSTM's attention "
                "uses the eager score from now on (same results, more memory and time)",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        AdditiveAttention._fused_ran = True
        return scores

    def _score(self, keys: torch.Tensor, q: torch.Tensor, via_sigmoid: bool = False) -> torch.Tensor:
        """keys (B,N,A), queries (B,M,1,A) -> v^T tanh(keys + q), (B,M,N), without the bias.

        ``via_sigmoid``: return v^T sigmoid(2 (keys + q)) instead, which the caller maps to the same
        score (tanh(x) = 2 sigmoid(2x) - 1; the two differ by float32 rounding, ~1e-7). Why: where
        PyTorch's CPU tanh is slow (:data:`CPU_TANH`), and this pass is the largest elementwise cost of a
        batched search. Only for float32: in bfloat16 sigmoid near 1/2 is coarser than tanh near 0.
        """
        if via_sigmoid:
            # 2q + 2 keys in the add's one pass: doubling is exact, so this is 2 (keys + q) to the bit, without
            # a pass of its own over the largest tensor
            hidden = torch.add(q * 2, keys.unsqueeze(1), alpha=2).sigmoid_()  # (B,M,N,A)
        else:
            hidden = (keys.unsqueeze(1) + q).tanh_()  # (B,M,N,A): the largest tensor of a step
        # in place: one (B,M,N,A) buffer, not two; the score is a matrix-vector product against the
        # Linear(A,1)'s weight row, not a GEMM with a one-column output
        return torch.matmul(hidden, self.score.weight[0])


class DotAttention(nn.Module):
    """score_n = (W_f f_n) . (W_h h) / sqrt(A): scaled dot-product scoring."""

    def __init__(self, feature_dim: int, query_dim: int, attention_dim: int):
        super().__init__()
        self.key = nn.Linear(feature_dim, attention_dim)
        self.query = nn.Linear(query_dim, attention_dim)
        self.scale = 1.0 / math.sqrt(attention_dim)

    def precompute(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(features, self.key.weight, shift_only(self.key.bias))  # (B,N,C) -> (B,N,A)

    def forward(
        self, features: torch.Tensor, keys: torch.Tensor, query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B,N,C), keys (B,N,A), query (B*M,Q) grouped by image -> context (B*M,C), alpha (B*M,N)."""
        return self.attend(features, keys, self.query(query))

    def attend(
        self, features: torch.Tensor, keys: torch.Tensor, projected: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` from the query's projection ``projected`` = ``self.query(query)`` (B*M,A)."""
        b, n, a = keys.shape
        q = projected.view(b, rows_per_image(projected, b), a)  # (B,M,A)
        scores = torch.bmm(q, keys.transpose(1, 2)) * self.scale  # (B,M,A)@(B,A,N) -> (B,M,N)
        return _attend(scores, features)


def build_attention(kind: str, feature_dim: int, query_dim: int, attention_dim: int) -> nn.Module:
    """``kind``: "additive" (MLP) or "dot"."""
    if kind == "additive":
        return AdditiveAttention(feature_dim, query_dim, attention_dim)
    if kind == "dot":
        return DotAttention(feature_dim, query_dim, attention_dim)
    raise InputError(f"attention must be 'additive' or 'dot', got {kind!r}")
