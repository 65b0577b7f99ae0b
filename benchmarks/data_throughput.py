"""Data pipeline throughput, and a frozen-encoder training epoch with and without the feature cache.

    python benchmarks/data_throughput.py [--images 256] [--workers 0,1,2] [--batch-size 32] [--image-size 256]
        [--encoder resnet50] [--grid N] [--hidden 512] [--vocab 10000] [--captions-per-image 5]
        [--encoder-weights W] [--epoch-workers 0] [--cache-dtype float16] [--device cpu] [--threads T] [--seed 0]
        [--work DIR]

The benchmark writes its own data (into a temporary folder, or ``--work DIR`` where it is kept and
reused): ``--images`` JPEGs of Flickr size (500x375, every fourth one 375x500; smooth shapes plus
sensor-like noise, quality 90, so that decoding costs what a photo costs) with 5 captions each of
8-14 words drawn Zipf-like from ``--vocab`` words, written as a Karpathy JSON and read back with
:func:`read_karpathy_json`, so the real ingestion path runs.

Part 1 times the loading pipeline: :class:`TrainCaptions` (``load_image`` + ``EvalTransform`` to
``--image-size`` squared) through a DataLoader with ``collate_train``, for each ``--workers`` count;
images/s over one full pass, after a warm-up pass that starts the (persistent) workers.

Part 2 times one training epoch of a ``CaptionModule`` with a frozen encoder and a Show-Attend-Tell
LSTM decoder (Xu et al. 2015), run by a plain loop (no Lightning Trainer): AdamW over the trainable
parameters, ``--captions-per-image`` captions per image.
The epoch runs (a) from images, the encoder running on every batch, and (b) from a
:class:`FeatureCache` (float16 by default, as in the data module), the same images in the same
order, so both do the same number of steps. The cache build is a one-off cost, timed apart.

The encoder has random weights (no download) unless ``--encoder-weights`` names a file or a torchvision
weights name. Random weights are not free of cost, though: with torchvision's initialisation every
BatchNorm is the identity, activations grow block after block (ResNet-50 layer-4 features of mean ~17,
max ~190), the LSTM saturates and its backward pass runs on denormal numbers, up to ~30x slower on x86.
So the BatchNorm statistics are first set from one batch of the benchmark's images
(:func:`calibrate_batchnorm`), which gives features like a trained encoder's (mean ~1, max ~30).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import checkout  # noqa: F401 (first: this checkout's captioning, not an installed one)
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch import nn
from torch.utils.data import DataLoader

from captioning.data.datamodule import EpochSampler, TrainCaptions, collate_train
from captioning.data.features import FeatureCache
from captioning.data.images import load_image
from captioning.data.sources import read_karpathy_json
from captioning.data.transforms import EvalTransform
from captioning.lit_module import CaptionModule
from captioning.models.encoders import load_encoder_weights
from captioning.vocab import SPECIALS, Vocabulary

MAX_CAPTION_LEN = 24  # the data module's max_caption_len
_SYLLABLES = ["ba", "ce", "di", "fo", "gu", "ha", "ji", "ko", "lu", "ma", "ne", "pi", "ro", "su", "ta", "ve"]


def _word(i: int) -> str:
    """A distinct pronounceable pseudo-word per index (the digits of i + 16 in base 16, as syllables)."""
    i, out = i + 16, []
    while i:
        i, d = divmod(i, 16)
        out.append(_SYLLABLES[d])
    return "".join(reversed(out))


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour field + a few blurred shapes + noise: JPEG-compresses like a photo (~90 KB at 500x375)."""
    low = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    arr = np.asarray(img, np.float32) + rng.normal(0, 16, (h, w, 3)).astype(np.float32)  # (H,W,3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_dataset(folder: Path, images: int, vocab: int, seed: int) -> Path:
    """Write ``images`` JPEGs and a Karpathy JSON under ``folder`` (kept when it already matches)."""
    spec = {"images": images, "vocab": vocab, "seed": seed, "version": 1}
    json_path = folder / "dataset_bench.json"
    if json_path.is_file() and json.loads(json_path.read_text()).get("benchmark") == spec:
        return json_path
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    words = [_word(i) for i in range(vocab)]
    p = 1.0 / np.arange(1, vocab + 1)  # Zipf: word frequencies fall as 1/rank, as in captions
    p /= p.sum()
    entries = []
    for i in range(images):
        w, h = (375, 500) if i % 4 == 3 else (500, 375)
        name = f"{i:06d}.jpg"
        _photo(rng, w, h).save(folder / "images" / name, "JPEG", quality=90)
        sentences = []
        for _ in range(5):
            toks = [words[j] for j in rng.choice(vocab, int(rng.integers(8, 15)), p=p)]
            sentences.append({"raw": " ".join(toks).capitalize() + ".", "tokens": toks})
        entries.append({"filepath": "images", "filename": name, "split": "train", "imgid": i, "sentences": sentences})
    json_path.write_text(json.dumps({"dataset": "bench", "benchmark": spec, "images": entries}))
    return json_path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _loader(dataset: TrainCaptions, sampler: EpochSampler, batch_size: int, workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate_train,
        pin_memory=pin,
    )


