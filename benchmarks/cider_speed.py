"""How fast ``captioning.cocoeval.CiderD`` scores captions, as a training reward would call it.

COCO-like synthetic data (seeded): captions of 8-12 words drawn from a Zipf-distributed vocabulary of 2,000
words, 5 references per image. The document frequencies come from the references of all images, computed once
(``CiderD(refs)``, timed separately); then one candidate per image is scored against its image's references for
the first 1k and all 10k images. "refs cached" is the normal regime (the constructor encodes the corpus
references); "refs not cached" empties the reference cache before each call, i.e. the cost for references the
scorer has never seen.

    python benchmarks/cider_speed.py [--images 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captioning.cocoeval import CiderD  # noqa: E402


def synthetic_captions(num_images: int, refs_per_image: int = 5, seed: int = 0) -> tuple[list[list[str]], list[str]]:
    """(references per image, one candidate per image): space-joined lowercase tokens, 8-12 words each."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]  # Zipf: a few words are everywhere, as in captions

    def caption() -> str:
        return " ".join(rng.choices(vocab, weights, k=rng.randint(8, 12)))

    refs = [[caption() for _ in range(refs_per_image)] for _ in range(num_images)]
    # candidates share some words and phrases with their references, as a trained model's samples do
    cands = []
    for r in refs:
        words = rng.choice(r).split()
        keep = rng.randint(len(words) // 3, len(words))
        cands.append(" ".join(words[:keep] + caption().split()[: max(0, 10 - keep)]))
    return refs, cands


def best_rate(scorer: CiderD, cands: list[str], refs: list[list[str]], repeats: int, cold: bool) -> float:
    """Captions per second, best of ``repeats`` calls (a first call re-fills a cache emptied before)."""
    best = float("inf")
    for _ in range(repeats):
        if cold:
            scorer.clear_cache()
        start = time.perf_counter()
        scorer.score(cands, refs)
        best = min(best, time.perf_counter() - start)
    return len(cands) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    refs, cands = synthetic_captions(args.images)
    start = time.perf_counter()
    scorer = CiderD(refs)
    setup = time.perf_counter() - start
    print(f"CiderD(refs): document frequencies + encoded references of {args.images} images x 5 in {setup:.2f} s")
    print(f"{'captions':>9} | {'refs cached':>14} | {'refs not cached':>16}")
    print(f"{'-' * 9}-+-{'-' * 14}-+-{'-' * 16}")
    for n in sorted({min(1_000, args.images), args.images}):
        # the cache filled first, untimed: the row before emptied it (its cold calls), and with --repeats 1 the
        # "cached" call was a cold one for every reference past that row's
        scorer.score(cands[:n], refs[:n])
        warm = best_rate(scorer, cands[:n], refs[:n], args.repeats, cold=False)
        cold = best_rate(scorer, cands[:n], refs[:n], args.repeats, cold=True)
        print(f"{n:>9} | {warm:>10,.0f} /s | {cold:>12,.0f} /s")


if __name__ == "__main__":
    main()
