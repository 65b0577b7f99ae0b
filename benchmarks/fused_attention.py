"""The fused additive-attention kernels alone, at the COCO-scale training sizes: tile and warp choices against eager.

    python benchmarks/fused_attention.py [--images 256] [--queries 5] [--cells 196] [--width 512] [--dtype bf16]
        [--blocks-n 8,16,32] [--blocks-a 32,64,128] [--warps 1,2,4] [--fast-tanh 1] [--device cuda|cpu]

Needs a CUDA GPU (Triton compiles the kernels for it); ``--device cpu`` with ``TRITON_INTERPRET=1`` runs the same
steps in Triton's interpreter at small sizes, to check this script without a GPU (its times mean nothing).

For each tile (``block_n`` cells × ``block_a`` attention channels), warp count and tanh (``--fast-tanh``: 1 the GPU's
one-instruction approximation, 0 exact), for the configuration the kernels choose themselves by timing (``tuned``, the
model's default; the choices are printed after the table), and for the model's eager score
(``AdditiveAttention._score`` under autocast, which builds the (B,M,N,A) tensor), it prints the forward and the
backward time of one word step's score ``v^T tanh(keys + q)`` (B images × M queries × N cells × A channels), the
bytes each must move at the least (forward: keys, q and v read, the scores written; backward: keys, q, v and the
scores' gradient read, the keys' and queries' gradients written) over that time, and the largest relative error of
the scores and the three gradients against float64 on fresh random inputs (each configuration is checked before it
is timed). The copy rate of the card, timed first (a 1 GiB device-to-device copy, bytes read and written), is the
ceiling for those rates. Times: ``triton.testing.do_bench`` medians (on the CPU, the median of five calls).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import checkout  # first: this checkout's captioning, not an installed one
import torch

from captioning.models.fused_attention import (
    additive_scores,
    additive_scores_reference,
    chosen_configs,
    fused_available,
)

#: the fields of a chosen configuration's key after the kernel's name (see ``chosen_configs``)
CHOSEN_KEY = ("device", "dtype", "batch (power of 2)", "M", "N", "A", "gradients", "fast tanh")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="B")
    p.add_argument("--queries", type=int, default=5, help="M: captions per image in training, beams in search")
    p.add_argument("--cells", type=int, default=196, help="N: grid cells (14 x 14)")
    p.add_argument("--width", type=int, default=512, help="A: attention width")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="keys and queries (v stays float32)")
    p.add_argument("--blocks-n", type=_ints, default=[8, 16, 32])
    p.add_argument("--blocks-a", type=_ints, default=[32, 64, 128])
    p.add_argument("--warps", type=_ints, default=[1, 2, 4])
    p.add_argument("--fast-tanh", type=_ints, default=[1], help="1: the GPU's tanh instruction, 0: exact tanh")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: interpreted (TRITON_INTERPRET=1)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def inputs(args: argparse.Namespace, gen: torch.Generator) -> list[torch.Tensor]:
    """keys (B,N,A), q (B,M,A) in ``--dtype`` and v (A,) float32, at a trained model's scale, needing gradients."""
    b, m, n, a = args.images, args.queries, args.cells, args.width
    keys = torch.randn(b, n, a, generator=gen, device=args.device).to(DTYPES[args.dtype])
    q = torch.randn(b, m, a, generator=gen, device=args.device).to(DTYPES[args.dtype])
    v = (torch.rand(a, generator=gen, device=args.device) * 2 - 1) / a**0.5
    return [t.requires_grad_() for t in (keys, q, v)]


