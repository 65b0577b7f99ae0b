"""The additive attention score v^T tanh(keys + q) in Triton kernels that never build its (B,M,N,A) tensor.

At every word step the LSTM decoder's additive (Bahdanau / Show-Attend-Tell) attention scores each of an image's
N grid cells for each of its M queries (its captions in training, its beams in search):

    score[b,m,n] = sum_a v[a] * tanh(keys[b,n,a] + q[b,m,a])

Eager PyTorch materialises the (B,M,N,A) tanh tensor for this: 128M elements per step at B=256, M=5, N=196,
A=512, written and read again in the forward and several more times in the backward. That memory traffic, not
arithmetic, dominates a GPU training step. Here the forward reads keys, q and v once and writes only the (B,M,N)
scores; the backward recomputes tanh from the same three inputs (autograd saves only them) and writes only the
gradients. :func:`additive_scores_reference` is the eager version: the definition of what the kernels compute.

Triton is optional: without it this module still imports and :func:`fused_available` says False. To run the
kernels on a CPU tensor through Triton's interpreter, set ``TRITON_INTERPRET=1`` before this module is first
imported: Triton decides whether a kernel is compiled or interpreted when it is defined.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install; fused_available() is then False
    triton = None


def _tile_errors() -> tuple[type[BaseException], ...]:
    """Triton's errors for a configuration that does not build or fit on this card (too much shared memory or too
    many registers, the PTX assembler refusing it): what choosing a configuration skips. Any other error (a CUDA
    error, a bug) is raised. Looked up by name: older Triton versions lack some of them."""
    if triton is None:
        return ()
    import importlib

    found = []
    for module, name in (
        ("triton.runtime.errors", "OutOfResources"),
        ("triton.runtime.errors", "PTXASError"),
        ("triton.compiler.errors", "CompilationError"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_TILE_ERRORS = _tile_errors()

#: Whether the kernels below were defined under Triton's interpreter (they run on CPU tensors only then).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

#: The largest tiles along N and A of the default configuration (the interpreter, deterministic algorithms, a
#: capture before any choice) and of one given in part. A tile of BLOCK_N x BLOCK_A float32 values is the largest
#: live tensor in a program (the backward holds four or five), 16 registers per thread per tensor with 4 warps at
#: 32 x 64. The timed candidates (FORWARD_CONFIGS, BACKWARD_CONFIGS) go beyond these.
MAX_BLOCK_N = 32
MAX_BLOCK_A = 64


#: Triton compiles for NVIDIA GPUs of compute capability 7.0 (Volta) and later only
MIN_CAPABILITY = (7, 0)


def fused_available(t: torch.Tensor) -> bool:
    """Whether :func:`additive_scores` can run on ``t``: Triton imports; ``t`` is float32, bfloat16 or float16 (the
    kernels compute in float32, so a float64 model keeps the eager score and its precision); and ``t`` is on an
    NVIDIA GPU Triton compiles for (compute capability 7.0 or later: not a Pascal P100 or GTX 10x0; ROCm builds keep
    the eager score, the kernels are untested there) or the kernels are interpreted (``TRITON_INTERPRET=1``, set
    before this module was imported)."""
    if triton is None or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if t.is_cuda:
        return _compiles_for(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return _INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _compiles_for(device_index: int) -> bool:
    """Whether Triton compiles for this CUDA device; asked once per device (``fused_available`` runs at every
    word step, and reading a device's properties is several Python calls)."""
    return torch.version.hip is None and _capability(device_index) >= MIN_CAPABILITY


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def additive_scores_reference(keys: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """keys (B,N,A), q (B,M,A), v (A,) -> scores (B,M,N) = v^T tanh(keys + q), in eager PyTorch."""
    hidden = (keys.unsqueeze(1) + q.unsqueeze(2)).tanh()  # (B,1,N,A) + (B,M,1,A) -> (B,M,N,A)
    return hidden @ v  # (B,M,N)


if triton is not None:

    @triton.jit
    def _tanh(x, FAST: tl.constexpr):
        """tanh of a float32 tile: the GPU's one-instruction approximation where FAST (relative error below 2^-10,
        under the bfloat16 / float16 inputs' own rounding), else through the sigmoid, exact to float32 rounding."""
        if FAST:
            return tl.inline_asm_elementwise(
                "tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _scores_fwd_kernel(
        keys_ptr,  # (B,N,A)
        q_ptr,  # (B,M,A)
        v_ptr,  # (A,)
        out_ptr,  # (B,M,N)
        M,
        N,
        A,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_A: tl.constexpr,
        FAST_TANH: tl.constexpr,
    ):
        """One program per (image, block of N cells), for all M queries of the image: each keys tile is read
        from memory once, not once per query."""
        b = tl.program_id(0).to(tl.int64)  # int64: b * N * A can pass 2^31 at large batches
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        n_ok = n < N
        rows = tl.arange(0, BLOCK_M)  # (BM,) query index m
        keys_ptr += b * N * A
        q_ptr += b * M * A
        # transposed, (BN,BM): a query's scores come out of the A-reduction as a column of this
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for a0 in range(0, A, BLOCK_A):
            a = a0 + tl.arange(0, BLOCK_A)  # (BA,)
            a_ok = a < A
            # masked lanes load 0: v = 0 there, so padding adds nothing to a score
            k = tl.load(keys_ptr + n[:, None] * A + a[None, :], mask=n_ok[:, None] & a_ok[None, :], other=0.0)
            k = k.to(tl.float32)  # (BN,BA)
            v = tl.load(v_ptr + a, mask=a_ok, other=0.0).to(tl.float32)  # (BA,)
            for m in range(M):
                qm = tl.load(q_ptr + m * A + a, mask=a_ok, other=0.0).to(tl.float32)  # (BA,)
                t = _tanh(k + qm[None, :], FAST_TANH)  # (BN,BA)
                s = tl.sum(t * v[None, :], axis=1)  # (BN,)
                # Triton has no indexed assignment: add the column into row m of the accumulator by a select
                acc += tl.where(rows[None, :] == m, s[:, None], 0.0)
        out = out_ptr + b * M * N + rows[None, :] * N + n[:, None]  # (BN,BM)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & (rows[None, :] < M))

    @triton.jit
    def _scores_bwd_kernel(
        keys_ptr,  # (B,N,A)
        q_ptr,  # (B,M,A)
        v_ptr,  # (A,)
        g_ptr,  # (B,M,N) dL/dscores
        dkeys_ptr,  # (B,N,A)
        dq_ptr,  # (B,M,A)
        dv_part_ptr,  # (B,A) float32: this image's share of dv
        M,
        N,
        A,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_A: tl.constexpr,
        NEED_DKEYS: tl.constexpr,
        NEED_DQ: tl.constexpr,
        NEED_DV: tl.constexpr,
        FAST_TANH: tl.constexpr,
    ):
        """One program per (image, block of A), looping over all N cells and M queries of the image. It is then
        the only writer of dkeys[b,:,a-block], dq[b,:,a-block] and dv_part[b,a-block]: no atomics, and the
        sums come out in a fixed order (deterministic gradients)."""
        b = tl.program_id(0).to(tl.int64)
        a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)  # (BA,)
        a_ok = a < A
        rows = tl.arange(0, BLOCK_M)  # (BM,) query index m
        keys_ptr += b * N * A
        dkeys_ptr += b * N * A
        q_ptr += b * M * A
        g_ptr += b * M * N
        v = tl.load(v_ptr + a, mask=a_ok, other=0.0).to(tl.float32)  # (BA,)
        dq_acc = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)  # sum_n g (1 - t^2), times v at the end
        # sum_{m,n} g t, kept per (cell, channel) and summed over the cells once at the end: a sum across the tile
        # at every (query, cell block) costs a pass through shared memory and a barrier each time
        dv_acc = tl.zeros((BLOCK_N, BLOCK_A), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)  # (BN,)
            n_ok = n < N
            kmask = n_ok[:, None] & a_ok[None, :]
            k = tl.load(keys_ptr + n[:, None] * A + a[None, :], mask=kmask, other=0.0).to(tl.float32)  # (BN,BA)
            dk_acc = tl.zeros((BLOCK_N, BLOCK_A), dtype=tl.float32)  # sum_m g (1 - t^2), times v at the end
            for m in range(M):
                qm = tl.load(q_ptr + m * A + a, mask=a_ok, other=0.0).to(tl.float32)  # (BA,)
                # g = 0 on masked cells: they add nothing to any sum below, whatever t is there
                g = tl.load(g_ptr + m * N + n, mask=n_ok, other=0.0).to(tl.float32)  # (BN,)
                t = _tanh(k + qm[None, :], FAST_TANH)  # recomputed, (BN,BA)
                if NEED_DV:
                    dv_acc += g[:, None] * t
                if NEED_DKEYS or NEED_DQ:
                    s = g[:, None] * (1.0 - t * t)  # (BN,BA) dscore/d(keys + q), without v
                    if NEED_DKEYS:
                        dk_acc += s
                    if NEED_DQ:
                        # row m of dq_acc, by a select (no indexed assignment in Triton)
                        dq_acc += tl.where(rows[:, None] == m, tl.sum(s, axis=0)[None, :], 0.0)
            if NEED_DKEYS:
                dk = (dk_acc * v[None, :]).to(dkeys_ptr.dtype.element_ty)
                tl.store(dkeys_ptr + n[:, None] * A + a[None, :], dk, mask=kmask)
        if NEED_DQ:
            dq = (dq_acc * v[None, :]).to(dq_ptr.dtype.element_ty)
            tl.store(dq_ptr + b * M * A + rows[:, None] * A + a[None, :], dq, mask=(rows[:, None] < M) & a_ok[None, :])
        if NEED_DV:
            tl.store(dv_part_ptr + b * A + a, tl.sum(dv_acc, axis=0), mask=a_ok)


