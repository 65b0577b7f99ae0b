"""Where do an encoder's grid cells look? Each cell's gradient centroid against its centre and a tile's middle.

For each grid cell, the centroid of |d cell features / d pixel| (summed over channels and a batch of noise
images: the cell's effective receptive field) is compared with where overlays and grounding metrics put the cell
(``Encoder.cell_centres``) and with the middle of the tile it would cover if the cells tiled the image (what
drawing a map by plain upsampling assumes). Prints, per grid row and column, the measured y (mean over the
row's cells) and x (over the column's), the centre and the tile's middle, then the mean distance (pixels, both
axes) for cells away from the border and for border cells, where the image edge cuts the receptive field and
pulls its centroid inwards.

    python benchmarks/cell_centres.py runs/shapes/version_0/checkpoints/best.ckpt [more.ckpt ...]
    python benchmarks/cell_centres.py --encoder resnet18 --image-size 256 [--weights resnet18.pth]
"""

from __future__ import annotations

import argparse

import checkout  # noqa: F401  (this checkout's captioning, first on the path)
import torch


def centroids(encoder: torch.nn.Module, size: int, images: int, seed: int) -> torch.Tensor:
    """(h, w, 2): each cell's gradient centroid (y, x) in pixels (continuous: pixel j spans [j, j + 1))."""
    torch.manual_seed(seed)
    x = torch.randn(images, 3, size, size, requires_grad=True)
    out = encoder(x)
    (gh, gw), features = out.grid, out.features  # (B,N,C)
    at = torch.arange(size, dtype=torch.float64) + 0.5
    result = torch.zeros(gh, gw, 2, dtype=torch.float64)
    for cell in range(gh * gw):
        (grad,) = torch.autograd.grad(features[:, cell].pow(2).sum(), x, retain_graph=True)
        weight = grad.abs().double().sum((0, 1))  # (H,W)
        weight = weight / weight.sum()
        result[cell // gw, cell % gw] = torch.stack([weight.sum(1) @ at, weight.sum(0) @ at])
    return result


def report(name: str, encoder: torch.nn.Module, size: int, images: int, seed: int) -> None:
    from captioning.models.base import CellCentres

    encoder = encoder.float().eval().requires_grad_(False)
    measured = centroids(encoder, size, images, seed)  # (h,w,2)
    gh, gw = measured.shape[:2]
    placed = {"centres": encoder.cell_centres(size, size), "tiles": CellCentres.tiling((gh, gw))}
    print(f"\n{name}: {size} px, {gh}x{gw} grid, {images} noise images")
    for axis, label, n in ((0, "row", gh), (1, "column", gw)):
        at = {k: [v * size for v in c[axis]] for k, c in placed.items()}
        print(f"{label:>8} {'measured ' + 'yx'[axis]:>11} {'centre':>8} {'tile':>8}")
        for i in range(n):
            mean = float(measured.select(axis, i)[:, axis].mean())  # over the other axis's cells
            print(f"{i:>8} {mean:>11.1f} {at['centres'][i]:>8.1f} {at['tiles'][i]:>8.1f}")
    border = torch.zeros(gh, gw, dtype=torch.bool)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    print(f"{'placed at':>10} {'inner cells':>12} {'border cells':>13}   (mean |measured - placed|, px, y and x)")
    for key, c in placed.items():
        want = torch.stack(
            torch.meshgrid(torch.tensor(c.ys) * size, torch.tensor(c.xs) * size, indexing="ij"), -1
        ).double()  # (h,w,2)
        err = (measured - want).abs().mean(-1)  # (h,w)
        inner = f"{float(err[~border].mean()):.2f}" if (~border).any() else "-"
        print(f"{key:>10} {inner:>12} {float(err[border].mean()):>13.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*", help="captioning checkpoints: their trained encoders")
    parser.add_argument("--encoder", help="a torchvision ResNet name or small_cnn, instead of a checkpoint's")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--grid", type=int, default=None, help="adaptive pooling to this grid (ResNets)")
    parser.add_argument("--weights", help="pretrained weights (a file or a torchvision name) for --encoder")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.checkpoints and not args.encoder:
        parser.error("give checkpoints or --encoder")
    print(checkout.describe())
    from captioning.inference import Captioner
    from captioning.models.encoders import build_encoder, load_encoder_weights

    for path in args.checkpoints:
        captioner = Captioner.from_checkpoint(path)
        report(path, captioner.net.encoder, captioner.transform.size, args.images, args.seed)
    if args.encoder:
        torch.manual_seed(args.seed)  # the random weights too: the same numbers on every run
        encoder = build_encoder(args.encoder, grid=args.grid)
        if args.weights:
            load_encoder_weights(encoder, args.weights)
        report(f"{args.encoder} ({args.weights or 'random weights'})", encoder, args.image_size, args.images, args.seed)


if __name__ == "__main__":
    main()
