"""Test helper callback: append one JSON line per training batch to ``path``: the epoch and a short hash of each
image (or cached feature row) in the batch, to tell which items an epoch trained on."""

import hashlib
import json
from pathlib import Path

from pytorch_lightning import Callback


class RecordImages(Callback):
    def __init__(self, path: str = "images.jsonl"):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        images = batch[0].cpu()
        hashes = [hashlib.md5(images[i].numpy().tobytes()).hexdigest()[:12] for i in range(images.size(0))]
        with self.path.open("a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "images": hashes}) + "\n")