def _block(size: int, cap: int, given: int | None) -> int:
    """A tile size: ``given`` if set, else the next power of 2 of ``size``, capped; at least 2 (no size-1 tiles)."""
    if given is not None:
        if given < 2 or given & (given - 1):
            raise ValueError(f"tile sizes must be powers of 2, at least 2, got {given}")
        return given
    return max(2, min(cap, triton.next_power_of_2(size)))


#: A kernel configuration: (block_n, block_a, num_warps).
Config = tuple[int, int, int]

#: The configurations timed, on a GPU, the first time each kernel runs at a shape (:func:`_choose`). Fewer warps keep
#: the sums across a tile inside one warp (register shuffles, no shared memory, no barrier); more, and larger tiles,
#: give each program more independent work. Tiles are cut down to the shape (see :func:`_fit`). The lists hold the
#: fastest tiles of ``benchmarks/fused_attention.py``'s grid (8-32 cells x 32-128 channels, 1-4 warps) on an H200 at
#: COCO-scale training sizes (B=256, M=5, N=196, A=512, bf16; 2026-12-04) and a few neighbours for other cards.
FORWARD_CONFIGS: tuple[Config, ...] = (
    (8, 128, 2), (8, 64, 1), (16, 128, 2), (16, 128, 4), (16, 64, 2), (32, 64, 4), (32, 32, 2), (64, 64, 4),
)  # fmt: skip
BACKWARD_CONFIGS: tuple[Config, ...] = (
    (32, 64, 1), (32, 32, 1), (32, 32, 2), (16, 64, 1), (16, 64, 2), (16, 128, 2), (8, 64, 1), (32, 64, 4),
)  # fmt: skip

