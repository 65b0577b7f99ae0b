"""Where a training step's time goes: the host's time per step against the device's busy time, and the kernels.

    python benchmarks/train_step_profile.py --device cuda --precision bf16 --channels-last --decoders lstm \
        --modes cached [--profile-steps 3] [--rows 12] [any option of benchmarks/throughput.py]

The step is ``benchmarks/throughput.py``'s (same model, sizes and options, ``--compile`` and ``--cuda-graph``
included), run ``--warmup`` times, then ``--profile-steps`` times under ``torch.profiler``; mode ``search`` profiles its
batched search instead (encoder included, ``--search-images`` images; ``search1`` is skipped). Printed per decoder and
mode:

- wall ms per step (synchronised at the end of the profiled steps; the profiler's own overhead included), host
  ms per step that the profiler saw in PyTorch's operators and the CUDA runtime's calls (waits in synchronize
  calls left out), device busy ms per step (the sum of the kernels'
  own times; kernels do not overlap on one stream, so this is the time the device was working), kernel
  launches and ``aten::`` operator calls (nested ones included) per step;
- the ``--rows`` kernels (or, on CPU, operators) with the most self time, as the profiler's table.

Wall time well above device busy time means the device waited for the host to launch kernels (many small
kernels, as an LSTM's word loop makes): what CUDA graphs or fewer, larger kernels win back. Busy time near wall
time means the kernels themselves are the cost, and the table says which.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from throughput import (
    ENCODER_MODES,
    MODES,
    PIPELINE_MODES,
    PeakMemory,
    _sync,
    build_parser,
    parse_args,
    prepare,
    searcher,
    train_step,
)
from torch.autograd import DeviceType


def profile_mode(args: argparse.Namespace, decoder: str, mode: str, device: torch.device, steps: int, rows: int):
    if mode == "search":
        images = torch.randn(args.search_images, 3, args.image_size, args.image_size, device=device)  # (B,3,H,W)
        search = searcher(args, decoder, device)

        def step() -> None:
            search(images)

    else:
        step = train_step(args, decoder, mode, device, PeakMemory(device))
    for _ in range(args.warmup):
        step()
    _sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    # the device's own events (kernels, copies): an operator's row repeats its kernels' time, so only these count
    on_device = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
    device_us = sum(e.self_device_time_total for e in on_device)
    kernels = sum(e.count for e in on_device)
    # the host's own work: not the rows where it waits for the device (the final synchronize; a launch can block
    # too when the queue is full, which this cannot tell apart and so still counts)
    host_us = sum(e.self_cpu_time_total for e in events if "Synchronize" not in e.key)
    calls = sum(e.count for e in events if e.key.startswith("aten::"))  # nested calls counted too
    print(
        f"{decoder} {mode}: wall {1e3 * wall:.1f} ms/step, host (operators) {host_us / 1e3 / steps:.1f} ms/step, "
        f"device busy {device_us / 1e3 / steps:.1f} ms/step, {kernels / steps:.0f} kernels/step, "
        f"{calls / steps:.0f} aten calls/step"
    )
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=rows, max_name_column_width=70))


def main(argv: list[str] | None = None) -> None:
    # throughput.py's options and this script's own, in one parser: --help lists both (it printed throughput.py's
    # alone), and throughput.py's --steps (the search's length) is not taken for the profiled steps
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps per mode")
    parser.add_argument("--rows", type=int, default=12, help="kernels (on CPU: operators) listed per mode")
    args = parse_args(argv, parser)
    device = prepare(args)
    print(f"train_step_profile, torch {torch.__version__}, command: python {' '.join(sys.argv)}")
    for decoder in args.decoders:
        for mode in args.modes:
            if mode == "search1" or mode in ENCODER_MODES:
                # one image at a time: the batched search's steps, smaller; the encoder alone: no step to profile
                print(f"-- {decoder}: {mode} skipped (profiled: training modes and the batched search)")
                continue
            batch = f"{args.search_images} images x K={args.beam}" if mode == "search" else (
                f"{args.images_per_batch} x {args.captions_per_image}")  # fmt: skip
            print(f"-- {decoder}: {MODES.get(mode) or PIPELINE_MODES[mode]}, batch {batch}")
            profile_mode(args, decoder, mode, device, args.profile_steps, args.rows)


if __name__ == "__main__":
    main()
