"""Data: Fashion-MNIST from its IDX files (or a synthetic stand-in) and the loaders that shard it.

    hpcprune prune --config configs/quickstart.yaml --set data.dataset=synthetic

The IDX files are looked for in `data.path`, else `$HPCPRUNE_DATA`, else
/usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist), plain or gzipped. They are
decoded with numpy in one pass and held in memory as normalised float32 tensors: the whole set is
about 200 MB, and every rank reads it itself (no rank waits for another to load data).
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    TensorDataset,
)

from hpcprune.config import DataConfig
from hpcprune.dist.world import World
from hpcprune.errors import UsageError

DEFAULT_FOLDER = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MEAN, STD = 0.2860, 0.3530  # of the Fashion-MNIST training images scaled to [0, 1]
IDX_UBYTE = 0x08  # type code of unsigned bytes in the IDX magic number
NUM_CLASSES = 10
INPUT_SHAPE = (1, 28, 28)


@dataclass
class Splits:
    train: Dataset
    validation: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]


def load_data(cfg: DataConfig, seed: int) -> Splits:
    """Train/validation/test splits of `cfg.dataset`; the validation split is chosen with `seed`."""
    return DATASETS[cfg.dataset](cfg, seed)


# ------------------------------------------------------------------------------------ Fashion-MNIST


def load_fashion_mnist(cfg: DataConfig, seed: int) -> Splits:
    folder = data_folder(cfg)
    pixels = read_idx_images(find_idx_file(folder, FILES["train_images"]))
    labels = read_idx_labels(find_idx_file(folder, FILES["train_labels"]), len(pixels))
    test_file = find_idx_file(folder, FILES["test_images"])
    test_pixels = read_idx_images(test_file)
    if not len(test_pixels):  # every accuracy hpcprune reports would be 0/0
        raise UsageError(f"{test_file}: the test set holds no images")
    test_labels = read_idx_labels(find_idx_file(folder, FILES["test_labels"]), len(test_pixels))
    train, validation = split_train(pixels, labels, cfg, seed)
    return Splits(train, validation, to_dataset(test_pixels, test_labels), NUM_CLASSES, INPUT_SHAPE)


def data_folder(cfg: DataConfig) -> Path:
    """data.path, else $HPCPRUNE_DATA, else the Debian package's folder."""
    return Path(cfg.path or os.environ.get("HPCPRUNE_DATA") or DEFAULT_FOLDER)


def find_idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise UsageError(
        f"Fashion-MNIST not found: no {stem}[.gz] in {folder}; install Debian's dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist), or set data.path / HPCPRUNE_DATA to a folder with the IDX files"
    )


def read_idx_images(path: Path) -> np.ndarray:
    """N x 28 x 28 uint8 pixels."""
    pixels = read_idx(path, expected_dims=3)
    if pixels.shape[1:] != INPUT_SHAPE[1:]:
        raise UsageError(f"{path}: images are {pixels.shape[1]}x{pixels.shape[2]}, expected 28x28")
    return pixels


def read_idx_labels(path: Path, count: int) -> np.ndarray:
    """Labels in 0..9, one for each of the `count` images."""
    labels = read_idx(path, expected_dims=1)
    if len(labels) != count:
        raise UsageError(f"{path}: {len(labels)} labels for {count} images")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise UsageError(f"{path}: label {labels.max()} out of range 0..{NUM_CLASSES - 1}")
    return labels


