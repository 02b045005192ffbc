"""CIFAR-10 for the child task: the whole set as uint8 tensors on the training device.

The paper scores a rule by the validation accuracy of a child network trained on
CIFAR-10 with 5,000 held-out training images as the validation set (section 4.2). This
module reads the standard ``cifar-10-batches-py`` layout (python pickles of
``data_batch_1..5`` and ``test_batch``), splits the 50,000 training images into a fixed,
seeded, class-stratified 45,000 / 5,000 train / validation split, and keeps the test set
apart. Images stay uint8 (N, 3, 32, 32) on the device -- 150 MB for the whole set -- and
``normalize`` turns a minibatch into floats there, so there is no per-item DataLoader
(``Split.with_inputs`` does it once for a whole split, for a worker that trains many children).

Where the data is looked for, in order (``root=None``):

1. ``$NOS_GYM_DATA``;
2. ``../shared/data`` beside a source checkout of nos-gym (the project's own copy);
3. ``~/.cache/nos_gym/data`` (where ``download=True`` puts it when no root is given).

A root may be the directory holding ``cifar-10-batches-py/`` or that directory itself.
The project's copy was re-encoded from JPEGs, so its pixels differ slightly from the
original release and torchvision's md5 check rejects it; this reader checks structure
(keys, shapes, dtypes, label range) instead of checksums and accepts both.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CIFAR10", "CIFAR10CorruptError", "CIFAR10NotFoundError", "CLASSES", "ENV_VAR", "MEAN", "STD",
    "Split", "clear_cache", "dataset_id", "find_cifar10", "load_cifar10", "normalize", "synthetic_cifar10",
]

ENV_VAR = "NOS_GYM_DATA"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: per-channel mean and standard deviation of the CIFAR-10 training images (0..1 scale)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
TRAIN_SIZE, TEST_SIZE = 50_000, 10_000


class CIFAR10NotFoundError(FileNotFoundError):
    """No ``cifar-10-batches-py`` directory where we looked."""


class CIFAR10CorruptError(ValueError):
    """A ``cifar-10-batches-py`` directory whose files are missing, unreadable or malformed."""


class Split(NamedTuple):
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64, on one device; optionally ``inputs``,
    the images already normalised as a network reads them (``with_inputs``)."""

    images: Tensor
    labels: Tensor
    inputs: Tensor | None = None

    def __len__(self) -> int:  # the number of examples, not the tuple's length
        return int(self.labels.shape[0])

    def take(self, n: int) -> Split:
        """The first ``n`` examples (the whole split if ``n`` is None or larger)."""
        if n is None or n >= len(self):
            return self
        return Split(self.images[:n], self.labels[:n], None if self.inputs is None else self.inputs[:n])

    def with_inputs(self, channels_last: bool = True, dtype: torch.dtype = torch.float32,
                    chunk: int = 1024) -> Split:
        """This split with ``inputs``: every image through ``normalize`` once, then cast to ``dtype``
        (round to nearest even, as autocast casts), channels-last or not. A minibatch is then a
        gather of rows instead of a conversion; the numbers are the same, since the normalisation
        is elementwise. Made ``chunk`` images at a time, so the float temporaries stay small."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(self.images.shape, dtype=dtype, device=self.images.device, memory_format=fmt)
        for start in range(0, len(self), chunk):
            part = self.images[start:start + chunk].contiguous(memory_format=fmt)
            out[start:start + chunk] = normalize(part).to(dtype)
        return Split(self.images, self.labels, out)


class CIFAR10(NamedTuple):
    """``train`` (45k), ``val`` (5k held out from the training batches) and ``test`` (10k)."""

    train: Split
    val: Split
    test: Split


def _repo_shared_data() -> Path:
    # nos_gym/data.py -> repository root -> ../shared/data (the layout CI and checkouts use)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nos_gym" / "data"


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        return [Path(root).expanduser()]
    out = []
    if os.environ.get(ENV_VAR):
        out.append(Path(os.environ[ENV_VAR]).expanduser())
    out += [_repo_shared_data(), _default_cache()]
    return out


def _batches_dir(base: Path) -> Path | None:
    """``base/cifar-10-batches-py`` or ``base`` itself if it holds the batches."""
    for d in (base / FOLDER, base):
        if (d / TEST_FILE).is_file() or (d / TRAIN_FILES[0]).is_file():
            return d
    return None


def _how_to_get(root: str | os.PathLike | None) -> str:
    target = root if root is not None else _default_cache()
    return (f"Get it with nos_gym.data.load_cifar10({str(target)!r}, download=True) (torchvision's "
            f"downloader, ~170 MB), or point ${ENV_VAR} or root= at a directory that holds "
            f"{FOLDER}/ (data_batch_1..5, test_batch).")


def find_cifar10(root: str | os.PathLike | None = None) -> Path:
    """The ``cifar-10-batches-py`` directory to read; raises ``CIFAR10NotFoundError`` naming every place tried."""
    looked = _candidates(root)
    for base in looked:
        found = _batches_dir(base)
        if found is not None:
            return found.resolve()
    where = "\n".join(f"  - {p} (and {p / FOLDER})" for p in looked)
    raise CIFAR10NotFoundError(f"CIFAR-10 not found. Looked in:\n{where}\n{_how_to_get(root)}")


def _read_batch(path: Path, expected: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise CIFAR10CorruptError(f"{path} is missing from {path.parent}; the directory is incomplete. "
                                  f"{_how_to_get(path.parent.parent)}")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
    except Exception as e:  # truncated file, not a pickle, ...
        raise CIFAR10CorruptError(f"cannot read {path}: {type(e).__name__}: {e}. The file is damaged; "
                                  f"{_how_to_get(path.parent.parent)}") from e
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise CIFAR10CorruptError(f"{path} is not a CIFAR-10 batch (expected a dict with 'data' and 'labels')")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.shape != (expected, 3072) or labels.shape != (expected,):
        raise CIFAR10CorruptError(f"{path}: expected uint8 data of shape ({expected}, 3072) and {expected} labels, "
                                  f"got {data.dtype} {data.shape} and {labels.shape[0]} labels")
    if labels.min() < 0 or labels.max() > 9:
        raise CIFAR10CorruptError(f"{path}: labels outside 0..9")
    return data.reshape(expected, 3, 32, 32), labels


def _stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices: ``val_size / 10`` images of each class held out, chosen by ``seed``."""
    if val_size % 10:
        raise ValueError(f"val_size must be a multiple of 10 (a class-balanced split), got {val_size}")
    per_class = val_size // 10
    rng = np.random.default_rng(seed)
    val = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        if per_class > len(idx):
            raise ValueError(f"val_size {val_size} asks for {per_class} images of class {c}; there are {len(idx)}")
        val.append(rng.choice(idx, size=per_class, replace=False))
    val_idx = np.sort(np.concatenate(val))
    mask = np.ones(len(labels), dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


def _download(root: str | os.PathLike | None) -> Path:
    import torchvision  # only needed here

    target = Path(root).expanduser() if root is not None else _default_cache()
    target.mkdir(parents=True, exist_ok=True)
    torchvision.datasets.CIFAR10(str(target), train=True, download=True)
    return target


@lru_cache(maxsize=4)
def _load_cpu(batches: Path, val_size: int, seed: int) -> CIFAR10:
    parts = [_read_batch(batches / name, 10_000) for name in TRAIN_FILES]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    tx, ty = _read_batch(batches / TEST_FILE, TEST_SIZE)
    train_idx, val_idx = _stratified_split(y, val_size, seed)

    def split(xs: np.ndarray, ys: np.ndarray) -> Split:
        return Split(torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(np.ascontiguousarray(ys)))

    return CIFAR10(split(x[train_idx], y[train_idx]), split(x[val_idx], y[val_idx]), split(tx, ty))


@lru_cache(maxsize=4)
def _load_on(batches: Path, val_size: int, seed: int, device: torch.device) -> CIFAR10:
    cpu = _load_cpu(batches, val_size, seed)
    if device.type == "cpu":
        return cpu
    return CIFAR10(*(Split(s.images.to(device), s.labels.to(device)) for s in cpu))


def load_cifar10(root: str | os.PathLike | None = None, download: bool = False,
                 device: str | torch.device = "cpu", *, val_size: int = 5_000, seed: int = 0) -> CIFAR10:
    """CIFAR-10 as uint8 tensors on ``device``: ``(train, val, test)`` splits of 45k, 5k and 10k.

    Args:
        root: a directory holding ``cifar-10-batches-py/`` (or that directory); None searches
            ``$NOS_GYM_DATA``, ``../shared/data`` beside the checkout and ``~/.cache/nos_gym/data``.
        download: fetch the original release with torchvision if nothing is found (never otherwise).
        device: where the tensors live; training reads minibatches straight from there.
        val_size: images held out of the 50k training batches for validation (paper: 5,000),
            balanced over the classes.
        seed: the split's seed; the same seed always gives the same split.

    The result is cached per (directory, split, device) within a process; treat the tensors
    as read-only.
    """
    if not 0 < val_size < TRAIN_SIZE:
        raise ValueError(f"val_size must be in (0, {TRAIN_SIZE}), got {val_size}")
    try:
        batches = find_cifar10(root)
    except CIFAR10NotFoundError:
        if not download:
            raise
        batches = find_cifar10(_download(root))
    return _load_on(batches, int(val_size), int(seed), torch.device(device))


def synthetic_cifar10(device: str | torch.device = "cpu", *, train: int = 45_000, val: int = 5_000,
                      test: int = 10_000, seed: int = 0) -> CIFAR10:
    """Random images and labels with CIFAR-10's shapes and dtypes, made on ``device``.

    For speed figures where the pixels do not matter (a machine without the data, such as
    a rented GPU); scores trained on it mean nothing. Seeded: the same seed gives the same set.
    """
    gen = torch.Generator().manual_seed(int(seed))

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, len(CLASSES), (n,), generator=gen)
        return Split(images.to(device), labels.to(device))

    return CIFAR10(split(train), split(val), split(test))


def clear_cache() -> None:
    """Forget the loaded copies (frees their memory; the next ``load_cifar10`` reads the files again)."""
    _load_on.cache_clear()
    _load_cpu.cache_clear()


def dataset_id(root: str | os.PathLike | None = None) -> str:
    """A short identity of the CIFAR-10 copy at ``root`` (our JPEG re-encoding differs from the original).

    It hashes the file sizes and the first 64 KiB of each batch, so that scores computed
    on different copies never share a cache entry; it reads well under a megabyte.
    """
    batches = find_cifar10(root)
    h = hashlib.sha256()
    for name in (*TRAIN_FILES, TEST_FILE):
        path = batches / name
        if not path.is_file():
            raise CIFAR10CorruptError(f"{path} is missing from {batches}. {_how_to_get(root)}")
        h.update(f"{name}:{path.stat().st_size}:".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 16))
    return h.hexdigest()[:16]


def normalize(images: Tensor) -> Tensor:
    """uint8 (N, 3, H, W) -> float32, standardised per channel, on the images' device."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    mean, std = _channel_stats(images.device)
    return (images.float() - mean) / std


@lru_cache(maxsize=8)
def _channel_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    # made once per device: a host-to-GPU copy per minibatch would stall the GPU's queue
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std