#: The configuration chosen for each (kernel, device, dtype, batch size rounded up to a power of 2, M, N, A,
#: gradients asked, fast tanh), kept for the life of the process. See :func:`chosen_configs`.
_CHOSEN: dict[tuple, Config] = {}

#: Timed calls of each configuration when choosing (after one untimed call that compiles it): at ~0.1-0.3 ms a call
#: (COCO-scale training sizes, H200), fewer left the choice to noise
TUNE_REPEATS = 20

#: The GPU's tanh instruction (tanh.approx.f32) needs compute capability 7.5 (Turing) or later
FAST_TANH_CAPABILITY = (7, 5)


def chosen_configs() -> dict[tuple, Config]:
    """The kernel configurations chosen so far in this process, by (kernel, device index, dtype, batch size rounded
    up to a power of 2, M, N, A, gradients asked, fast tanh): what a benchmark reports beside its times."""
    return dict(_CHOSEN)


def _fit(config: Config, n: int, a: int) -> Config:
    """``config`` with its tiles no larger than the shape needs (a 64-cell tile over 13 cells computes 51 empty
    rows); configurations that then coincide are timed once."""
    bn, ba, warps = config
    return min(bn, _block(n, bn, None)), min(ba, _block(a, ba, None)), warps


def _time_ms(launch) -> float:
    """Mean milliseconds of ``launch()`` over :data:`TUNE_REPEATS` calls, after one that compiles it."""
    launch()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(TUNE_REPEATS):
        launch()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / TUNE_REPEATS


