"""Caption images and write per-word attention overlays.

    python infer.py image.jpg [more.jpg ...] [--ckpt path] [--beam-size K] [--length-penalty A] [--out dir]
        [--batch-size 16] [--device auto] [--max-pixels N] [--runs runs]

Without --ckpt the best checkpoint of the newest `python train.py` run (under runs/) is used.
Images are captioned --batch-size at a time in one batched beam search (the same captions as one
at a time, faster). Prints "<path>: <caption>" per image, in the order given, and writes
<stem>_attention.png into --out (default: the current directory); when two inputs share a stem
(a/img.png, b/img.png) the later ones get img-2_attention.png, img-3_attention.png ... so no
overlay of this run overwrites another, nor one of the input images (x.png's overlay becomes
x-2_attention.png when x_attention.png is itself an input). A file that cannot be read, or an overlay that cannot
be written, is reported with its cause on stderr; the other images are still captioned, and the exit status is 1.
An --out folder that cannot be made or written to is refused before any image is read (exit status 2), and so
is an --out that looks like an image file name (overlay.png) unless a folder of that name exists.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from captioning.options import LENGTH_PENALTY_RANGE, length_penalty_ok

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image


#: an --out ending so is taken for a mistyped file name, unless a folder of that name is there
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Caption images and write attention overlays.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument(
        "--ckpt",
        help="checkpoint (default: the best checkpoint of the newest run under --runs; an error where that run has "
        "none, naming its last.ckpt)",
    )
    parser.add_argument(
        "--runs", default="runs", help="where `python train.py` writes runs (default: runs, in this folder)"
    )
    parser.add_argument("--beam-size", type=int, default=None, help="beam width (default: the checkpoint's)")
    parser.add_argument(
        "--length-penalty", type=float, default=None, help="GNMT length penalty alpha (default: the checkpoint's)"
    )
    parser.add_argument(
        "--out", default=".", help="folder for the <stem>_attention.png overlays (default: this folder)"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one, else cpu), cpu, cuda:1 ...")
    parser.add_argument("--batch-size", type=int, default=16, help="images captioned together in one search")
    parser.add_argument("--max-pixels", type=int, default=None, help="refuse larger images before decoding them")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.beam_size is not None and args.beam_size < 1:
        parser.error(f"--beam-size must be at least 1, got {args.beam_size}")
    # checked here, before the checkpoint loads: nan, inf and 1e308 ended the search in a traceback
    if args.length_penalty is not None and not length_penalty_ok(args.length_penalty):
        parser.error(f"--length-penalty must be {LENGTH_PENALTY_RANGE}, got {args.length_penalty}")
    # 0 meant the default limit, unsaid, and a negative one refused every image as too large
    if args.max_pixels is not None and args.max_pixels < 1:
        parser.error(f"--max-pixels must be at least 1, got {args.max_pixels}")
    out_dir = Path(args.out)
    # `--out overlay.png` made a folder of that name
    if out_dir.suffix.lower() in IMAGE_SUFFIXES and not out_dir.is_dir():
        parser.error(
            f"--out {args.out}: names an image file, but --out is the folder the overlays (<stem>_attention.png) "
            "are written into; give a folder, e.g. --out overlays"
        )

    import torch

    from captioning.data.images import MAX_PIXELS, ImageLoadError, load_image
    from captioning.inference import Captioner, CheckpointError, find_latest_checkpoint
    from captioning.visualize import attention_figure

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        device = torch.device(device)
    except RuntimeError:
        print(f"error: --device {args.device}: not a device (auto, cpu, cuda, cuda:1 ...)", file=sys.stderr)
        return 2
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        found = f"{torch.cuda.device_count()} CUDA devices" if torch.cuda.is_available() else "no CUDA device"
        print(f"error: --device {args.device}: {found} here; use --device cpu or auto", file=sys.stderr)
        return 2
    problem = unusable_device(device)
    if problem:
        print(f"error: --device {args.device}: {problem}; available here: {available_devices()}", file=sys.stderr)
        return 2
    try:
        ckpt = Path(args.ckpt) if args.ckpt else find_latest_checkpoint(args.runs)
        if not args.ckpt:  # say which model captions: the newest run may not be the one the user means
            print(f"checkpoint: {ckpt}", file=sys.stderr)
        captioner = Captioner.from_checkpoint(
            ckpt, device=device, beam_size=args.beam_size, length_penalty=args.length_penalty
        )
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, no permission, a read-only place ...
        print(f"error: --out {out_dir}: cannot make that folder ({e.strerror or e})", file=sys.stderr)
        return 2
    try:  # a folder that exists but takes no files would otherwise fail at the first overlay, with a traceback
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        print(f"error: --out {out_dir}: cannot write there ({e.strerror or e})", file=sys.stderr)
        return 2
    overlays: set[Path] = set()  # written by this run: a shared stem must not overwrite one of them
    # files not to write over, by device and inode: the input files themselves (`infer.py x.png x_attention.png`
    # must not write x.png's overlay over the input x_attention.png) and, once written, this run's overlays;
    # by inode, not path, so that no other spelling of the path reaches them either: a link, or other letter
    # case on a case-insensitive file system (the macOS default), where a/IMG.png's overlay was written over
    # b/img.png's
    keep = {(st.st_dev, st.st_ino) for st in map(_stat, args.images) if st is not None}

    def overlay_path(name: str) -> Path:
        stem, n = Path(name).stem, 1
        target = out_dir / f"{stem}_attention.png"
        while target in overlays or (st := _stat(target)) is not None and (st.st_dev, st.st_ino) in keep:
            n += 1
            target = out_dir / f"{stem}-{n}_attention.png"
        overlays.add(target)
        return target

    batch: list[tuple[str, Image]] = []  # (name, image) waiting for the next batched search

    def caption_batch() -> int:
        """Caption and draw the waiting images; returns how many overlays could not be written."""
        unwritten = 0
        captions = captioner.caption_batch([image for _, image in batch], batch_size=args.batch_size)
        for (name, image), cap in zip(batch, captions):
            print(f"{name}: {cap.text}", flush=True)
            target = overlay_path(name)
            try:
                attention_figure(image, cap.tokens, cap.attention, centres=cap.centres).save(target)
            except OSError as e:  # a folder in the overlay's place, a full disk ...: the caption still counts
                print(f"error: {target}: cannot write the attention overlay ({e.strerror or e})", file=sys.stderr)
                unwritten += 1
                continue
            except ValueError as e:  # maps that are not weights (a NaN from a broken model): the next image goes on
                print(f"error: {name}: cannot draw the attention overlay ({e})", file=sys.stderr)
                unwritten += 1
                continue
            if (st := _stat(target)) is not None:
                keep.add((st.st_dev, st.st_ino))
            print(f"  attention overlay: {target}", file=sys.stderr)
        batch.clear()
        return unwritten

    failures = 0
    for name in args.images:
        if "://" in name:
            print(f"error: {name}: URLs are not fetched; download the image and pass its path", file=sys.stderr)
            failures += 1
            continue
        try:
            image = load_image(name, max_pixels=MAX_PIXELS if args.max_pixels is None else args.max_pixels)
        except ImageLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        batch.append((name, image))
        if len(batch) == args.batch_size:
            failures += caption_batch()
    if batch:
        failures += caption_batch()
    return 1 if failures else 0


def _stat(path: str | Path) -> os.stat_result | None:
    """``os.stat`` of an existing file, None for anything else (missing, a URL, unreadable)."""
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def unusable_device(device: torch.device) -> str | None:
    """Why ``device`` (a valid name) cannot caption on this machine, or None when it can; CUDA is
    checked by the caller."""
    import torch

    if device.type in ("cpu", "cuda"):
        return None
    if device.type == "meta":
        return "the meta device holds tensor shapes, not data, so it cannot compute a caption"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "no MPS (Apple GPU) device here"
    try:  # any other backend (xpu, hpu ...): one tiny op shows whether it is built in and present
        torch.zeros(1, device=device).add_(1).cpu()
    except Exception as e:  # the backend's own error, whatever its type: shown, not raised
        return f"not usable here ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
    return None


def available_devices() -> str:
    """The devices this machine can caption on, for error messages: ``cpu, cuda:0, cuda:1``."""
    import torch

    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    if torch.backends.mps.is_available():
        found.append("mps")
    return ", ".join(found)


def _print_any_file_name() -> None:
    """Make stdout print any file name. One that is not valid UTF-8 (an old archive's Latin-1 "caf\xe9.png") comes
    from the file system as surrogates; on a strict stdout (an en_US.UTF-8 locale, PYTHONIOENCODING) its caption's
    print raised and the rest of the batch got no caption and no overlay. A UTF-8 stdout then writes the name's
    own bytes, as Python's UTF-8 mode and the C locale already do; another encoding writes it escaped."""
    out = sys.stdout  # None when the process was started with stdout closed; print() then writes nothing
    if getattr(out, "errors", None) == "strict" and hasattr(out, "reconfigure"):
        utf8 = codecs.lookup(out.encoding).name in ("utf-8", "utf-8-sig")
        out.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")


def _run() -> int:
    """:func:`main`, stopping quietly when the reader of stdout goes away (``infer.py *.jpg | head -1``), as a Unix
    tool stopped by SIGPIPE does: the next caption's print raised BrokenPipeError, a traceback on stderr."""
    try:
        code = main()
        if sys.stdout is not None:
            sys.stdout.flush()  # here, not in the interpreter's flush at exit, which would report the same error
        return code
    except BrokenPipeError:
        # the interpreter flushes stdout once more as it exits: pointed at /dev/null, that flush has nowhere to fail
        if sys.stdout is not None:  # None: started with stdout closed (the broken pipe was stderr)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    _print_any_file_name()
    sys.exit(_run())
