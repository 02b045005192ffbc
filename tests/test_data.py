"""CIFAR-10 loading: the project's copy at ../shared/data, the 45k/5k split, clear errors."""

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nos_gym import data as cifar
from nos_gym.data import CIFAR10CorruptError, CIFAR10NotFoundError, load_cifar10, normalize

# CI clones the repository somewhere with shared/ beside it: <repo>/../shared/data
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def ds():
    return load_cifar10(SHARED)


def test_shapes_dtypes_and_split_sizes(ds):
    assert [len(s) for s in ds] == [45_000, 5_000, 10_000]
    for split in ds:
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.labels.dtype == torch.int64 and split.labels.shape == (len(split),)
        assert split.images.device.type == "cpu"
    # real pixels, not zeros: CIFAR's mean intensity is about 120 of 255
    assert 100 < ds.train.images[:1000].float().mean() < 140


def test_label_counts_are_class_balanced(ds):
    assert torch.bincount(ds.train.labels, minlength=10).tolist() == [4_500] * 10
    assert torch.bincount(ds.val.labels, minlength=10).tolist() == [500] * 10
    assert torch.bincount(ds.test.labels, minlength=10).tolist() == [1_000] * 10


def _image_hashes(images: torch.Tensor) -> list[bytes]:
    """A digest of every whole image (equal images, equal digests)."""
    rows = images.reshape(len(images), -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def test_validation_images_are_held_out_of_training(ds):
    train, val = set(_image_hashes(ds.train.images)), _image_hashes(ds.val.images)
    assert len(set(val)) == 5_000 and len(train) == 45_000  # distinct images
    assert not train.intersection(val)


def test_split_is_deterministic_and_depends_on_its_seed(ds):
    cifar.clear_cache()
    again = load_cifar10(SHARED)  # read from disk afresh
    assert again is not ds
    assert torch.equal(again.val.images, ds.val.images) and torch.equal(again.val.labels, ds.val.labels)
    other = load_cifar10(SHARED, seed=1)
    assert not torch.equal(other.val.images, ds.val.images)
    assert torch.bincount(other.val.labels, minlength=10).tolist() == [500] * 10
    # the test set does not depend on the split
    assert torch.equal(other.test.images, ds.test.images)


def test_default_search_finds_the_shared_copy_and_the_env_var(monkeypatch, tmp_path):
    monkeypatch.delenv(cifar.ENV_VAR, raising=False)
    assert cifar.find_cifar10() == (SHARED / "cifar-10-batches-py").resolve()
    # $NOS_GYM_DATA wins, and may name the batches directory itself
    monkeypatch.setenv(cifar.ENV_VAR, str(SHARED / "cifar-10-batches-py"))
    assert cifar.find_cifar10() == (SHARED / "cifar-10-batches-py").resolve()


def test_missing_directory_says_where_it_looked_and_how_to_get_the_data(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CIFAR10NotFoundError) as err:
        load_cifar10(missing)
    msg = str(err.value)
    assert str(missing) in msg and "download=True" in msg and "NOS_GYM_DATA" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_corrupt_batch_is_reported_with_its_file(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in (*cifar.TRAIN_FILES, cifar.TEST_FILE):
        (d / name).write_bytes(b"not a pickle")
    with pytest.raises(CIFAR10CorruptError, match="data_batch_1"):
        load_cifar10(tmp_path)
    # right pickle, wrong shape
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 10}, f)
    with pytest.raises(CIFAR10CorruptError, match=r"shape \(10000, 3072\)"):
        load_cifar10(tmp_path)


def test_bad_arguments_are_rejected(ds):
    with pytest.raises(ValueError, match="multiple of 10"):
        load_cifar10(SHARED, val_size=5_005)
    with pytest.raises(ValueError, match="uint8"):
        normalize(ds.train.images[:4].float())


def test_normalize_standardises_each_channel(ds):
    x = normalize(ds.train.images[:5_000])
    assert x.dtype == torch.float32 and x.shape == (5_000, 3, 32, 32)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=0.1), mean
    assert torch.allclose(std, torch.ones(3), atol=0.1), std


def test_dataset_id_names_the_copy():
    a = cifar.dataset_id(SHARED)
    assert a == cifar.dataset_id(SHARED / "cifar-10-batches-py") and len(a) == 16


def test_synthetic_set_has_cifar_shapes_and_is_seeded():
    from nos_gym.data import synthetic_cifar10

    fake = synthetic_cifar10(train=300, val=50, test=20, seed=3)
    assert [len(s) for s in fake] == [300, 50, 20]
    assert fake.train.images.shape == (300, 3, 32, 32) and fake.train.images.dtype == torch.uint8
    assert fake.val.labels.dtype == torch.int64 and set(fake.train.labels.tolist()) == set(range(10))
    assert torch.equal(synthetic_cifar10(train=300, val=50, test=20, seed=3).train.images, fake.train.images)
    assert not torch.equal(synthetic_cifar10(train=300, val=50, test=20, seed=4).train.images, fake.train.images)
    assert normalize(fake.train.images[:10]).dtype == torch.float32


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_inputs_is_normalize_once_in_the_networks_layout(ds, channels_last, dtype):
    split = ds.val.take(300)
    prepared = split.with_inputs(channels_last=channels_last, dtype=dtype, chunk=128)  # 3 chunks, the last short
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert prepared.inputs.dtype == dtype and prepared.inputs.is_contiguous(memory_format=fmt)
    # bit for bit what a minibatch's conversion gives (normalize is elementwise; the cast rounds alike)
    assert torch.equal(prepared.inputs, normalize(split.images).to(dtype))
    assert prepared.images is split.images and prepared.labels is split.labels and split.inputs is None
    head = prepared.take(100)
    assert len(head) == 100 and torch.equal(head.inputs, prepared.inputs[:100])
