"""Per-element cost of the elementwise passes of the additive attention score on this CPU.

    python benchmarks/cpu_elementwise.py [--elements 2621440] [--threads 1 2] [--repeats 20]

Why it exists: ``AdditiveAttention`` computes v^T tanh(x) on a CPU without autograd as
2 v^T sigmoid(2x) - sum(v), because PyTorch's CPU tanh goes to MKL, which is slow on some CPUs
(AMD); this prints whether that holds on the machine at hand. The default size is one step of a
batched search at the shapes sizes (64 images x 5 beams x 64 cells x 128). Prints, per thread
count, the best of ``--repeats`` timings in nanoseconds per element.
"""

from __future__ import annotations

import argparse
import time

import torch


def _ns_per_element(fn, x: torch.Tensor, out: torch.Tensor, repeats: int) -> float:
    fn(x, out)  # warm-up; every pass writes into ``out``, so no timing includes a new allocation's page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x, out)
        best = min(best, time.perf_counter() - t0)
    return best / x.numel() * 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", type=int, default=64 * 5 * 64 * 128)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    x, out = torch.randn(args.elements), torch.empty(args.elements)
    passes = {
        "tanh": lambda t, o: torch.tanh(t, out=o),
        "sigmoid": lambda t, o: torch.sigmoid(t, out=o),
        "add": lambda t, o: torch.add(t, t, out=o),
        "sigmoid(2x)": lambda t, o: torch.mul(t, 2, out=o).sigmoid_(),  # what the attention score runs
    }
    print(
        f"{args.elements} float32 elements, torch {torch.__version__}, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}; best of {args.repeats}, ns per element"
    )
    print(f"{'threads':<8}" + "".join(f"{name:>18}" for name in passes))
    for threads in args.threads:
        torch.set_num_threads(threads)
        row = [_ns_per_element(fn, x, out, args.repeats) for fn in passes.values()]
        print(f"{threads:<8}" + "".join(f"{v:>18.3f}" for v in row))


if __name__ == "__main__":
    main()
