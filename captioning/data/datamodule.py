"""LightningDataModule: reads (or generates) the records, leaves bad data out, builds the
vocabulary, serves batches.

Training batches are grouped: (images (B,3,H,W) or cached features (B,N,C), tokens (B,M,L)),
each image with M of its captions, so the encoder runs once per image. Evaluation items are
images alone; their references are looked up by index in :meth:`CaptionDataModule.records`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from captioning.data.cleaning import DataReport, check_train_split, clean_records
from captioning.data.features import CACHE_DTYPES, FeatureCache
from captioning.data.images import MAX_PIXELS, ImageLoadError, load_image
from captioning.data.records import CaptionRecord
from captioning.data.sources import read_karpathy_json, read_records
from captioning.data.synthetic import JSON_NAME, MIN_SHAPES_SIZE, ShapesConfig, generate
from captioning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from captioning.errors import InputError, InputFileNotFoundError
from captioning.options import check_ranges
from captioning.vocab import SPECIALS, Vocabulary

#: the readers and what each one's ``annotations`` file is
DATASETS = {
    "shapes": "generated",
    "karpathy": "a Karpathy JSON such as dataset_coco.json",
    "flickr8k": "Flickr8k.token.txt",
    "captions": "a .jsonl or .csv captions file",
}


class EpochSampler(DistributedSampler):
    """Shuffles the training images with a generator seeded by (seed, epoch) and yields
    ``(index, epoch)`` pairs; under DDP it yields this rank's shard of that order.

    Any epoch's order can be recomputed, so a run resumed mid-epoch continues exactly where it
    stopped (``start`` skips the items already trained on), and nothing here draws from the
    global RNG, so data loading never shifts the random numbers dropout sees. Lightning calls
    ``set_epoch`` before each epoch.

    Sharding: the order is padded (by repeating it from its start) to a multiple of the number of
    ranks and rank r takes items r, r+R, r+2R... So batch j of the R ranks together holds exactly
    the items of batch j of one process with an R times larger batch: DDP trains on the same
    batches as one process. It is a ``DistributedSampler`` so that Lightning uses it as it is
    instead of wrapping it.
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        # no super().__init__: it would ask the process group; these are the fields Lightning reads
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0
        self.num_replicas, self.rank, self.shuffle, self.drop_last = num_replicas, rank, True, False
        self.num_samples = math.ceil(size / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def resume_at(self, epoch: int, start: int) -> None:
        """Continue at ``epoch`` after this rank's first ``start`` items. Taken now, not at ``set_epoch``: a loader
        with workers draws its first items as its iterator is made, and Lightning makes a resumed run's iterator
        before it calls ``set_epoch`` (and keeps it), so that epoch was drawn from epoch 0's start, and the skip
        fell on the next epoch."""
        if start >= self.num_samples:  # written at the epoch's end: the next epoch, from its start
            epoch, start = epoch + 1, 0
        self.epoch, self.start = epoch, start

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a resumed position holds for its own epoch only
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The items of ``epoch`` in training order, padded to a multiple of the ranks (``total_size``): rank r
        takes positions r, r+R, r+2R..., so its batch j is positions [j*b*R, (j+1)*b*R) of every rank's."""
        # modulo 2**63: an unseeded process has a random 64-bit seed, which the product would overflow
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        return self.padded(torch.randperm(self.size, generator=g).tolist())

    def padded(self, order: list[int]) -> list[int]:
        """``order`` padded to ``total_size`` as torch's DistributedSampler pads, repeating it as often as needed:
        with fewer images than half the ranks, one repeat of its first items left some ranks short of the len()
        they promised."""
        return (order * math.ceil(self.total_size / self.size))[: self.total_size] if order else order

    def __iter__(self):
        shard = self.order(self.epoch)[self.rank :: self.num_replicas]
        start, self.start = self.start, 0
        return iter([(i, self.epoch) for i in shard[start:]])

    def __len__(self) -> int:
        return self.num_samples


def _draw(n_captions: int, m: int, rng: random.Random) -> list[int]:
    """Which of an image's captions go into its group: one drawn at random (m = 1), m drawn without
    replacement, or all of them (m = 0, or fewer than m available)."""
    if m == 1:
        return [rng.randrange(n_captions)]
    if m <= 0 or m >= n_captions:
        return list(range(n_captions))
    return rng.sample(range(n_captions), m)


class TrainCaptions(Dataset):
    """One item per (image, epoch): (image (3,H,W) or cached features (N,C), its caption group as a
    list of token-id tensors), or None when the image cannot be loaded (the collate drops it).

    The captions are drawn with a generator seeded by (seed, epoch, image), so the draw is the same
    whichever worker loads the item. A group holds ``captions_per_image`` captions, so the encoder
    runs once per image, not once per caption.
    """

    def __init__(
        self,
        records: list[CaptionRecord],
        vocab: Vocabulary,
        transform: EvalTransform,
        max_len: int,
        seed: int = 0,
        captions_per_image: int = 1,
        features: FeatureCache | None = None,
        max_pixels: int = MAX_PIXELS,
    ):
        self.records, self.transform, self.seed = records, transform, seed
        self.captions_per_image, self.features, self.max_pixels = captions_per_image, features, max_pixels
        self.encoded = [[vocab.encode(t, max_len) for t in r.tokens] for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def _chosen(self, i: int, epoch: int) -> list[list[int]]:
        """The encoded captions of image ``i`` in its group of ``epoch``."""
        caps = self.encoded[i]
        return [caps[j] for j in _draw(len(caps), self.captions_per_image, random.Random(f"{self.seed}/{epoch}/{i}"))]

    def counts(self, i: int, epoch: int) -> tuple[int, int]:
        """(target words, captions) that item ``i`` gives in ``epoch``, as the loss counts them (each caption's
        words and its <end>), without loading it: 0 for an image the feature cache could not encode."""
        if self.features is not None and not self.features.open()[1][i]:
            return 0, 0
        chosen = self._chosen(i, epoch)
        return sum(len(c) - 1 for c in chosen), len(chosen)

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        # an index alone comes from the SequentialSampler Lightning puts in for --trainer.overfit_batches: the
        # draw of epoch 0 then, the same captions every epoch, which is what overfitting a few batches wants
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        tokens = [torch.tensor(c) for c in self._chosen(i, epoch)]
        if self.features is not None:
            feats, valid = self.features.open()
            return (torch.from_numpy(np.array(feats[i])), tokens) if valid[i] else None  # (N,C)
        return _load_or_none(self.records[i].image_path, self.transform, tokens, self.max_pixels)


def _load_or_none(path: Path, transform: EvalTransform, payload, max_pixels: int = MAX_PIXELS):
    """(image tensor, payload), or None after a warning when the image cannot be loaded: one bad
    file never stops a run (every DDP rank still gets its batch, one image shorter)."""
    try:
        return transform(load_image(path, max_pixels)), payload
    except ImageLoadError as e:
        warnings.warn(f"skipping image: {e}", stacklevel=2)
        return None


class EvalImages(Dataset):
    """One item per image: (image (3,H,W), record index), or None when it cannot be loaded."""

    def __init__(self, records: list[CaptionRecord], transform: EvalTransform, max_pixels: int = MAX_PIXELS):
        self.records, self.transform, self.max_pixels = records, transform, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        return _load_or_none(self.records[i].image_path, self.transform, i, self.max_pixels)


def collate_train(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Drop unloadable items; stack inputs (B,3,H,W) or features (B,N,C); pad the caption groups to
    tokens (B,M,L) with <pad> = 0 (a missing caption is an all-<pad> row, which the loss ignores).
    Returns (inputs, tokens, number of items dropped)."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, 1, 1, dtype=torch.long), len(batch)
    inputs = torch.stack([b[0] for b in kept])
    m = max(len(b[1]) for b in kept)
    length = max(len(t) for b in kept for t in b[1])
    tokens = torch.zeros(len(kept), m, length, dtype=torch.long)  # (B,M,L)
    for i, (_, caps) in enumerate(kept):
        for j, t in enumerate(caps):
            tokens[i, j, : len(t)] = t
    return inputs, tokens, len(batch) - len(kept)


def collate_eval(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop unloadable items; images (B,3,H,W) and their record indices (B,)."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.stack([b[0] for b in kept]), torch.tensor([b[1] for b in kept])


class CaptionDataModule(pl.LightningDataModule):
    """Data for training and evaluation.

    Args:
        dataset: ``"shapes"`` (generated under ``data_dir`` on first use), ``"karpathy"``
            (a Karpathy JSON: COCO, Flickr8k, Flickr30k), ``"flickr8k"`` (Flickr8k's native
            ``Flickr8k.token.txt`` with its split files) or ``"captions"`` (a folder of images with
            a JSONL or CSV captions file). See ``data/README.md``.
        annotations: the annotation file of a real dataset.
        image_root: folder the image paths are relative to (default: the annotation file's folder; for
            ``dataset: flickr8k``, the token file, a ``Flicker8k_Dataset`` folder beside it when present). A
            Karpathy JSON of Flickr names bare files: give the images' folder (the shipped configs do).
        restval_to_train: Karpathy COCO's ``restval`` images join ``train`` (the usual protocol).
        splits_dir: Flickr8k: folder of ``Flickr_8k.{train,dev,test}Images.txt`` (default: beside the token file).
        val_fraction, test_fraction, split_seed: ``captions`` files without splits: the seeded ratio split.
        data_dir: folder of the shapes set.
        image_size: images are resized to ``image_size`` x ``image_size``.
        mean, std: normalisation.
        batch_size: training images per batch (each with up to ``captions_per_image`` captions);
            eval_batch_size for validation/test.
        captions_per_image: captions per image in a training batch (grouped batches: the encoder
            runs once per image); 1 draws one caption per image per epoch; 0 takes all of them.
        num_workers: data-loader worker processes.
        min_word_freq: words rarer than this in the training captions become ``<unk>``.
        vocabulary: a model's token list (as its checkpoint stores it) to use instead of building one from
            the training captions; ``validate``/``test --ckpt_path`` set it to the checkpoint's, so a model
            is scored on any dataset with the words it was trained with.
        max_caption_len: training captions are cut to this many words.
        check_images: scan every image once at set-up (header and end marker; see
            :func:`captioning.data.images.check_image`) and leave bad ones out, counted by reason.
        max_bad_fraction: stop with an error when more than this fraction of the images is bad.
        max_pixels: images with more pixels are refused before decoding.
        feature_cache: train from a cache of frozen-encoder features under ``cache_dir``, built on
            first use (needs ``model.freeze_encoder: true``); validation and test still read images.
        cache_dir, cache_dtype: where the cache lives and how it stores features ("float16"/"float32").
        num_train, num_val, num_test, shapes_seed: size and seed of the generated shapes set.
    """

    def __init__(
        self,
        dataset: str = "shapes",
        annotations: str | None = None,
        image_root: str | None = None,
        restval_to_train: bool = True,
        splits_dir: str | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        data_dir: str = "data/shapes",
        image_size: int = 64,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        captions_per_image: int = 1,
        num_workers: int = 0,
        min_word_freq: int = 1,
        vocabulary: list[str] | None = None,
        max_caption_len: int = 24,
        check_images: bool = True,
        max_bad_fraction: float = 0.01,
        max_pixels: int = MAX_PIXELS,
        feature_cache: bool = False,
        cache_dir: str = "data/cache",
        cache_dtype: str = "float16",
        num_train: int = 4000,
        num_val: int = 500,
        num_test: int = 500,
        shapes_seed: int = 0,
    ):
        super().__init__()
        if dataset not in DATASETS:
            raise InputError(f"data.dataset must be one of {list(DATASETS)}, got {dataset!r}")
        if dataset != "shapes" and not annotations:
            raise InputError(f"data.dataset={dataset!r} needs data.annotations ({DATASETS[dataset]})")
        # before any data is read: image_size 0 failed deep in the shapes generator (randrange), and
        # max_caption_len 0 or captions_per_image -1 trained on empty (or all) captions without a word
        check_ranges(
            "data",
            # the shapes set below MIN_SHAPES_SIZE: size words the image cannot tell apart, and below 6 px no room to
            # draw at all (randrange's "empty range" from deep in the generator)
            image_size=(
                image_size,
                image_size >= (MIN_SHAPES_SIZE if dataset == "shapes" else 1),
                (f">= {MIN_SHAPES_SIZE} for the shapes set" if dataset == "shapes" else ">= 1"),
            ),
            batch_size=(batch_size, batch_size >= 1, ">= 1"),
            eval_batch_size=(eval_batch_size, eval_batch_size >= 1, ">= 1"),
            captions_per_image=(captions_per_image, captions_per_image >= 0, ">= 0 (0 takes all)"),
            num_workers=(num_workers, num_workers >= 0, ">= 0"),
            min_word_freq=(min_word_freq, min_word_freq >= 1, ">= 1"),
            max_caption_len=(max_caption_len, max_caption_len >= 1, ">= 1"),
            max_bad_fraction=(max_bad_fraction, 0 <= max_bad_fraction <= 1, "in [0, 1]"),
            # both were refused only after every image was scanned: max_pixels 0 as all images being bad ("is
            # data.image_root right?"), a cache_dtype when the cache was opened
            max_pixels=(max_pixels, max_pixels >= 1, ">= 1"),
            cache_dtype=(cache_dtype, cache_dtype in CACHE_DTYPES, f"one of {sorted(CACHE_DTYPES)}"),
            mean=(list(mean), len(mean) == 3, "3 values (R, G, B)"),
            std=(list(std), len(std) == 3 and all(s > 0 for s in std), "3 values (R, G, B), each > 0"),
        )
        # "~/coco" as a shell would read it: it was a folder named "~" in the working directory
        data_dir, annotations, image_root, splits_dir, cache_dir = (
            None if p is None else os.path.expanduser(p)
            for p in (data_dir, annotations, image_root, splits_dir, cache_dir)
        )
        self.dataset, self.data_dir, self.annotations, self.image_root = dataset, data_dir, annotations, image_root
        self.source_options = {
            "karpathy": {"restval_to_train": restval_to_train},
            "flickr8k": {"splits_dir": splits_dir},
            "captions": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": split_seed},
        }.get(dataset, {})
        self.image_size, self.mean, self.std = image_size, list(mean), list(std)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.captions_per_image = captions_per_image
        self.min_word_freq, self.max_caption_len = min_word_freq, max_caption_len
        self.check_images, self.max_bad_fraction, self.max_pixels = check_images, max_bad_fraction, max_pixels
        self.feature_cache, self.cache_dir, self.cache_dtype = feature_cache, cache_dir, cache_dtype
        self.shapes_config = ShapesConfig(num_train, num_val, num_test, image_size, shapes_seed)
        self._records: dict[str, list[CaptionRecord]] | None = None
        self._train_fingerprint: str | None = None  # see train_fingerprint
        self._vocab: Vocabulary | None = Vocabulary(vocabulary) if vocabulary is not None else None
        self.report: DataReport | None = None
        self.train_sampler: EpochSampler | None = None
        self._train_set: TrainCaptions | None = None  # the training loader's data set (window_counts)
        self._order: tuple[int | str | None, list[int]] = (None, [])  # (epoch, its order), for window_counts
        self._window: tuple[tuple[int, range] | None, tuple[int, int]] = (None, (0, 0))  # (epoch, batches), counts
        self._resume: tuple[int, int] | None = None
        self.data_seed: int | None = None  # the training order's and caption draws' (_data_seed), once drawn
        self._train_cache: FeatureCache | None = None
        self._train_cache_for: torch.nn.Module | None = None  # the encoder it was made for

    # -- records and vocabulary (built once, on first use) ----------------------------------

    @property
    def source(self) -> Path:
        """The file the records come from."""
        return Path(self.data_dir) / JSON_NAME if self.dataset == "shapes" else Path(self.annotations)

    def _load(self) -> dict[str, list[CaptionRecord]]:
        if self._records is None:
            if self.dataset == "shapes":
                records = read_karpathy_json(generate(self.data_dir, self.shapes_config))
            else:
                try:
                    records = read_records(self.dataset, self.annotations, self.image_root, **self.source_options)
                except FileNotFoundError as e:
                    raise InputFileNotFoundError(f"{e} (where to get it and where to put it: data/README.md)") from None
            # with a vocabulary given (a checkpoint's, for test / validate) the training split may be empty:
            # a model is then scored on a data set of test images only. Training still needs it (train_dataloader)
            self._records, self.report = clean_records(
                records,
                self.source,
                self.check_images,
                self.max_pixels,
                self.max_bad_fraction,
                require_train=self._vocab is None,
            )
            if rank_zero_only.rank == 0:
                print("\n".join([self.report.summary(self.source), *self.report.empty_splits()]), flush=True)
        return self._records

    def records(self, split: str) -> list[CaptionRecord]:
        """Records of ``split`` ("train", "val" or "test"), in loader order."""
        return self._load()[split]

    def train_fingerprint(self) -> str:
        """A short hash of the training split's image ids: the same for one data set wherever its files lie (a
        shapes set generated again elsewhere, a relative path read from another folder), for checkpoints to tell
        the data they were trained on."""
        if self._train_fingerprint is None:
            ids = "\n".join(sorted(r.image_id for r in self.records("train")))
            self._train_fingerprint = hashlib.sha256(ids.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return self._train_fingerprint

    def resume_at(self, epoch: int, items_done: int, seed: int | None = None) -> None:
        """Start the training data of ``epoch`` after its first ``items_done`` items of this rank's shard, in the
        order and caption draws of ``seed`` (the interrupted run's, from its checkpoint; None: this run's)."""
        self._resume = (epoch, items_done)
        if seed is not None and seed != self.data_seed:
            self.data_seed = seed
            if self._train_set is not None:  # a training loader made before the checkpoint was read
                self._train_set.seed = seed
            self._order, self._window = (None, []), (None, (0, 0))
        if self.train_sampler is not None:
            if self.data_seed is not None:
                self.train_sampler.seed = self.data_seed
            self.train_sampler.resume_at(*self._resume)

    def _data_seed(self) -> int:
        """The seed of the training order and the caption draws: a resumed run's checkpoint's (see resume_at), else
        the run's (seed_everything), not a fresh draw; under DDP rank 0's, for every rank: ranks started apart
        without one shared seed (plain ddp with seed_everything false, torchrun) each had their own, and their
        shards of the order overlapped (half the images trained twice an epoch, half never)."""
        if self.data_seed is None:
            seed = torch.initial_seed()
            if self.trainer is not None and self.trainer.world_size > 1:
                seed = int(self.trainer.strategy.broadcast(seed, src=0))
            self.data_seed = seed
        return self.data_seed

    @property
    def vocab(self) -> Vocabulary:
        """Vocabulary of the training captions (or the ``vocabulary`` given)."""
        if self._vocab is None:
            captions = [t for r in self.records("train") for t in r.tokens]
            vocab = Vocabulary.build(captions, self.min_word_freq)
            words = len(vocab.tokens) - len(SPECIALS)
            if not words:  # it trained to write "" for every image, every metric 0, unsaid
                most = max(Counter(w for c in captions for w in c).values(), default=0)
                raise InputError(
                    f"{self.source}: data.min_word_freq {self.min_word_freq} leaves the vocabulary no words: the "
                    f"training captions' most frequent word appears {most} times"
                )
            if rank_zero_only.rank == 0:
                print(f"vocabulary: {words} words of the training captions (data.min_word_freq {self.min_word_freq})")
            self._vocab = vocab
        return self._vocab

    @property
    def vocab_tokens(self) -> list[str]:
        """The vocabulary as the plain token list the model stores in its checkpoint."""
        return list(self.vocab.tokens)

    # -- feature cache ----------------------------------------------------------------------

    def cache_name(self, split: str) -> str:
        """The feature cache name of ``split``: readable (reader, annotation file's stem, split) and unique to
        the data source, so that two sources of one stem (two ``dataset.json`` in different folders) never
        share a name and a rebuild of one never removes the other's cache as stale. The hash covers what
        picks the records: the resolved annotation file, the image root and the reader's options. What
        the features depend on (encoder, weights, preprocessing, dtype, image files) is in the key."""
        source = {
            "dataset": self.dataset,
            "annotations": str(self.source.resolve()),
            "image_root": str(Path(self.image_root).resolve()) if self.image_root else None,
            "options": self.source_options,
        }
        digest = hashlib.sha1(json.dumps(source, sort_keys=True).encode()).hexdigest()[:8]
        # the stem cut to 100 bytes: with the key, ".npy" and a temporary suffix, a long but legal annotation file
        # name made the cache's file name too long to create (255 bytes); the digest keeps names apart
        # (a file name that is not UTF-8 keeps its bytes through surrogateescape; "ignore" then drops them, and a
        # character cut in two)
        stem = self.source.stem.encode("utf-8", "surrogateescape")[:100].decode("utf-8", "ignore")
        return f"{self.dataset}-{stem}-{digest}-{split}"

    def train_features(self) -> FeatureCache | None:
        """The training split's feature cache (``feature_cache``), built on first use by global rank
        0 with the model's frozen encoder while the other ranks wait on a lock file, not in a
        collective (see :meth:`FeatureCache.build_or_wait`); None without a cache."""
        if not self.feature_cache:
            return None
        trainer = self.trainer
        if trainer is None or trainer.lightning_module is None:
            raise RuntimeError("data.feature_cache needs the model's encoder: use the data module with a Trainer")
        module = trainer.lightning_module
        encoder = module.net.encoder
        # the cache of the model this data module serves now: one reused for a second fit of another model
        # trained that model on the first one's features (and a fine-tuned one on a frozen one's)
        if self._train_cache is None or self._train_cache_for is not encoder:
            if not encoder.freeze:
                raise InputError(
                    "data.feature_cache needs a frozen encoder (model.freeze_encoder: true): "
                    "the features of an encoder that is being trained change at every step"
                )
            name = self.cache_name("train")
            paths = [r.image_path for r in self.records("train")]
            transform = self.transform()
            cache = FeatureCache(self.cache_dir, name, paths, encoder, transform, self.cache_dtype, self.max_pixels)
            cache.build_or_wait(
                encoder,
                builder=trainer.is_global_zero,
                barrier=lambda: trainer.strategy.barrier("feature_cache"),
                rank=trainer.global_rank,
                device=module.device,
                batch_size=self.eval_batch_size,
                num_workers=self.num_workers,
                progress=bool(trainer.progress_bar_callback),
            )
            _, valid = cache.open()
            if trainer.is_global_zero and not valid.all():  # said at every use, not only by the build that found them
                print(
                    f"feature cache: {int((~valid).sum())} of {len(valid)} training images have no features (they "
                    f"could not be loaded when {cache.file.name} was built; see its .json) and are left out",
                    flush=True,
                )
            self._train_cache, self._train_cache_for = cache, encoder
        return self._train_cache

    # -- loaders ----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        self._load()

    def _on_gpu(self) -> bool:
        """Whether the trainer this data module serves runs on a CUDA device."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None = None, collate=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
            drop_last=False,
            # page-locked batches when training on a GPU: Lightning copies them with non_blocking=True, which
            # from pageable memory is a synchronous copy (the host waits), from pinned memory an overlapped one
            pin_memory=self._on_gpu(),
            # every iterator draws its workers' base seed from this generator, not from the global RNG:
            # a resumed run makes the next epoch's iterator before the checkpoint's RNG state is put
            # back, so a draw from the global RNG would shift every later dropout mask. (Our data draws
            # nothing from worker seeds: caption choice and order come from the run seed and the epoch.)
            generator=torch.Generator().manual_seed(torch.initial_seed()),
        )

    def transform(self) -> EvalTransform:
        return EvalTransform(self.image_size, self.mean, self.std)

    def train_dataloader(self) -> DataLoader:
        check_train_split(self._load(), self.report, self.source)
        seed = self._data_seed()
        ds = TrainCaptions(
            self.records("train"),
            self.vocab,
            self.transform(),
            self.max_caption_len,
            seed,
            self.captions_per_image,
            self.train_features(),
            max_pixels=self.max_pixels,
        )
        if self.train_sampler is None:
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
            self.train_sampler = EpochSampler(len(ds), seed, world, rank)
            if self._resume is not None:
                self.train_sampler.resume_at(*self._resume)
        self._train_set = ds
        return self._loader(ds, self.batch_size, self.train_sampler, collate_train)

    def window_counts(self, batches: range) -> tuple[int, int] | None:
        """(target words, captions) in the training batches ``batches`` (indices in the current epoch) of every
        rank together, from the sampler's order and each item's caption draw, before any of them is loaded:
        what a gradient accumulation window must be normalised by. None before the training loader exists.
        An image that fails to load during training (only possible without the set-up scan) is counted.
        Counted once per window (each of its batches asks) and the order drawn once per epoch."""
        sampler, ds = self.train_sampler, self._train_set
        if sampler is None or ds is None:
            return None
        ranks, epoch = sampler.num_replicas, sampler.epoch
        if self._window[0] == (epoch, batches):
            return self._window[1]
        if self._overfitting():
            # Lightning's SequentialSampler in place of ours: items in index order, epoch 0's caption draw. Under DDP
            # it is inside an unshuffled DistributedSampler, which shares the order out as ours does; bare (with
            # use_distributed_sampler off), every rank reads items 0, 1, ...
            draw = 0
            shared = isinstance(getattr(self.trainer.train_dataloader, "sampler", None), DistributedSampler)
            key = "index order, shared" if shared else "index order, every rank"
            if self._order[0] != key:
                items = list(range(len(ds)))
                self._order = (key, sampler.padded(items) if shared else items)
            per_rank, sharing, copies = (sampler.num_samples, ranks, 1) if shared else (len(ds), 1, ranks)
        else:
            draw, per_rank, sharing, copies = epoch, sampler.num_samples, ranks, 1
            if self._order[0] != epoch:
                self._order = (epoch, sampler.order(epoch))
        lo = batches.start * self.batch_size * sharing  # (see EpochSampler.order)
        hi = min(batches.stop * self.batch_size, per_rank) * sharing
        words = captions = 0
        for i in self._order[1][lo:hi]:
            w, c = ds.counts(i, draw)
            words, captions = words + w * copies, captions + c * copies
        self._window = ((epoch, batches), (words, captions))
        return words, captions

    def _overfitting(self) -> bool:
        """Whether the trainer runs --trainer.overfit_batches, for which Lightning swaps the training sampler."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and getattr(trainer, "overfit_batches", 0) > 0

    def _eval_loader(self, split: str) -> DataLoader:
        images = EvalImages(self.records(split), self.transform(), self.max_pixels)
        return self._loader(images, self.eval_batch_size, None, collate_eval)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
