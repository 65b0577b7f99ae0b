"""Batched beam search with the encoder's BatchNorm folded into its convolutions against kept, in one process.

    python benchmarks/search_fold_ab.py [--rounds 4] [--repeats 5]

On a GPU (COCO scale: ResNet-101 at 256 px, 256 images, K = 5, 16 steps, bf16, channels-last, as
``benchmarks/throughput.py``'s search rows) each round times every variant in turn (every other round in reverse
order), folded or not, under
``torch.inference_mode`` (how ``Captioner`` and the benchmarks search) and ``torch.no_grad`` (how a frozen-encoder
training step encodes), so that drift between rounds (clocks, other jobs) hits every variant alike; rates from
separate processes varied by up to 10% for the same code. On a CPU it runs tiny sizes (ResNet-18 at 64 px, 2
images), to check the script.

Why: the frozen ResNet-101 alone is faster with its BatchNorm kept than folded on an H200 (32.3 against 37.8 ms per
256 images, ``throughput.py --modes encode,encode_folded``: the folded convolution's bias is added by a slower
elementwise kernel), so should ``Captioner`` fold only on a CPU? This says whether the whole search gains.
"""

from __future__ import annotations

import argparse
import time

import checkout  # noqa: F401  first: this checkout's captioning, not an installed one
import throughput as tp
import torch

from captioning.decoding import beam_search


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds of every variant (GPU 4, CPU 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed searches per variant and round")
    ours = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    options = ["--device", "cuda", "--precision", "bf16", "--channels-last"] if cuda else [
        "--encoder", "resnet18", "--image-size", "64", "--grid", "2", "--vocab", "50", "--hidden", "32"]  # fmt: skip
    args = tp.parse_args(options)
    device = tp.prepare(args)
    b = 256 if cuda else 2
    rounds = ours.rounds or (4 if cuda else 1)
    images = torch.randn(b, 3, args.image_size, args.image_size, device=device)  # (B,3,H,W)
    print(f"search_fold_ab, {tp._device_name(device)}, torch {torch.__version__}; {checkout.describe()}")
    print(f"{b} images, K={args.beam}, {args.steps} steps, precision {args.precision}; {rounds} rounds x "
          f"{ours.repeats} searches per variant")  # fmt: skip
    for decoder in ("lstm", "transformer"):
        nets = {}
        for fold in (True, False):
            torch.manual_seed(args.seed)  # the same weights either way
            module = tp.build(args, decoder, freeze=True, compile_decoder=False, device=device)
            module.setup("validate")
            module.eval()
            if fold:
                module.net.encoder.optimize_for_inference()  # folded, channels-last (Captioner's encoder)
            else:
                module.net.encoder.set_frozen(True)
                module.net.encoder.to(memory_format=torch.channels_last)
            nets[fold] = module.net

        def search(net, grad_mode) -> None:
            with grad_mode(), tp._autocast(device, args.precision):
                x = images.contiguous(memory_format=torch.channels_last) if args.channels_last else images
                beam_search(net.decoder, net.encode(x).features, beam_size=args.beam, max_len=args.steps,
                            min_len=args.steps)  # fmt: skip

        rates: dict[tuple[bool, str], list[float]] = {}
        variants = [(fold, mode) for fold in (True, False) for mode in (torch.inference_mode, torch.no_grad)]
        for round_no in range(rounds):
            # every other round in reverse order: drift within a round (clocks warming up) favours no variant
            for fold, grad_mode in variants if round_no % 2 == 0 else variants[::-1]:
                search(nets[fold], grad_mode)  # warm-up (cuDNN's autotuner, the kernels' own choices)
                tp._sync(device)
                t0 = time.perf_counter()
                for _ in range(ours.repeats):
                    search(nets[fold], grad_mode)
                tp._sync(device)
                rate = b * ours.repeats / (time.perf_counter() - t0)
                rates.setdefault((fold, grad_mode.__name__), []).append(rate)
        for (fold, mode), values in rates.items():
            print(f"{decoder} {'folded' if fold else 'kept BN'} {mode}: "
                  + " ".join(f"{r:,.0f}" for r in values) + " images/s per round", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
