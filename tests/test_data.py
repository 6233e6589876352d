"""slab.data: the Fashion-MNIST IDX reader, image folders through timm, the resumable sampler."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch

from slab.data import (FASHION_MNIST_DIR, INSTALL_HINT, FashionMNIST, ResumableDistributedSampler, ShardSampler,
                       build_dataset, dataset_info, read_idx)

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")),
                                reason=f"Fashion-MNIST not installed ({INSTALL_HINT})")


@pytest.fixture(scope="module")
def test_split():
    return FashionMNIST("test")


def test_idx_reader_real_files():
    images = read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"), expect_ndim=3)
    labels = read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"), expect_ndim=1)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels).tolist() == [1000] * 10


def test_train_split_in_memory():
    ds = FashionMNIST("train", train_augment=True)
    assert len(ds) == 60000 and ds.images.dtype == torch.uint8 and ds.images.shape == (60000, 28, 28)
    assert ds.targets.bincount().tolist() == [6000] * 10
    x, y = ds[123]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y <= 9


def test_normalisation(test_split):
    x = torch.stack([test_split[i][0] for i in range(0, 10000, 10)])
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    raw = test_split.images[5].float() / 255
    assert torch.allclose(test_split[5][0][0], (raw - 0.2860) / 0.3530)


def test_augmentation_is_a_function_of_seed_epoch_index():
    a = FashionMNIST("test", train_augment=True, seed=1)
    b = FashionMNIST("test", train_augment=True, seed=1)
    same = [torch.equal(a[i][0], b[i][0]) for i in range(50)]
    assert all(same)
    plain = FashionMNIST("test")
    assert not all(torch.equal(a[i][0], plain[i][0]) for i in range(50))  # crops/flips happened
    before = [a[i][0] for i in range(50)]
    a.set_epoch(1)
    assert not all(torch.equal(before[i], a[i][0]) for i in range(50))
    a.set_epoch(0)
    assert all(torch.equal(before[i], a[i][0]) for i in range(50))


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        FashionMNIST("train", root=tmp_path)
    assert INSTALL_HINT in str(e.value)
    assert "sudo apt-get update && sudo apt-get install dataset-fashion-mnist" in str(e.value)


def test_bad_idx_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x12\x34\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 28, 28) + b"\x00" * 100)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)
    with pytest.raises(ValueError, match="rank 1"):
        read_idx(short, expect_ndim=1)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, test_split):
    from PIL import Image
    root = tmp_path_factory.mktemp("imagefolder")
    counts = {"train": 4, "val": 2}
    for split, n in counts.items():
        for cls in (0, 1, 7):
            if split == "val" and cls == 1:
                continue  # a class missing from val must not shift the labels of the others
            folder = root / split / f"class_{cls}"
            folder.mkdir(parents=True)
            idx = (test_split.targets == cls).nonzero().flatten()[:n]
            for i in idx.tolist():
                Image.fromarray(test_split.images[i].numpy()).save(folder / f"{i}.png")
    return root


def test_image_folder_grayscale_and_rgb(image_folder):
    ds = build_dataset(str(image_folder), "train", img_size=32, in_chans=1)
    assert len(ds) == 12
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert sorted({ds[i][1] for i in range(len(ds))}) == [0, 1, 2]
    val = build_dataset(str(image_folder), "val", img_size=32, in_chans=3)
    assert len(val) == 4
    assert val[0][0].shape == (3, 32, 32)
    assert sorted({val[i][1] for i in range(len(val))}) == [0, 2]  # class_7 keeps index 2
    aug = build_dataset(str(image_folder), "train", img_size=32, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    assert aug[0][0].shape == (3, 32, 32)
    assert dataset_info(str(image_folder))["num_classes"] == 3


def test_build_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'fashion-mnist'"):
        build_dataset(str(tmp_path / "nope"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train/"):
        build_dataset(str(tmp_path / "empty"), "train")
    with pytest.raises(ValueError, match="28x28"):
        build_dataset("fashion-mnist", "train", img_size=32)
    assert isinstance(build_dataset("fashion-mnist", "val"), FashionMNIST)


def test_resumable_sampler():
    shares = [ResumableDistributedSampler(103, 2, r, seed=3, drop_last=True).indices(epoch=0) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 51 and not set(shares[0]) & set(shares[1])
    s = ResumableDistributedSampler(103, 2, 1, seed=3, drop_last=True)
    s.set_position(0, 10)
    assert list(s) == shares[1][10:] and len(s) == 41
    s.set_epoch(1)
    assert list(s) != shares[1]
    padded = ResumableDistributedSampler(103, 2, 0, seed=3)
    assert len(padded) == 52
    assert sorted(list(ShardSampler(5, 2, 0)) + list(ShardSampler(5, 2, 1))) == [0, 1, 2, 3, 4]
