"""A cache of frozen-encoder features, so that a frozen-encoder epoch reads features, not images.

With a frozen encoder, every epoch would decode, resize and encode the same images again. The
cache runs the encoder once per image and stores the grid features (I,N,C) in one raw array file
under ``data/cache/``, read back through ``numpy.memmap``: data-loader workers open it without
copying it, and only the rows a batch needs are read from disk.

A cache file is named by a key that hashes everything its contents depend on: the encoder's
architecture and weights (a hash of its state dict, so any change of weights is seen), the
preprocessing (image size, mean, std), the storage dtype and the dataset (image paths with
their sizes and modification times). A change of any of them gives a new key and a rebuild;
older files of the same name (one data source's split) are removed then. A build writes to a
temporary file and renames it when complete, so an interrupted build never leaves a cache that
looks valid.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from captioning.data.images import MAX_PIXELS, ImageLoadError, load_image
from captioning.data.records import real_paths
from captioning.data.tempfiles import file_lock, locked_temp, make_folder, remove_orphans, try_lock
from captioning.data.transforms import EvalTransform
from captioning.errors import InputError
from captioning.models.base import Encoder

#: the feature cache's storage types (``data.cache_dtype``)
CACHE_DTYPES = {"float16": np.float16, "float32": np.float32}


def encoder_fingerprint(encoder: Encoder) -> str:
    """A hash of the encoder's architecture (its repr: layers, and the pooling to a grid, which has no
    weights) and every tensor of its state dict (weights and BN statistics)."""
    h = hashlib.sha1(repr(encoder).encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def dataset_fingerprint(paths: Sequence[Path]) -> str:
    """A hash of the image paths, in order, resolved, with their sizes and modification times.

    Resolved (the folder's real path, relative paths from the working directory): one data set given as
    ``data/coco/...`` and as its absolute path, or through a symlink, has one key. Hashed as written, each
    spelling found the other's cache stale and deleted it, so runs that alternated re-encoded COCO every time."""
    h = hashlib.sha1()
    for p, real in zip(paths, real_paths(paths)):
        try:
            st = os.stat(p)
            h.update(f"{real}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{real}\0missing\n".encode())
    return h.hexdigest()[:16]


class _Images(Dataset):
    def __init__(self, paths: Sequence[Path], transform: EvalTransform, max_pixels: int = MAX_PIXELS):
        self.paths, self.transform, self.max_pixels = list(paths), transform, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        """(image, its index, OK / FAILED / UNREADABLE): the last a file that could not be read at all, which may
        be a passing state (a network drive, permissions being fixed), not the image's."""
        try:
            return self.transform(load_image(self.paths[i], self.max_pixels)), i, OK
        except ImageLoadError as e:
            print(f"feature cache: skipping {e}", flush=True)
            size = self.transform.size
            return torch.zeros(3, size, size), i, UNREADABLE if e.reason in PASSING else FAILED


#: the build's word on each image (see _Images); the reasons of ImageLoadError that may pass
OK, FAILED, UNREADABLE = 0, 1, 2
PASSING = ("missing", "permission denied", "unreadable")


def _opens(path: Path) -> bool:
    """Whether ``path`` opens for reading now, as the build opens it (``os.access`` disagrees with ``open`` for
    root, under AppArmor, and for a socket, which it calls readable)."""
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def _allocate(path: Path, shown: Path) -> None:
    """Give the memory-mapped file ``path`` its disk blocks now: it is sparse, and a disk that fills while the
    features are written killed the process with SIGBUS at the write into the map (exit 135, no message). A full
    disk is then an OSError naming the cache file ``shown``, here. Where the file system cannot allocate ahead
    (some network file systems; no posix_fallocate on macOS), the file stays sparse as before."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        raise OSError(e.errno, f"{e.strerror}: the feature cache cannot be written", str(shown)) from None
    finally:
        os.close(fd)


class FeatureCache:
    """Features (I,N,C) of ``paths`` under ``folder/{name}-{key}.npy`` plus a ``.json`` description.

    Args:
        folder: where cache files live (``data/cache`` by default in the data module).
        name: a readable prefix unique to the data source and split, e.g.
            ``"karpathy-dataset_coco-1a2b3c4d-train"`` (see the data module's ``cache_name``); files of
            the same name with another key are stale and removed when this one is built.
        paths: the images, in dataset order (row i of the cache is image i).
        encoder: the frozen encoder (its weights are part of the key).
        transform: the preprocessing applied before the encoder.
        dtype: ``"float16"`` (half the disk, the default) or ``"float32"``.
    """

    def __init__(
        self,
        folder: str | Path,
        name: str,
        paths: Sequence[Path],
        encoder: Encoder,
        transform: EvalTransform,
        dtype: str = "float16",
        max_pixels: int = MAX_PIXELS,
    ):
        if dtype not in CACHE_DTYPES:
            raise InputError(f"feature cache dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
        self.folder, self.name, self.paths, self.dtype = Path(folder), name, list(paths), dtype
        self.transform = transform
        self.description = {
            "encoder": type(encoder).__name__,
            "encoder_weights": encoder_fingerprint(encoder),
            "image_size": transform.size,
            "mean": [float(m) for m in transform.mean],
            "std": [float(s) for s in transform.std],
            "dtype": dtype,
            "dataset": dataset_fingerprint(self.paths),
            "images": len(self.paths),
        }
        if max_pixels != MAX_PIXELS:  # which images have rows (the default left out: earlier caches keep their key)
            self.description["max_pixels"] = int(max_pixels)
        self.max_pixels = max_pixels
        self.key = hashlib.sha1(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:16]
        self.file = self.folder / f"{name}-{self.key}.npy"
        self.meta_file = self.file.with_suffix(".json")
        self._features: np.ndarray | None = None
        self._valid: np.ndarray | None = None

    def exists(self, recheck: bool = False) -> bool:
        """True when a complete cache with this key is on disk; with ``recheck`` (when deciding whether to build it),
        False also where an image that could not be read at all when it was built can be read now."""
        if not (self.file.is_file() and self.meta_file.is_file()):
            return False
        try:
            meta = json.loads(self.meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if not (meta.get("key") == self.key and meta.get("complete") is True):
            return False
        # the build writes the array whole before its metadata, but a copy of the cache folder cut short (to
        # another disk, say) leaves a short array beside complete metadata, which would only fail in the loader
        try:
            features = np.load(self.file, mmap_mode="r")
        except (OSError, ValueError):
            return False  # damaged: built again
        if not (features.ndim == 3 and len(features) == len(self.paths)):
            return False
        # images that could not be read at all when it was built: where one can be now, the build's failure was a
        # passing one (a drive away, permissions), and its row, left empty, would stay so for good
        readable = [i for i in meta.get("unreadable", []) if _opens(self.paths[i])] if recheck else []
        if readable:
            print(
                f"feature cache: {len(readable)} image(s) that could not be read when {self.file.name} was built can "
                f"be now (first: {self.paths[readable[0]]}): building it again",
                flush=True,
            )
            return False
        return True

    @torch.no_grad()
    def build(
        self,
        encoder: Encoder,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        """Encode every image once with ``encoder`` (the one the key was made from) and the cache's
        transform, and write the cache (temporary file, renamed when complete); an image that cannot be
        loaded (the cache's ``max_pixels`` as in :func:`load_image`) gets a row marked invalid."""
        from tqdm import tqdm

        make_folder(self.folder)  # "Not a directory" where a file stands on the path, not "File exists"
        with encoder.evaluating():  # then back in its mode (see Encoder.evaluating)
            images = _Images(self.paths, self.transform, self.max_pixels)
            loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers)
            # a killed build's partial file (glob.escape: see the stale caches' clean-up below)
            for orphan in remove_orphans(self.folder, f"{glob.escape(self.name)}-*.npy.tmp*"):
                print(f"feature cache: removed {orphan}, left by a build that was killed")
            status = np.full(len(self.paths), FAILED, dtype=np.int64)
            param = next(encoder.parameters(), None)  # its device and dtype (bf16-true, 64-true: not float32)
            out = None
            # locked while we write it, so another process's clean-up above never takes it for a killed build's
            with locked_temp(self.folder, f"{self.file.name}.tmp") as tmp:
                bar = tqdm(loader, desc=f"feature cache {self.name}", unit="batch", disable=not progress)
                for images, index, code in bar:
                    images = images.to(device) if param is None else images.to(param.device, param.dtype)
                    feats = encoder(images).features  # (b,3,H,W) -> (b,N,C)
                    if out is None:  # the grid size is known after the first batch
                        shape = (len(self.paths), feats.size(1), feats.size(2))
                        self._check_space(shape)
                        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=CACHE_DTYPES[self.dtype], shape=shape)
                        _allocate(tmp, self.file)
                    rows = feats.float().cpu().numpy()  # (b,N,C)
                    with np.errstate(over="ignore"):  # an overflow is reported just below, with the remedy
                        stored = rows.astype(CACHE_DTYPES[self.dtype])
                    if not np.isfinite(stored).all() and np.isfinite(rows).all():  # a choice of the user's: one line
                        raise InputError(
                            f"feature cache {self.name}: features up to {np.abs(rows).max():.4g} overflow "
                            f"{self.dtype}; use data.cache_dtype float32 (or an encoder with trained weights)"
                        )
                    out[index.numpy()] = stored
                    status[index.numpy()] = code.numpy()
                if out is None:
                    raise ValueError(f"feature cache {self.name}: no images to encode")
                out.flush()
                del out
                os.replace(tmp, self.file)
        meta = {
            **self.description,
            "key": self.key,
            "complete": True,
            "invalid": np.flatnonzero(status != OK).tolist(),
            "unreadable": np.flatnonzero(status == UNREADABLE).tolist(),  # rechecked when the cache is reused
        }
        self.meta_file.write_text(json.dumps(meta, indent=1) + "\n")
        # glob.escape: a name holds the annotation file's stem, where '[' and ']' would make a pattern matching
        # nothing (captions[v2].jsonl), so stale caches of tens of GB and killed builds' files were never removed
        for stale in self.folder.glob(f"{glob.escape(self.name)}-*.npy"):
            # only this name's own keys: a longer name that merely starts with ours is another cache
            if stale != self.file and re.fullmatch(rf"{re.escape(self.name)}-[0-9a-f]{{16}}\.npy", stale.name):
                stale.unlink(missing_ok=True)
                stale.with_suffix(".json").unlink(missing_ok=True)
                print(f"feature cache: removed stale {stale}")

    def _check_space(self, shape: tuple[int, int, int]) -> None:
        """Refuse a build the cache folder's disk cannot hold, before encoding the rest: the memory-mapped
        file is sparse, so a full disk showed only as an error deep into the build (COCO's train split at
        14x14x2048 in float16 is ~91 GB, hours of encoding on a CPU)."""
        need = int(np.prod(shape)) * np.dtype(CACHE_DTYPES[self.dtype]).itemsize + 4096  # the .npy header, rounded
        free = shutil.disk_usage(self.folder).free
        if need > free:
            # named, so that train.py prints it as one line
            raise OSError(
                errno.ENOSPC,
                f"the feature cache {self.name} needs {need:,} bytes ({need / 2**30:.1f} GiB), and this folder has "
                f"{free:,} free: free some space, point data.cache_dir at a larger disk, or set data.feature_cache "
                "false",
                str(self.folder),
            )

    def build_or_wait(
        self, encoder: Encoder, builder: bool, barrier: Callable[[], None], rank: int = 0, **build_options
    ) -> None:
        """Have the cache on disk in each of several processes that need it (DDP ranks): the ``builder``
        (global rank 0) builds it unless it exists; the others wait for it on the lock file
        ``{name}-{key}.lock`` in the cache folder, not in a collective, whose timeout (30 minutes by default)
        a long build (COCO) would exceed. ``barrier`` runs once, in every process, before the build:
        past it the builder holds the lock, so a waiter cannot find it free too early. Another run
        building the same cache is waited for in the same way (and not built twice); one building
        another key of the same name (another encoder on the same data) is not: with one lock per name,
        a rank that took it as that run let go, before its own rank 0, found no cache and stopped the run.
        ``build_options`` go to :meth:`build`. Raises when the cache is not there in the end."""
        lock = self.file.with_suffix(".lock")
        held = try_lock(lock) if builder else None
        try:
            barrier()
            if builder:
                # rechecked here only: after a build, an image readable again since it was tried is no failure
                if held is None:  # another run builds this cache now: wait, then build if it did not
                    with file_lock(lock, wait_message=f"feature cache: waiting for another run building {self.name}"):
                        if not self.exists(recheck=True):
                            self.build(encoder, **build_options)
                elif not self.exists(recheck=True):
                    self.build(encoder, **build_options)
            else:
                message = f"feature cache: rank {rank} waits for rank 0 to build {self.file}"
                with file_lock(lock, shared=True, wait_message=message):
                    pass  # rank 0 let go of the lock: it built the cache, or it failed
        finally:
            if held is not None:
                os.close(held)
        if not self.exists():
            raise RuntimeError(
                f"{self.file}: the feature cache was not written (rank 0 failed to build it: see its error; with "
                "several nodes, data.cache_dir must be a folder they all share)"
            )

    def open(self) -> tuple[np.ndarray, np.ndarray]:
        """(features (I,N,C) memory-mapped read-only, valid (I,) bool)."""
        if self._features is None:
            try:
                meta = json.loads(self.meta_file.read_text())
                self._features = np.load(self.file, mmap_mode="r")
            except (OSError, ValueError) as e:  # damaged since it was checked: name it, and the way out
                raise InputError(
                    f"{self.file}: the feature cache cannot be read ({type(e).__name__}: {e}); delete it and its "
                    ".json to build it again"
                ) from e
            valid = np.ones(len(self._features), dtype=bool)
            valid[meta.get("invalid", [])] = False
            self._valid = valid
        return self._features, self._valid

    def __getstate__(self) -> dict:
        # data-loader workers re-open the memory map themselves instead of pickling it
        return {**self.__dict__, "_features": None, "_valid": None}
