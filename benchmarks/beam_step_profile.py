"""Where one batched LSTM beam-search step spends its time, against what the machine can do.

    python benchmarks/beam_step_profile.py [--images 64] [--beam 5] [--repeats 50] [--one-piece]

For the shapes-sized LSTM of ``benchmarks/beam_search.py`` (random weights, 8x8 grid of 128
channels), one decoder step over images x beams rows is timed whole and in parts (attention, LSTM
cell, deep output), with the FLOP rate of the cell's GEMMs; the same for one image (K rows); then
the FLOP rate of a large fp32 GEMM (what this CPU's BLAS reaches at best) and of a tanh. A step
whose parts run near those rates is compute-bound: batching more cannot make it cheaper per row.
Whole searches also report their slowest run and their minor page faults (memory the allocator
returned to the system and faulted in again).
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import checkout  # first: this checkout's captioning, not an installed one
import torch

from captioning.decoding import beam_search
from captioning.models import attention
from captioning.models.net import CaptionNet


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


@torch.no_grad()
def step_parts(net: CaptionNet, images: int, beam: int, repeats: int) -> None:
    """Time one decoder step over images x beam rows, and its parts."""
    d = net.decoder
    features = net.encode(torch.randn(images, 3, 64, 64)).features  # (B,N,C)
    state = d.init_state(features)
    rows = images * beam
    h, c = state["h"].repeat_interleave(beam, 0), state["c"].repeat_interleave(beam, 0)  # (R,H)
    state = {"h": h, "c": c, "keys": state["keys"]}
    tokens = torch.randint(4, 40, (rows,))
    context, _ = d.attention(features, state["keys"], h)  # (R,C)
    x = torch.cat([d.embed(tokens), context], 1)  # (R,E+C)
    hidden = d.cell.hidden_size
    cell_flop = 2 * rows * 4 * hidden * (x.size(1) + hidden)
    parts = {
        "whole step": lambda: d.step(tokens, state, features),
        "attention": lambda: d.attention(features, state["keys"], h),
        "LSTM cell": lambda: d.cell(x, (h, c)),
        "deep output": lambda: d._output(d.embed(tokens), h, context),
    }
    print(f"\n{images} image(s) x K={beam} = {rows} rows")
    for name, fn in parts.items():
        ms = best_ms(fn, repeats)
        rate = f"  ({cell_flop / ms / 1e6:.0f} GFLOP/s in its GEMMs)" if name == "LSTM cell" else ""
        print(f"  {name:<12} {ms:8.3f} ms{rate}")
    # the whole search, and what its steps take (in the same run): the rest is the search's own work
    steps_ms = [0.0]
    step = d.step

    def timed_step(*a):
        t0 = time.perf_counter()
        out = step(*a)
        steps_ms[0] += (time.perf_counter() - t0) * 1e3
        return out

    d.step = timed_step
    runs = []
    try:
        for _ in range(max(3, repeats // 10)):
            steps_ms[0] = 0.0
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            beam_search(d, features, beam_size=beam, max_len=16, min_len=16)
            elapsed = (time.perf_counter() - t0) * 1e3
            runs.append((elapsed, steps_ms[0], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
    finally:
        del d.step  # back to the class's method
    total, in_steps, _ = min(runs[1:])  # the fastest run after a warm-up
    slowest = max(runs[1:])
    faults = [f for _, _, f in runs[1:]]
    pixels = torch.randn(images, 3, 64, 64)  # made once: drawing them is not the encoder's time
    encoder = best_ms(lambda: net.encode(pixels), max(1, repeats // 10))
    print(f"  search, 16 steps: {total:.1f} ms, of which decoder steps {in_steps:.1f} ms")
    # memory the allocator handed back to the system and touched again: a slow path worth seeing
    print(f"  slowest search {slowest[0]:.1f} ms; minor page faults per search {min(faults)}-{max(faults)}")
    print(f"  encoder for the {images} image(s): {encoder:.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument(
        "--one-piece", action="store_true", help="the additive score's tensor in one piece (as before chunking)"
    )
    args = p.parse_args()
    if args.one_piece:
        attention.CPU_CHUNK_BYTES = 1 << 62
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {checkout.describe()}")
    net = CaptionNet(40, decoder="lstm", embed_dim=128, hidden_dim=256, attention_dim=128).eval()
    net.encoder.optimize_for_inference()  # as Captioner.from_checkpoint runs it
    step_parts(net, args.images, args.beam, args.repeats)
    step_parts(net, 1, args.beam, args.repeats)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = best_ms(lambda: a @ b, 5)
    print(f"\nfp32 GEMM {n}x{n}x{n}: {ms:.1f} ms, {2 * n**3 / ms / 1e6:.0f} GFLOP/s (the BLAS's best here)")
    t = torch.randn(args.images, args.beam, 64, 128)  # the attention's (B,K,N,A) tanh
    ms = best_ms(lambda: t.tanh(), args.repeats)
    print(f"tanh over {t.numel() / 1e6:.1f} M elements: {ms:.3f} ms, {t.numel() / ms / 1e6:.1f} G elements/s")


if __name__ == "__main__":
    main()
