"""Image preprocessing presets, defined only by (size, mean, std) so a checkpoint can carry them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EvalTransform:
    """Resize to ``size`` x ``size`` (aspect not kept: the grid must cover the whole image), normalise.

    There is deliberately no random flip in training either: it would swap "left" and "right".
    """

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.size, self.mean, self.std = int(size), list(mean), list(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BICUBIC)
        x = F.pil_to_tensor(img).float().div_(255.0)  # (3,H,W)
        return F.normalize(x, self.mean, self.std)