def read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """A read-only unsigned-byte IDX array; the magic number and the size are checked against the header."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE or raw[3] != expected_dims:
        raise UsageError(f"{path}: bad magic number, not an IDX file of {expected_dims}-dimensional unsigned bytes")
    header_size = 4 + 4 * expected_dims
    if len(raw) < header_size:
        raise UsageError(f"{path}: truncated IDX header")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=expected_dims, offset=4))
    expected_size = header_size + int(np.prod(shape))
    if len(raw) != expected_size:
        raise UsageError(f"{path}: truncated or corrupt, {len(raw)} bytes where its header implies {expected_size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise UsageError(f"{path}: unreadable or truncated ({error})") from None


def to_dataset(pixels: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """Images as N x 1 x 28 x 28 float32 normalised with the dataset's mean/std; labels int64."""
    images = pixels.astype(np.float32)  # a new array: the in-place steps below never touch the file bytes
    images *= 1.0 / (255.0 * STD)
    images -= MEAN / STD
    return TensorDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def split_train(pixels: np.ndarray, labels: np.ndarray, cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """Validation = the last validation_size of a seeded permutation; train = the rest (optionally limited)."""
    count = len(pixels)
    if cfg.validation_size >= count:
        raise UsageError(f"data.validation_size={cfg.validation_size} leaves no training images (the set has {count})")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).numpy()
    train_indices = order[: count - cfg.validation_size]
    validation_indices = order[count - cfg.validation_size :]
    if cfg.train_limit is not None:
        train_indices = train_indices[: cfg.train_limit]
    # select the bytes first: normalising only what is kept moves a quarter of the memory
    return (
        to_dataset(pixels[train_indices], labels[train_indices]),
        to_dataset(pixels[validation_indices], labels[validation_indices]),
    )


# ---------------------------------------------------------------------------------------- synthetic


def load_synthetic(cfg: DataConfig, seed: int) -> Splits:
    """Ten classes, each a fixed smooth random image plus per-sample noise: learnable in an epoch.

    No files needed, so tests and laptops run without the real data. Everything follows from `seed`.
    """
    generator = torch.Generator().manual_seed(seed)
    prototypes = _smooth_prototypes(generator)
    train = _synthetic_samples(prototypes, cfg.synthetic_size, generator)
    if cfg.train_limit is not None:  # sliced after drawing, so the other splits do not depend on the limit
        train = TensorDataset(*(tensor[: cfg.train_limit] for tensor in train.tensors))
    validation = _synthetic_samples(prototypes, max(1, cfg.synthetic_size // 8), generator)
    test = _synthetic_samples(prototypes, max(1, cfg.synthetic_size // 4), generator)
    return Splits(train, validation, test, NUM_CLASSES, INPUT_SHAPE)


def _smooth_prototypes(generator: torch.Generator) -> torch.Tensor:
    """One 1x28x28 pattern per class: 7x7 noise upsampled, so conv and linear models both fit it."""
    coarse = torch.randn(NUM_CLASSES, 1, 7, 7, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=INPUT_SHAPE[1:], mode="bilinear", align_corners=False)


def _synthetic_samples(prototypes: torch.Tensor, count: int, generator: torch.Generator) -> TensorDataset:
    labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
    noise = torch.randn(count, *INPUT_SHAPE, generator=generator)
    return TensorDataset(prototypes[labels] + noise, labels)


# Adding a dataset is one entry here (and one name in DataConfig.dataset).
DATASETS = {
    "fashion-mnist": load_fashion_mnist,
    "synthetic": load_synthetic,
}


# ------------------------------------------------------------------------------------------ loaders


class SeededShuffle(Sampler[int]):
    """A random order that depends only on (seed, epoch), so a resumed run sees the same batches."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class StridedShard(Sampler[int]):
    """Rank r of n takes samples r, r+n, r+2n, ...: every sample exactly once, uneven counts."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, world: World,
                pad: bool = True) -> DataLoader:
    """Batches of this rank's share of `dataset`, in an order fixed by (seed, epoch).

    With several ranks, DistributedSampler gives every rank the same number of samples (padding by
    repeating a few), which DDP training needs. An unshuffled loader with pad=False instead shards
    without repeats, so sums over ranks count every sample exactly once (evaluation; the ranks then
    see different batch counts, so it must not drive DDP training).
    Call `set_epoch(loader, epoch)` before each epoch to get a new order.
    """
    sampler: Sampler[int] | None
    if world.size > 1 and (pad or shuffle):
        sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=shuffle, seed=seed)
    elif world.size > 1:
        sampler = StridedShard(len(dataset), world.rank, world.size)
    else:
        sampler = SeededShuffle(len(dataset), seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=0)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler which epoch starts (a no-op for unshuffled single-process loaders)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