def loading_rate(dataset: TrainCaptions, batch_size: int, workers: int) -> float:
    """Images/s of one full pass of the training loader, after a warm-up pass that starts the workers."""
    sampler = EpochSampler(len(dataset), seed=0)
    loader = _loader(dataset, sampler, batch_size, workers, pin=False)
    for _ in loader:  # warm-up: worker start-up and the page cache are not what is measured
        pass
    sampler.set_epoch(1)
    t0 = time.perf_counter()
    n = sum(inputs.size(0) for inputs, _, _ in loader)  # inputs (B,3,H,W)
    rate = n / (time.perf_counter() - t0)
    del loader  # stops the persistent workers before the next setting starts its own
    return rate


def per_image_costs(records: list, transform: EvalTransform) -> tuple[float, float]:
    """Mean ms per image of load_image (JPEG decode, RGB) and of EvalTransform (resize, normalise), in-process."""
    load = tfm = 0.0
    for r in records:
        t0 = time.perf_counter()
        img = load_image(r.image_path)
        t1 = time.perf_counter()
        transform(img)
        tfm += time.perf_counter() - t1
        load += t1 - t0
    return 1e3 * load / len(records), 1e3 * tfm / len(records)


@torch.no_grad()
def calibrate_batchnorm(encoder: nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``images`` (B,3,H,W), as training would have."""
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
        m.train()
    encoder(images)
    for m in norms:
        m.momentum = 0.1
    encoder.train(False)


def train_epoch(module: CaptionModule, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """One epoch of teacher-forced training; seconds spent waiting for data, in the encoder and in
    decoder + backward + AdamW, with the images and captions seen."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=module.hparams.lr)
    module.train()
    out = dict(data=0.0, encoder=0.0, step=0.0, images=0, captions=0, steps=0)
    _sync(device)
    start = time.perf_counter()
    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        inputs, tokens, _ = batch  # images (B,3,H,W) or cached features (B,N,C); tokens (B,M,L)
        inputs, tokens = inputs.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        t1 = time.perf_counter()
        # module.loss(inputs, tokens) does exactly this in one call; split here only to time the encoder
        feats = module.features(inputs)  # (B,3,H,W) -> (B,N,C) without autograd; cached (B,N,C) as they are
        _sync(device)
        t2 = time.perf_counter()
        loss, _ = module.loss(feats, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        out["data"] += t1 - t0
        out["encoder"] += t2 - t1
        out["step"] += t3 - t2
        out["images"] += inputs.size(0)
        out["captions"] += int((tokens[..., 0] != Vocabulary.pad_id).sum())  # (B,M): captions that exist
        out["steps"] += 1
    out["epoch"] = time.perf_counter() - start
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts for the loading pipeline")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--encoder", default="resnet50", help="resnet18 ... resnet152 or small_cnn")
    p.add_argument("--encoder-weights", default=None, help="a state-dict file or torchvision weights name")
    p.add_argument(
        "--grid",
        type=int,
        default=None,
        help="pool a ResNet's grid to grid x grid (default: native; small_cnn refuses it)",
    )
    p.add_argument("--hidden", type=int, default=512, help="LSTM embed = hidden = attention width")
    p.add_argument("--vocab", type=int, default=10000, help="words (COCO Karpathy: ~9.5k at min count 5)")
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--epoch-workers", type=int, default=0, help="loader workers in the training epochs")
    p.add_argument("--cache-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="folder for the data and the cache (default: a temporary one)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():  # before part 1, not a driver traceback after it
        p.error("--device cuda needs a CUDA GPU, and torch finds none here")
    if args.encoder == "small_cnn" and args.grid:  # refused by the model too, but only after part 1 had run
        p.error("--grid pools a ResNet's output; small_cnn has no pooling")
    sys.stdout.reconfigure(line_buffering=True)  # progress of a long run shows as it happens
    device = torch.device(args.device)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="data_throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work, device, workers)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, device: torch.device, workers: list[int]) -> None:
    when = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"data throughput, {when}, device={device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"arguments: {vars(args)}")
    # the machine may be shared: the load average says how much of it this run had
    print("load average (1, 5, 15 min) at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    t0 = time.perf_counter()
    json_path = make_dataset(work, args.images, args.vocab, args.seed)
    records = read_karpathy_json(json_path)
    kb = np.mean([r.image_path.stat().st_size for r in records]) / 1e3
    print(f"data: {len(records)} JPEGs (500x375 and 375x500, q90, mean {kb:.0f} KB) x 5 captions under {work} "
          f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    vocab = Vocabulary([*SPECIALS, *(_word(i) for i in range(args.vocab))])
    transform = EvalTransform(args.image_size)
    from_images = TrainCaptions(records, vocab, transform, MAX_CAPTION_LEN, 0, args.captions_per_image)

    # -- part 1: the loading pipeline ------------------------------------------------------------
    load_ms, tfm_ms = per_image_costs(records, transform)
    size, batch = args.image_size, args.batch_size
    print(f"\n1. loading pipeline: load_image + EvalTransform({size}) + collate_train, batch {batch}")
    print(f"   per image, one process: load_image {load_ms:.1f} ms (JPEG decode), EvalTransform {tfm_ms:.1f} ms")
    print(f"{'workers':>10} {'images/s':>10}")
    for w in workers:
        print(f"{w:>10} {loading_rate(from_images, args.batch_size, w):>10.1f}")

    # -- part 2: a frozen-encoder training epoch -------------------------------------------------
    module = CaptionModule(
        vocab=vocab.tokens,
        encoder=args.encoder,
        encoder_grid=args.grid,
        freeze_encoder=True,
        decoder="lstm",
        embed_dim=args.hidden,
        hidden_dim=args.hidden,
        attention_dim=args.hidden,
        image_size=args.image_size,
    ).to(device)
    encoder = module.net.encoder
    if args.encoder_weights:
        load_encoder_weights(encoder, args.encoder_weights)
        weights = args.encoder_weights
    else:
        first = torch.stack([from_images[(i, 0)][0] for i in range(min(args.batch_size, len(records)))])
        calibrate_batchnorm(encoder, first.to(device))  # (B,3,H,W)
        weights = "random weights, BatchNorm statistics from one batch"
    initial = copy.deepcopy(module.state_dict())  # both epochs start from the same weights
    gh, gw = module.grid
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    print(
        f"\n2. frozen-encoder epoch: {args.encoder} ({weights}) at {args.image_size}x{args.image_size} -> "
        f"grid {gh}x{gw} (N={gh * gw}, C={encoder.out_dim}); LSTM decoder E=H=A={args.hidden}, V={len(vocab)}, "
        f"{trainable / 1e6:.1f}M trainable; {args.captions_per_image} captions/image, batch {args.batch_size}, "
        f"AdamW, loader workers {args.epoch_workers}"
    )
    paths = [r.image_path for r in records]
    _sync(device)
    t0 = time.perf_counter()
    cache = FeatureCache(work / "cache", "bench-train", paths, encoder, transform, args.cache_dtype)
    for f in (cache.file, cache.meta_file):  # a cache left in --work by an earlier run: build it again
        f.unlink(missing_ok=True)
    cache.build(encoder, device, args.batch_size, args.epoch_workers, progress=False)
    _sync(device)
    build_s = time.perf_counter() - t0
    mb = cache.file.stat().st_size / 2**20

    print(f"cache build (one-off): {build_s:.1f} s for {len(paths)} images ({len(paths) / build_s:.1f} images/s), "
          f"{mb:.0f} MiB on disk ({args.cache_dtype})")  # fmt: skip

    pin = device.type == "cuda"
    from_cache = TrainCaptions(records, vocab, transform, MAX_CAPTION_LEN, 0, args.captions_per_image, cache)
    print(
        f"{'epoch':<22} {'steps':>5} {'epoch s':>8} {'images/s':>9} {'captions/s':>11} "
        f"{'data s':>7} {'encoder s':>10} {'decoder+step s':>15}"
    )
    runs = {}
    for name, ds in (("from images", from_images), (f"from cache ({args.cache_dtype})", from_cache)):
        # warm-up: one step on one batch (allocator, kernels), then back to the same initial weights
        module.train()
        warm = next(iter(_loader(ds, EpochSampler(len(ds), 0), args.batch_size, 0, pin)))
        loss, _ = module.loss(warm[0].to(device), warm[1].to(device))
        loss.backward()
        module.zero_grad(set_to_none=True)
        module.load_state_dict(initial)
        loader = _loader(ds, EpochSampler(len(ds), seed=0), args.batch_size, args.epoch_workers, pin)
        r = runs[name] = train_epoch(module, loader, device)
        del loader
        print(
            f"{name:<22} {r['steps']:>5} {r['epoch']:>8.1f} {r['images'] / r['epoch']:>9.1f} "
            f"{r['captions'] / r['epoch']:>11.1f} {r['data']:>7.1f} {r['encoder']:>10.1f} {r['step']:>15.1f}"
        )
    slow, fast = (r["epoch"] for r in runs.values())
    saved = slow - fast
    payback = f"pays back after {build_s / saved:.1f} epochs" if saved > 0 else "never pays back"
    print(f"speed-up with the cache: {slow / fast:.1f}x")
    print(f"the cache build ({build_s:.1f} s) {payback}")
    print("load average (1, 5, 15 min) at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
