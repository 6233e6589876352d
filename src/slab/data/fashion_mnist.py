"""Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist`` (no download).

The package installs ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` under
``/usr/share/datasets/fashion-mnist``. The whole split is read into memory as uint8 tensors
(60000 x 28 x 28 = 47 MB for train); normalisation and the light training augmentation (random
crop with 2 pixels of zero padding, horizontal flip) run per sample on tensors.

Augmentation is a pure function of ``(seed, epoch, index)``: the random offsets and flips of a
whole epoch are drawn at once from a generator seeded by ``seed`` and ``epoch``. Data order and
augmentation are therefore reproducible whatever the number of loader workers, and a resumed
run sees exactly the samples an uninterrupted one would.
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["FashionMNIST", "read_idx", "FASHION_MNIST_DIR", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
           "FASHION_MNIST_CLASSES", "INSTALL_HINT"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
INSTALL_HINT = "sudo apt-get update && sudo apt-get install dataset-fashion-mnist"

_SPLIT_PREFIX = {"train": "train", "test": "t10k", "val": "t10k", "t10k": "t10k"}
# IDX type codes (third byte of the magic) -> numpy dtype (big-endian).
_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (optionally gzip'd) into a numpy array of its stored shape.

    Raises ``FileNotFoundError`` (its message is the install command) when the file is missing and
    ``ValueError`` when the magic number, the rank or the size does not match the IDX format.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Fashion-MNIST file {path} not found. Install the dataset with: {INSTALL_HINT}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX file ({len(data)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic {data[:4].hex()}; expected 0000 then a type code in "
                         f"{sorted(hex(k) for k in _IDX_DTYPES)})")
    if expect_ndim is not None and ndim != expect_ndim:
        raise ValueError(f"{path}: expected an IDX array of rank {expect_ndim}, the header says rank {ndim}")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: header shape {shape} needs {expected} bytes of data, the file holds "
                         f"{len(data) - header} (truncated or corrupt download?)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _load_split(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    prefix = _SPLIT_PREFIX[split]
    images_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    labels_path = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(f"Fashion-MNIST files must hold uint8 data; got images {images.dtype}, labels {labels.dtype}")
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected 28x28 images, got {images.shape[1:]}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: labels must be in [0, 9], found {int(labels.max())}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """Fashion-MNIST split held in memory; items are ``(image [1, 28, 28] float32, label int)``.

    Args:
        split: ``'train'`` (60000) or ``'test'``/``'val'`` (10000).
        root: folder with the four ``*-ubyte.gz`` files (default: the Debian package's).
        train_augment: random crop (zero padding ``pad``) and horizontal flip; else the image as is.
        pad: padding of the random crop (2 pixels).
        seed: seed of the augmentation; call :meth:`set_epoch` to draw a new epoch's augmentation.
        normalize: subtract 0.2860 and divide by 0.3530 after scaling to [0, 1].

    ``images`` (uint8 ``[N, 28, 28]``) and ``targets`` (int64 ``[N]``) are public.
    """

    num_classes = 10
    classes = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, train_augment: bool = False,
                 pad: int = 2, seed: int = 0, normalize: bool = True):
        self.root = os.fspath(root) if root is not None else os.environ.get("SLAB_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
        self.split = split
        self.images, self.targets = _load_split(self.root, split)
        self.train_augment = bool(train_augment)
        self.pad = int(pad)
        self.seed = int(seed)
        self.normalize = bool(normalize)
        self.epoch = 0
        self._offsets: torch.Tensor | None = None
        self._flips: torch.Tensor | None = None
        if self.train_augment:
            self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the crop offsets and flips of ``epoch`` (deterministic in ``seed`` and ``epoch``)."""
        self.epoch = int(epoch)
        if not self.train_augment:
            return
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.targets)
        self._offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        self._flips = torch.rand(n, generator=g) < 0.5

    def __len__(self) -> int:
        return len(self.targets)

    def _transform(self, img: torch.Tensor, index: int) -> torch.Tensor:
        # img: uint8 [28, 28] -> float [1, 28, 28]
        x = img.to(torch.float32).div_(255.0)
        if self.train_augment:
            p = self.pad
            dy, dx = (int(v) for v in self._offsets[index])
            x = F.pad(x, (p, p, p, p))[dy:dy + 28, dx:dx + 28]
            if self._flips[index]:
                x = x.flip(-1)
        if self.normalize:
            x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        return x.unsqueeze(0).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        return self._transform(self.images[index], index), int(self.targets[index])

    def __repr__(self) -> str:
        return (f"FashionMNIST(split={self.split!r}, n={len(self)}, train_augment={self.train_augment}, "
                f"root={self.root!r})")