def _may_tune(t: torch.Tensor) -> bool:
    """Whether a kernel's configuration may be chosen by timing now: on a GPU (the interpreter's times mean nothing)
    and not while a CUDA graph is being captured (timing synchronises, which capture forbids; the default runs and is
    not kept, so a later eager call still chooses)."""
    return t.is_cuda and not torch.cuda.is_current_stream_capturing()


def _configure(
    explicit: Config | None,
    kind: str,
    keys: torch.Tensor,
    m: int,
    needs: tuple[bool, ...],
    fast: bool,
    candidates: tuple[Config, ...],
    launch,
) -> Config:
    """The configuration a kernel runs with: the one given; the shape's default under
    ``torch.use_deterministic_algorithms`` (even where one was chosen before: the tile sets the order of the sums,
    so a timed choice could differ between runs in the last bits); else :func:`_choose`'s."""
    if explicit:
        return explicit
    n, a = keys.shape[1:]
    default = _fit((MAX_BLOCK_N, MAX_BLOCK_A, 4), n, a)
    if torch.are_deterministic_algorithms_enabled():
        return default
    key = _key(kind, keys, m, needs, fast)
    # a generator: the tiles are fitted only when a choice is made, not at every word step that finds one made
    return _choose(key, (_fit(c, n, a) for c in candidates), launch, default, _may_tune(keys))


