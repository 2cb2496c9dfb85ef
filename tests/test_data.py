"""Fashion-MNIST IDX reading, splits, the synthetic set and loaders: `python -m pytest tests/test_data.py`."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcprune.config import DataConfig, ModelConfig
from hpcprune.dist.world import SingleWorld
from hpcprune.errors import UsageError
from hpcprune.models.builders import build_model
from hpcprune.models.data import FILES, load_data, make_loader, set_epoch


class RankOf(SingleWorld):
    """A world of `size` ranks seen from `rank`; the loaders only read rank and size."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_dataset(folder: Path, train: int = 100, test: int = 30, *, gz: bool = False) -> Path:
    """A tiny IDX set; image i's pixel [0, 0] is i % 256 and [0, 1] is i // 256, so splits are traceable."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("test", test)):
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = np.arange(count) % 256, np.arange(count) // 256
        images[:, 5:20, 5:20] = 200
        write_idx(folder / FILES[f"{prefix}_images"], images, gz=gz)
        write_idx(folder / FILES[f"{prefix}_labels"], np.arange(count) % 10, gz=gz)
    return folder


def image_ids(dataset) -> list[int]:
    """The traceable index of each image (undoing the normalisation)."""
    pixels = torch.round((dataset.tensors[0][:, 0, 0, :2] * 0.3530 + 0.2860) * 255).long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


# --- real Fashion-MNIST ----------------------------------------------------------------------------


def test_real_fashion_mnist_loads_with_the_documented_shapes(require_fashion_mnist):
    splits = load_data(DataConfig(validation_size=5000), seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (55000, 5000, 10000)
    images, labels = splits.train.tensors
    assert images.shape == (55000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == set(range(10))
    assert abs(images.mean().item()) < 0.01 and abs(images.std().item() - 1) < 0.01  # normalised
    assert splits.test.tensors[0].shape == (10000, 1, 28, 28)
    assert (splits.num_classes, splits.input_shape) == (10, (1, 28, 28))


# --- IDX files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_raw_or_gzipped(tmp_path, gz):
    splits = load_data(DataConfig(path=str(write_dataset(tmp_path, gz=gz)), validation_size=10), seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (90, 10, 30)
    assert image_ids(splits.test) == list(range(30))
    assert splits.test.tensors[1].tolist() == [i % 10 for i in range(30)]


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file_is_named(tmp_path, gz):
    folder = write_dataset(tmp_path, gz=gz)
    victim = folder / (FILES["train_images"] + (".gz" if gz else ""))
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(UsageError, match=FILES["train_images"]):
        load_data(DataConfig(path=str(folder), validation_size=10), seed=0)


def test_bad_magic_number_is_named(tmp_path):
    folder = write_dataset(tmp_path)
    victim = folder / FILES["test_labels"]
    victim.write_bytes(b"\x00\x00\x0d\x01" + victim.read_bytes()[4:])
    with pytest.raises(UsageError, match=rf"{FILES['test_labels']}.*magic"):
        load_data(DataConfig(path=str(folder), validation_size=10), seed=0)


def test_label_count_must_match_images(tmp_path):
    folder = write_dataset(tmp_path)
    write_idx(folder / FILES["train_labels"], np.zeros(99), gz=False)
    with pytest.raises(UsageError, match="99 labels for 100 images"):
        load_data(DataConfig(path=str(folder), validation_size=10), seed=0)


def test_missing_folder_says_what_to_install(tmp_path):
    absent = tmp_path / "nowhere"
    with pytest.raises(UsageError) as error:
        load_data(DataConfig(path=str(absent)), seed=0)
    assert str(absent) in str(error.value)
    assert "dataset-fashion-mnist" in str(error.value) and "HPCPRUNE_DATA" in str(error.value)


def test_environment_variable_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCPRUNE_DATA", str(write_dataset(tmp_path / "env", train=50)))
    assert len(load_data(DataConfig(validation_size=10), seed=0).train) == 40


def test_config_path_wins_over_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCPRUNE_DATA", str(tmp_path / "nowhere"))
    folder = write_dataset(tmp_path / "cfg", train=60)
    assert len(load_data(DataConfig(path=str(folder), validation_size=10), seed=0).train) == 50


# --- splits ----------------------------------------------------------------------------------------


def test_splits_are_disjoint_complete_and_deterministic(tmp_path):
    cfg = DataConfig(path=str(write_dataset(tmp_path)), validation_size=25)
    first, again, other = load_data(cfg, seed=1), load_data(cfg, seed=1), load_data(cfg, seed=2)
    train, validation = image_ids(first.train), image_ids(first.validation)
    assert len(validation) == 25 and not set(train) & set(validation)
    assert sorted(train + validation) == list(range(100))
    assert image_ids(again.train) == train and image_ids(again.validation) == validation
    assert set(image_ids(other.validation)) != set(validation)


def test_train_limit_keeps_the_validation_split(tmp_path):
    folder = str(write_dataset(tmp_path))
    full = load_data(DataConfig(path=folder, validation_size=25), seed=3)
    limited = load_data(DataConfig(path=folder, validation_size=25, train_limit=10), seed=3)
    assert image_ids(limited.train) == image_ids(full.train)[:10]
    assert image_ids(limited.validation) == image_ids(full.validation)


def test_validation_larger_than_the_set_is_refused(tmp_path):
    with pytest.raises(UsageError, match="validation_size"):
        load_data(DataConfig(path=str(write_dataset(tmp_path)), validation_size=100), seed=0)


# --- synthetic -------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_sized():
    cfg = DataConfig(dataset="synthetic", synthetic_size=256)
    first, again, other = load_data(cfg, seed=5), load_data(cfg, seed=5), load_data(cfg, seed=6)
    assert (len(first.train), len(first.validation), len(first.test)) == (256, 32, 64)
    for a, b in zip(first.train.tensors + first.test.tensors, again.train.tensors + again.test.tensors):
        assert torch.equal(a, b)
    assert not torch.equal(first.train.tensors[0], other.train.tensors[0])
    assert first.train.tensors[0].shape == (256, 1, 28, 28) and first.train.tensors[1].dtype == torch.int64


def test_synthetic_train_limit_leaves_the_test_set_alone():
    full = load_data(DataConfig(dataset="synthetic", synthetic_size=256), seed=0)
    limited = load_data(DataConfig(dataset="synthetic", synthetic_size=256, train_limit=50), seed=0)
    assert len(limited.train) == 50
    assert torch.equal(limited.test.tensors[0], full.test.tensors[0])


def test_synthetic_is_learnable_in_one_epoch():
    splits = load_data(DataConfig(dataset="synthetic", synthetic_size=1024), seed=0)
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="lenet300"))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for inputs, targets in make_loader(splits.train, 64, shuffle=True, seed=0, world=SingleWorld()):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), targets).backward()
        optimizer.step()
    with torch.no_grad():
        images, labels = splits.test.tensors
        accuracy = (net(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


# --- loaders ---------------------------------------------------------------------------------------


def indexed(count: int) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.arange(count))


def order(loader) -> list[int]:
    return [int(i) for (batch,) in loader for i in batch]


def test_loader_order_is_fixed_by_seed_and_epoch():
    world = SingleWorld()
    first = make_loader(indexed(50), 8, shuffle=True, seed=1, world=world)
    again = make_loader(indexed(50), 8, shuffle=True, seed=1, world=world)
    other = make_loader(indexed(50), 8, shuffle=True, seed=2, world=world)
    assert order(first) == order(again) != order(other)
    assert sorted(order(first)) == list(range(50))
    epoch0 = order(first)
    set_epoch(first, 1)
    set_epoch(again, 1)
    assert order(first) == order(again) != epoch0


def test_unshuffled_loader_keeps_the_order():
    loader = make_loader(indexed(20), 6, shuffle=False, seed=0, world=SingleWorld())
    set_epoch(loader, 3)  # a no-op, and allowed
    assert order(loader) == list(range(20))
    assert [len(batch) for (batch,) in loader] == [6, 6, 6, 2]


def test_ranks_share_the_data_evenly():
    shards = [order(make_loader(indexed(50), 4, shuffle=True, seed=0, world=RankOf(rank, 3))) for rank in range(3)]
    assert [len(shard) for shard in shards] == [17, 17, 17]  # padded: DDP needs equal batch counts
    assert set().union(*shards) == set(range(50))


def test_unpadded_shards_count_every_sample_once():
    shards = [order(make_loader(indexed(50), 4, shuffle=False, seed=0, world=RankOf(rank, 3), pad=False))
              for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(50))
