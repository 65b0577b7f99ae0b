"""LightningDataModule: reads (or generates) the records, builds the vocabulary, serves batches.

Training items are (image, one of its captions drawn at random each epoch); evaluation items
are images alone, their references are looked up by index in :meth:`CaptionDataModule.records`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from captioning.data.images import load_image
from captioning.data.records import CaptionRecord
from captioning.data.sources import read_karpathy_json
from captioning.data.synthetic import JSON_NAME, ShapesConfig, generate
from captioning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from captioning.vocab import Vocabulary


class EpochSampler(Sampler):
    """Shuffles the training images with a generator seeded by (seed, epoch) and yields
    ``(index, epoch)`` pairs.

    Any epoch's order can be recomputed, so a run resumed mid-epoch continues exactly where it
    stopped (``start`` skips the batches already trained on), and nothing here draws from the
    global RNG, so data loading never shifts the random numbers dropout sees. Lightning calls
    ``set_epoch`` before each epoch.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0
        self.resume: tuple[int, int] | None = None  # (epoch, items already trained on)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.resume is not None and self.resume[0] == epoch:
            self.start, self.resume = self.resume[1], None

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        start, self.start = self.start, 0
        return iter([(i, self.epoch) for i in order[start:]])

    def __len__(self) -> int:
        return self.size


class TrainCaptions(Dataset):
    """One item per (image, epoch): (image (3,H,W), token ids (L,)), the caption drawn with a
    generator seeded by (seed, epoch, image), so the draw is the same whichever worker loads it."""

    def __init__(
        self, records: list[CaptionRecord], vocab: Vocabulary, transform: EvalTransform, max_len: int, seed: int = 0
    ):
        self.records, self.transform, self.seed = records, transform, seed
        self.encoded = [[vocab.encode(t, max_len) for t in r.tokens] for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, epoch = item
        caps = self.encoded[i]
        ids = caps[random.Random(f"{self.seed}/{epoch}/{i}").randrange(len(caps))]
        return self.transform(load_image(self.records[i].image_path)), torch.tensor(ids)


class EvalImages(Dataset):
    """One item per image: (image (3,H,W), record index)."""

    def __init__(self, records: list[CaptionRecord], transform: EvalTransform):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.records[i].image_path)), i


def collate_train(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images (B,3,H,W) and right-pad token ids with <pad>=0 to (B,L)."""
    images = torch.stack([b[0] for b in batch])
    tokens = torch.nn.utils.rnn.pad_sequence([b[1] for b in batch], batch_first=True, padding_value=0)
    return images, tokens


class CaptionDataModule(pl.LightningDataModule):
    """Data for training and evaluation.

    Args:
        dataset: ``"shapes"`` (generated under ``data_dir`` on first use) or ``"karpathy"``
            (read ``karpathy_json``, images under ``image_root``).
        data_dir: folder of the shapes set.
        karpathy_json: path of a Karpathy-format JSON (``dataset="karpathy"``).
        image_root: folder the JSON's ``filepath/filename`` are relative to (default: the JSON's folder).
        image_size: images are resized to ``image_size`` x ``image_size``.
        mean, std: normalisation.
        batch_size: training images per batch; eval_batch_size for validation/test.
        num_workers: data-loader worker processes.
        min_word_freq: words rarer than this in the training captions become ``<unk>``.
        max_caption_len: training captions are cut to this many words.
        num_train, num_val, num_test, shapes_seed: size and seed of the generated shapes set.
    """

    def __init__(
        self,
        dataset: str = "shapes",
        data_dir: str = "data/shapes",
        karpathy_json: str | None = None,
        image_root: str | None = None,
        image_size: int = 64,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        min_word_freq: int = 1,
        max_caption_len: int = 24,
        num_train: int = 4000,
        num_val: int = 500,
        num_test: int = 500,
        shapes_seed: int = 0,
    ):
        super().__init__()
        if dataset not in ("shapes", "karpathy"):
            raise ValueError(f"data.dataset must be 'shapes' or 'karpathy', got {dataset!r}")
        if dataset == "karpathy" and not karpathy_json:
            raise ValueError("data.dataset='karpathy' needs data.karpathy_json")
        self.dataset, self.data_dir = dataset, data_dir
        self.karpathy_json, self.image_root = karpathy_json, image_root
        self.image_size, self.mean, self.std = image_size, list(mean), list(std)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.min_word_freq, self.max_caption_len = min_word_freq, max_caption_len
        self.shapes_config = ShapesConfig(num_train, num_val, num_test, image_size, shapes_seed)
        self._records: dict[str, list[CaptionRecord]] | None = None
        self._vocab: Vocabulary | None = None
        self.train_sampler: EpochSampler | None = None
        self._resume: tuple[int, int] | None = None

    # -- records and vocabulary (built once, on first use) ----------------------------------

    def _load(self) -> dict[str, list[CaptionRecord]]:
        if self._records is None:
            if self.dataset == "shapes":
                json_path = generate(self.data_dir, self.shapes_config)
                records = read_karpathy_json(json_path)
            else:
                records = read_karpathy_json(self.karpathy_json, self.image_root)
            split: dict[str, list[CaptionRecord]] = {"train": [], "val": [], "test": []}
            for r in records:
                split.setdefault(r.split, []).append(r)
            if not split["train"]:
                src = Path(self.data_dir) / JSON_NAME if self.dataset == "shapes" else self.karpathy_json
                raise ValueError(f"{src}: no images in the 'train' split")
            self._records = split
        return self._records

    def records(self, split: str) -> list[CaptionRecord]:
        """Records of ``split`` ("train", "val" or "test"), in loader order."""
        return self._load()[split]

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Start the training data of ``epoch`` after its first ``batches_done`` batches."""
        self._resume = (epoch, batches_done * self.batch_size)
        if self.train_sampler is not None:
            self.train_sampler.resume = self._resume

    @property
    def vocab(self) -> Vocabulary:
        """Vocabulary of the training captions."""
        if self._vocab is None:
            self._vocab = Vocabulary.build((t for r in self.records("train") for t in r.tokens), self.min_word_freq)
        return self._vocab

    @property
    def vocab_tokens(self) -> list[str]:
        """The vocabulary as the plain token list the model stores in its checkpoint."""
        return list(self.vocab.tokens)

    # -- loaders ----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        self._load()

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None = None, collate=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
            drop_last=False,
        )

    def transform(self) -> EvalTransform:
        return EvalTransform(self.image_size, self.mean, self.std)

    def train_dataloader(self) -> DataLoader:
        seed = torch.initial_seed()  # the run's seed (seed_everything), not a fresh draw
        ds = TrainCaptions(self.records("train"), self.vocab, self.transform(), self.max_caption_len, seed)
        if self.train_sampler is None:
            self.train_sampler = EpochSampler(len(ds), seed)
            self.train_sampler.resume = self._resume
        return self._loader(ds, self.batch_size, self.train_sampler, collate_train)

    def val_dataloader(self) -> DataLoader:
        return self._loader(EvalImages(self.records("val"), self.transform()), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(EvalImages(self.records("test"), self.transform()), self.eval_batch_size)