def eager(keys: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The model's eager score (``AdditiveAttention._score``: tanh in place) under autocast, as a training step
    runs it: (B,1,N,A) + (B,M,1,A) -> (B,M,N,A) -> (B,M,N)."""
    with torch.autocast(keys.device.type, dtype=keys.dtype, enabled=keys.dtype != torch.float32):
        return torch.matmul((keys.unsqueeze(1) + q.unsqueeze(2)).tanh_(), v)


def errors(fn, args: argparse.Namespace, gen: torch.Generator) -> float:
    """Largest relative error (max abs error over max abs reference) of the scores and gradients of ``fn`` against
    float64 autograd of the definition, on fresh random inputs."""
    keys, q, v = inputs(args, gen)
    out = fn(keys, q, v)
    upstream = torch.randn(out.shape, generator=gen, device=args.device).to(out.dtype)
    grads = torch.autograd.grad(out, (keys, q, v), upstream)
    ref_inputs = [t.detach().double().requires_grad_() for t in (keys, q, v)]
    ref = additive_scores_reference(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, upstream.double())
    pairs = [(out, ref), *zip(grads, ref_grads)]
    return max(((x.double() - r).abs().max() / r.abs().max()).item() for x, r in pairs)


def _median_ms(fn, device: str) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on a GPU, five timed calls on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def timings(fn, args: argparse.Namespace, gen: torch.Generator) -> tuple[float, float]:
    """Median forward and backward milliseconds of ``fn`` (the backward alone: the forward's graph is kept)."""
    keys, q, v = inputs(args, gen)
    forward = _median_ms(lambda: fn(keys, q, v), args.device)
    out = fn(keys, q, v)
    upstream = torch.randn(out.shape, generator=gen, device=args.device).to(out.dtype)
    backward = _median_ms(lambda: torch.autograd.grad(out, (keys, q, v), upstream, retain_graph=True), args.device)
    return forward, backward


def copy_rate(device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (64 MiB on the CPU), counting bytes read and written."""
    src = torch.empty(2**30 if device == "cuda" else 2**26, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (_median_ms(lambda: dst.copy_(src), device) / 1e3)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/fused_attention.py needs a CUDA GPU: the kernels are compiled for one by Triton")
    if not fused_available(torch.empty(1, device=args.device)):
        sys.exit("benchmarks/fused_attention.py: Triton is not installed, or --device cpu without TRITON_INTERPRET=1")
    torch.manual_seed(args.seed)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    b, m, n, a = args.images, args.queries, args.cells, args.width
    item = torch.finfo(DTYPES[args.dtype]).bits // 8
    fwd_bytes = (b * n * a + b * m * a + b * m * n) * item + a * 4
    bwd_bytes = (2 * b * n * a + 2 * b * m * a + b * m * n) * item + a * 4 * 2  # dkeys, dq written; v, dv
    rate = copy_rate(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, Triton interpreter"
    print(
        f"fused_attention, {name}, torch {torch.__version__}, {args.dtype}, "
        f"B={b} M={m} N={n} A={a}; command: python {' '.join(sys.argv)}"
    )
    print(checkout.describe())
    print(
        f"copy rate {rate / 1e12:.2f} TB/s; least bytes: forward {fwd_bytes / 1e6:.1f} MB "
        f"({1e6 * fwd_bytes / rate:.0f} us at that rate), backward {bwd_bytes / 1e6:.1f} MB "
        f"({1e6 * bwd_bytes / rate:.0f} us)"
    )
    rows = [("eager (B,M,N,A) tensor", eager)]
    fast_options = [bool(f) for f in args.fast_tanh] if args.device == "cuda" else [False]  # none in the interpreter
    for fast in fast_options:
        rows.append((f"fused, tuned, {'fast' if fast else 'exact'} tanh", lambda k, q, v, fast=fast: additive_scores(
            k, q, v, fast_tanh=fast)))  # fmt: skip
    for bn, ba, w, fast in itertools.product(args.blocks_n, args.blocks_a, args.warps, fast_options):
        rows.append((f"fused {bn} x {ba}, {w} warps, {'fast' if fast else 'exact'} tanh", lambda k, q, v, bn=bn, ba=ba,
            w=w, fast=fast: additive_scores(k, q, v, block_n=bn, block_a=ba, num_warps=w, fast_tanh=fast)))  # fmt: skip
    print("| kernel | forward us | backward us | forward TB/s | backward TB/s | max rel error |")
    print("|---|---|---|---|---|---|")
    for name, fn in rows:
        try:
            err = errors(fn, args, gen)
            fwd, bwd = timings(fn, args, gen)
        except Exception as e:  # a tile the compiler refuses (too many registers, shared memory) must not end it
            print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | |", flush=True)
            continue
        print(
            f"| {name} | {1e3 * fwd:.1f} | {1e3 * bwd:.1f} | {fwd_bytes / fwd / 1e9:.2f} | {bwd_bytes / bwd / 1e9:.2f} "
            f"| {err:.1e} |",
            flush=True,
        )
        if args.device == "cuda":
            torch.cuda.empty_cache()
    for key, (bn, ba, w) in chosen_configs().items():
        print(f"chosen: {key[0]} {dict(zip(CHOSEN_KEY, key[1:]))}: {bn} x {ba}, {w} warps")


if __name__ == "__main__":
    main()
