"""Caption images and write per-word attention overlays.

    python infer.py image.jpg [more.jpg ...] [--ckpt path] [--beam-size K] [--out dir]

Without --ckpt the best checkpoint of the newest `python train.py` run (under runs/) is used.
Prints "<path>: <caption>" per image and writes <stem>_attention.png into --out (default: the
current directory). A file that cannot be read is reported with its cause on stderr; the other
images are still captioned, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Caption images and write attention overlays.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--ckpt", help="checkpoint (default: newest best checkpoint under --runs)")
    parser.add_argument("--runs", default="runs", help="where `python train.py` writes runs")
    parser.add_argument("--beam-size", type=int, default=None, help="beam width (default: the checkpoint's)")
    parser.add_argument("--out", default=".", help="folder for the <stem>_attention.png overlays")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--max-pixels", type=int, default=None, help="refuse larger images before decoding them")
    args = parser.parse_args(argv)

    from captioning.data.images import MAX_PIXELS, ImageLoadError, load_image
    from captioning.inference import Captioner, CheckpointError, find_latest_checkpoint
    from captioning.visualize import attention_figure

    try:
        ckpt = Path(args.ckpt) if args.ckpt else find_latest_checkpoint(args.runs)
        captioner = Captioner.from_checkpoint(ckpt, device=args.device, beam_size=args.beam_size)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for name in args.images:
        if "://" in name:
            print(f"error: {name}: URLs are not fetched; download the image and pass its path", file=sys.stderr)
            failures += 1
            continue
        try:
            image = load_image(name, max_pixels=args.max_pixels or MAX_PIXELS)
        except ImageLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        cap = captioner.caption(image)
        target = out_dir / f"{Path(name).stem}_attention.png"
        attention_figure(image, cap.tokens, cap.attention).save(target)
        print(f"{name}: {cap.text}")
        print(f"  attention overlay: {target}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
