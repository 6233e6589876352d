"""Datasets for training and evaluation: Fashion-MNIST (Debian IDX files) and ImageNet-layout folders."""
from .build import FASHION_MNIST_NAMES, build_dataset, dataset_info
from .fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                            INSTALL_HINT, FashionMNIST, read_idx)
from .sampler import ResumableDistributedSampler, ShardSampler

__all__ = ["build_dataset", "dataset_info", "FashionMNIST", "read_idx", "ResumableDistributedSampler",
           "ShardSampler", "FASHION_MNIST_NAMES", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "FASHION_MNIST_MEAN",
           "FASHION_MNIST_STD", "INSTALL_HINT"]
