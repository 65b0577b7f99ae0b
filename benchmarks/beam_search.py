"""Beam search throughput: B images decoded at once versus the same search one image at a time.

    python benchmarks/beam_search.py [--images 64] [--beam 5] [--steps 16] [--repeats 5] [--image-size 64]
        [--device cpu] [--threads N] [--ckpt path ...] [--parents]

For each decoder (LSTM and Transformer at the shapes sizes, or the given checkpoints) it times the
encoder + beam search over ``--images`` images, batched and one by one, and prints captions/s.
Random-initialised models run a fixed ``--steps`` steps (min_len = max_len) so that both modes do
the same work; checkpoints search with their own max_len (as in inference), but with K = ``--beam`` and no
length penalty, over random images all at once (Captioner batches 32 at a time).

It prints the thread count and the load average before and after: on a shared machine, two OpenMP threads
stall at every barrier that waits for a descheduled thread, which slows the one-at-a-time search's many
small operations far more than the batched search's few large ones (``--threads 1`` avoids that).

The two modes alternate: each of ``--repeats`` rounds times one batched search and one pass over the
images one at a time, back to back, so that both see the same machine. On a shared machine whose
speed drifts between runs, timing all batched repeats first and all one-by-one repeats after
compares two different machines. Printed: the best rate of each mode, their ratio, and the median
and range of the per-round ratios (each from one batched and one one-by-one run seconds apart).

``--parents`` also prints, per step of the batched search, the share of the kept rows whose parent
row is distinct (beams with the same parent share its state, hence its attention): how much an
"once per distinct parent" step could save.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import checkout  # first: this checkout's captioning, not an installed one
import torch

import captioning.decoding
from captioning.decoding import beam_search
from captioning.models.net import CaptionNet

SHAPES_MODELS = {
    "lstm": dict(decoder="lstm", embed_dim=128, hidden_dim=256, attention_dim=128),
    "transformer": dict(decoder="transformer", hidden_dim=128, num_heads=4, num_layers=2),
}


def _search(net: CaptionNet, images: torch.Tensor, *, beam: int, min_len: int, max_len: int) -> None:
    """Encoder + beam search, synchronised so that GPU timings are real."""
    with torch.no_grad():
        feats = net.encode(images).features
        beam_search(net.decoder, feats, beam_size=beam, max_len=max_len, min_len=min_len)
    if images.device.type == "cuda":
        torch.cuda.synchronize()


def _distinct_parents(search) -> list[float]:
    """Run ``search()`` once and return, per step, distinct parent rows / kept rows."""
    shares = []
    select = captioning.decoding._select

    def counting(decoder, state, static, rows, images=None):
        if images is None:  # a step's reordering (not images leaving the batch)
            shares.append(rows.unique().numel() / rows.numel())
        return select(decoder, state, static, rows, images)

    captioning.decoding._select = counting
    try:
        search()
    finally:
        captioning.decoding._select = select
    return shares


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _alternate(batched, one_by_one, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of ``batched()`` and of ``one_by_one()`` in each of ``rounds`` rounds, run back to back
    (after one warm-up of each)."""
    batched()
    one_by_one()
    times = [(_seconds(batched), _seconds(one_by_one)) for _ in range(rounds)]
    return [t[0] for t in times], [t[1] for t in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="rounds of one batched + one one-by-one run")
    p.add_argument("--ckpt", nargs="*", default=[], help="checkpoints to time instead of random models")
    p.add_argument("--parents", action="store_true", help="print the share of distinct parents per step")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU, and torch finds none here")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    models = []
    if args.ckpt:
        from captioning.inference import Captioner

        for path in args.ckpt:
            c = Captioner.from_checkpoint(path, device=device)
            models.append((path, c.net, c.transform.size, 0, c.max_len))
    else:
        for name, kw in SHAPES_MODELS.items():
            net = CaptionNet(40, **kw).to(device).eval()
            net.encoder.optimize_for_inference()  # as Captioner.from_checkpoint runs it
            models.append((name, net, args.image_size, args.steps, args.steps))
    print(f"beam search, {args.images} images, K={args.beam}, device={device}, torch {torch.__version__}")
    print(f"{checkout.describe()}; {torch.get_num_threads()} threads")
    print("load average (1, 5, 15 min) at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"rounds: {args.repeats}, each one batched search and one pass one image at a time, alternating")
    columns = f"{'batched cap/s':>14} {'one-by-one cap/s':>17} {'best/best':>10} {'per round: median (range)':>27}"
    print(f"{'model':<40} {columns}")
    for name, net, size, min_len, max_len in models:
        images = torch.randn(args.images, 3, size, size, device=device)
        search = functools.partial(_search, net, beam=args.beam, min_len=min_len, max_len=max_len)
        one_by_one = lambda: [search(images[i : i + 1]) for i in range(args.images)]  # noqa: B023
        batched, single = _alternate(lambda: search(images), one_by_one, args.repeats)  # noqa: B023
        ratios = sorted(s / b for b, s in zip(batched, single))
        median = statistics.median(ratios)
        spread = f"{median:.1f}x ({ratios[0]:.1f}-{ratios[-1]:.1f}x)"
        best = min(single) / min(batched)
        rates = f"{args.images / min(batched):>14.1f} {args.images / min(single):>17.1f}"
        print(f"{name:<40} {rates} {best:>9.1f}x {spread:>27}")
        if args.parents:
            shares = _distinct_parents(lambda: search(images))  # noqa: B023 (called at once)
            print(f"  distinct parents per step: {' '.join(f'{x:.2f}' for x in shares)}")
    print("load average (1, 5, 15 min) at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