def _choose(key: tuple, candidates: Iterable[Config], launch, default: Config, tune: bool, timer=_time_ms) -> Config:
    """The configuration to run ``launch(config)`` with: the one chosen before for ``key``; else, where ``tune``, the
    fastest of ``candidates`` by ``timer`` (kept for ``key``; a candidate that does not compile, its tile too large
    for this card's registers or shared memory, is skipped); else ``default``. The kernels write every element of
    their outputs, so the timed calls leave nothing behind."""
    if key in _CHOSEN:
        return _CHOSEN[key]
    if not tune:
        return default
    times, failures, last = {}, [], None
    for config in dict.fromkeys(candidates):  # in order, without repeats
        try:
            times[config] = timer(lambda c=config: launch(c))
        except _TILE_ERRORS as e:  # this tile does not build or fit on this card
            failures.append(f"{config}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            last = e
    if not times:
        message = f"no configuration of the fused attention kernel built at {key}: " + "; ".join(failures)
        raise RuntimeError(message) from last
    _CHOSEN[key] = min(times, key=times.get)
    return _CHOSEN[key]


def _use_fast_tanh(t: torch.Tensor, asked: bool | None) -> bool:
    """Whether the kernels take the GPU's tanh instruction: asked for (True), or by default (None) for bfloat16 and
    float16 inputs, whose own rounding (2^-8, 2^-11) is as coarse as its error; never in the interpreter (it
    runs no GPU instructions), on ROCm (the instruction is NVIDIA's PTX) or on a card before compute capability
    7.5."""
    if asked is False or not t.is_cuda or torch.version.hip is not None:
        if asked:
            raise ValueError("fast_tanh=True needs an NVIDIA GPU: the interpreter and ROCm cannot run its tanh")
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    capable = _capability(index) >= FAST_TANH_CAPABILITY
    if asked and not capable:
        raise ValueError(f"fast_tanh=True needs compute capability {FAST_TANH_CAPABILITY} or later")
    return capable and (asked or t.dtype in (torch.bfloat16, torch.float16))


def _device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a no-op on a CPU tensor)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _kernel_inputs(
    keys: torch.Tensor, q: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys, q, v as the kernels read them: contiguous (they index with the shapes' own strides), q in keys' dtype
    (one dtype for both; q's gradient still goes back in its own). No copy of inputs that are so already."""
    return keys.contiguous(), q.to(keys.dtype).contiguous(), v.contiguous()


def _key(kind: str, keys: torch.Tensor, m: int, needs: tuple[bool, ...], fast: bool) -> tuple:
    """What a configuration is chosen for: (kernel, device index, dtype, batch size rounded up to a power of 2, M,
    N, A, gradients asked (dkeys, dq, dv; none for the forward), fast tanh)."""
    bsz, n, a = keys.shape
    index = keys.device.index if keys.is_cuda else -1
    return (kind, index, str(keys.dtype).removeprefix("torch."), triton.next_power_of_2(bsz), m, n, a, needs, fast)


class _AdditiveScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys, q, v, explicit, fast_tanh):
        # the inputs as given are saved, not the copies made here: a second derivative (see backward) must reach
        # the inputs through autograd, and copies made inside a Function have no autograd history
        ctx.save_for_backward(keys, q, v)  # not the (B,M,N,A) tanh: the backward recomputes it
        keys, q, v = _kernel_inputs(keys, q, v)
        bsz, n, a = keys.shape
        m = q.size(1)
        fast = _use_fast_tanh(keys, fast_tanh)
        ctx.explicit, ctx.fast = explicit, fast
        if a == 0:
            return keys.new_zeros(bsz, m, n)  # an empty sum
        out = keys.new_empty(bsz, m, n)  # (B,M,N), in keys' dtype as eager autocast gives
        if not out.numel():
            return out
        block_m = max(2, triton.next_power_of_2(m))

        def launch(config: Config) -> None:
            block_n, block_a, warps = config
            grid = (bsz, triton.cdiv(n, block_n))
            _scores_fwd_kernel[grid](keys, q, v, out, m, n, a, block_m, block_n, block_a, fast, num_warps=warps)

        with _device(keys):
            launch(_configure(explicit, "forward", keys, m, (), fast, FORWARD_CONFIGS, launch))
        return out

    @staticmethod
    def backward(ctx, g):
        keys_in, q_in, v_in = ctx.saved_tensors
        need_dkeys, need_dq, need_dv = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty, say): autograd cannot differentiate the kernels' writes, so the
            # gradients come from the eager definition, itself differentiable (it builds the (B,M,N,A) tensor), of
            # the function the kernels compute: q rounded to keys' dtype, then everything in float32 (with exact
            # tanh, where the forward may have taken the GPU's approximation: within its 2^-10)
            scores = additive_scores_reference(keys_in.float(), q_in.to(keys_in.dtype).float(), v_in.float())
            wanted = [t for t, need in zip((keys_in, q_in, v_in), (need_dkeys, need_dq, need_dv)) if need]
            grads = iter(torch.autograd.grad(scores, wanted, g.float(), create_graph=True))
            return (*(next(grads) if need else None for need in (need_dkeys, need_dq, need_dv)), None, None)
        keys, q, v = _kernel_inputs(keys_in, q_in, v_in)  # the same copies as the forward's (none for the model's)
        g = g.contiguous()  # (B,M,N)
        bsz, n, a = keys.shape
        m = q.size(1)
        # the kernel writes every element of each (a memset of dkeys would cost as much as writing it); with an
        # empty dimension it does not run, and the gradients are zeros
        new = torch.empty if bsz * m * n * a else torch.zeros
        dkeys = new(keys.shape, dtype=keys.dtype, device=keys.device) if need_dkeys else None
        dq = new(q.shape, dtype=q_in.dtype, device=q.device) if need_dq else None
        # per image partial sums in float32, summed here in a fixed order: deterministic, unlike atomics
        dv_part = new(bsz, a, dtype=torch.float32, device=v.device) if need_dv else None
        if bsz * m * n * a:
            block_m = max(2, triton.next_power_of_2(m))
            needs = (need_dkeys, need_dq, need_dv)

            def launch(config: Config) -> None:
                block_n, block_a, warps = config
                grid = (bsz, triton.cdiv(a, block_a))
                _scores_bwd_kernel[grid](
                    keys,
                    q,
                    v,
                    g,
                    keys if dkeys is None else dkeys,  # an unused pointer when the gradient is not needed
                    q if dq is None else dq,
                    v if dv_part is None else dv_part,
                    m,
                    n,
                    a,
                    block_m,
                    block_n,
                    block_a,
                    *needs,
                    ctx.fast,
                    num_warps=warps,
                )

            with _device(keys):
                launch(_configure(ctx.explicit, "backward", keys, m, needs, ctx.fast, BACKWARD_CONFIGS, launch))
        dv = dv_part.sum(0).to(v.dtype) if need_dv else None  # (A,)
        return dkeys, dq, dv, None, None


def additive_scores(
    keys: torch.Tensor,
    q: torch.Tensor,
    v: torch.Tensor,
    *,
    block_n: int | None = None,
    block_a: int | None = None,
    num_warps: int | None = None,
    fast_tanh: bool | None = None,
) -> torch.Tensor:
    """keys (B,N,A), q (B,M,A), v (A,) -> scores (B,M,N) = v^T tanh(keys + q), fused (see the module docstring),
    differentiable in all three inputs.

    Float32, bfloat16 or float16 inputs; the kernels compute in float32 and the scores come out in keys' dtype
    (as eager autocast gives them), each gradient in its input's dtype.

    ``block_n``, ``block_a`` (tile sizes, powers of 2) and ``num_warps`` (per program): left None, each kernel's
    configuration is chosen the first time it runs at a shape on a GPU, by timing :data:`FORWARD_CONFIGS` /
    :data:`BACKWARD_CONFIGS` (once per process and shape: milliseconds of timing, plus compiling each candidate
    where Triton's disk cache does not hold it yet, seconds; :func:`chosen_configs` lists the choices), and is the
    shape's default tile with 4 warps in the interpreter, under ``torch.use_deterministic_algorithms`` (even where a
    choice was made before) and while a CUDA graph is captured before any choice. Any of them given fixes the
    configuration (the others at those defaults): tests set small tiles so that small shapes span several,
    ``benchmarks/fused_attention.py`` compares them.

    ``fast_tanh``: whether tanh is the GPU's one-instruction approximation (relative error below 2^-10) rather than
    exact to float32 rounding; None (default) takes it for bfloat16 and float16 keys on a card of compute
    capability 7.5 or later (never in the interpreter). Needs :func:`fused_available`.
    """
    if triton is None:
        raise RuntimeError("additive_scores needs Triton, which is not installed")
    if keys.dim() != 3 or q.dim() != 3 or v.dim() != 1:
        shapes = f"{tuple(keys.shape)}, {tuple(q.shape)}, {tuple(v.shape)}"
        raise ValueError(f"expected keys (B,N,A), q (B,M,A), v (A,), got {shapes}")
    if q.size(0) != keys.size(0) or q.size(2) != keys.size(2) or v.size(0) != keys.size(2):
        raise ValueError(f"shapes do not match: keys {tuple(keys.shape)}, q {tuple(q.shape)}, v {tuple(v.shape)}")
    explicit = None
    if block_n is not None or block_a is not None or num_warps is not None:
        n, a = keys.size(1), keys.size(2)
        if num_warps is not None and (num_warps < 1 or num_warps & (num_warps - 1)):
            raise ValueError(f"num_warps must be a power of 2, got {num_warps}")
        explicit = (_block(n, MAX_BLOCK_N, block_n), _block(a, MAX_BLOCK_A, block_a), num_warps or 4)
    return _AdditiveScores.apply(keys, q, v, explicit, fast_tanh)
