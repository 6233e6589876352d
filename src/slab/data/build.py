"""Datasets by name: ``'fashion-mnist'`` or the path of an ImageNet-layout image folder."""
from __future__ import annotations

import os

from torch.utils.data import Dataset

from ..errors import UserError, did_you_mean
from .fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST

__all__ = ["build_dataset", "dataset_info", "FASHION_MNIST_NAMES", "IMAGEFOLDER_SPLITS"]

FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist")
#: split name -> folder names tried, in order, under the image-folder root.
IMAGEFOLDER_SPLITS = {"train": ("train",), "val": ("val", "validation"), "test": ("test", "val", "validation")}


def _is_fashion_mnist(spec: str) -> bool:
    return str(spec).lower() in FASHION_MNIST_NAMES


def _split_folder(root: str, split: str) -> str:
    if split not in IMAGEFOLDER_SPLITS:
        raise ValueError(f"split must be one of {sorted(IMAGEFOLDER_SPLITS)}, got {split!r}")
    for name in IMAGEFOLDER_SPLITS[split]:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"image folder {root!r} has no {' or '.join(IMAGEFOLDER_SPLITS[split])}/ subfolder for "
                            f"split {split!r}; expected the ImageNet layout ROOT/train/CLASS/*.jpg and "
                            f"ROOT/val/CLASS/*.jpg")


def _class_folders(folder: str) -> list[str]:
    from timm.utils.misc import natural_key
    return sorted((d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))), key=natural_key)


def _has_image(folder: str) -> bool:
    # timm labels an image by the folder it lies in: only images directly inside a class folder count.
    kinds = set(_image_kinds())
    with os.scandir(folder) as entries:
        return any(e.is_file() and os.path.splitext(e.name)[1].lower() in kinds for e in entries)


def _class_map(root: str) -> dict[str, int]:
    """Class name -> index from the class folders of ``root/train`` (so every split shares it).

    Raises :class:`UserError` for class folders without images and for a single class: both train
    without complaint otherwise (a class never seen, or a 100 % accuracy that means nothing).
    """
    train = _split_folder(root, "train")
    names = _class_folders(train)
    if not names:
        raise FileNotFoundError(f"{train} holds no class folders (expected {train}/CLASS_NAME/*.jpg)")
    empty = [n for n in names if not _has_image(os.path.join(train, n))]
    if empty:
        shown = ", ".join(empty[:5]) + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
        raise UserError(f"{train} has class folder(s) without images directly inside: {shown}. A class without "
                        f"training images cannot be learned: add its images ({', '.join(_image_kinds())}) or remove "
                        f"the folder")
    if len(names) == 1:
        raise UserError(f"{train} has a single class folder ({names[0]!r}): classification needs at least 2 classes "
                        f"(with one, every prediction is right and the loss is 0). Add a folder per class")
    return {n: i for i, n in enumerate(names)}


def _image_kinds() -> list[str]:
    from timm.data.readers.img_extensions import get_img_extensions
    return sorted(get_img_extensions(as_set=True))


def _check_split_classes(root: str, folder: str, classes: dict[str, int]) -> None:
    """Refuse an evaluation split with classes training lacks: timm would drop their images without a word."""
    extra = [n for n in _class_folders(folder) if n not in classes and _has_image(os.path.join(folder, n))]
    if extra:
        named = ", ".join(f"{n!r}{did_you_mean(n, classes)}" for n in extra[:5])
        raise UserError(f"{folder} has class folder(s) that {_split_folder(root, 'train')} lacks: {named}. Their "
                        f"images would be left out of the evaluation: rename them to training classes, add them "
                        f"to the training split, or move them out")


def dataset_info(spec: str) -> dict:
    """``{'num_classes', 'in_chans', 'img_size', 'mean', 'std'}`` of a dataset spec (no image is read)."""
    if _is_fashion_mnist(spec):
        return dict(num_classes=10, in_chans=1, img_size=28, mean=(FASHION_MNIST_MEAN,), std=(FASHION_MNIST_STD,))
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"dataset {spec!r} is neither 'fashion-mnist' nor an existing image folder"
                                f"{did_you_mean(spec, FASHION_MNIST_NAMES)}")
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return dict(num_classes=len(_class_map(spec)), in_chans=3, img_size=224, mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD)


def build_dataset(spec: str, split: str, img_size: int | None = None, is_training: bool | None = None,
                  in_chans: int | None = None, seed: int = 0, augment: bool = True, mean=None, std=None,
                  **transform_kwargs) -> Dataset:
    """The dataset ``spec`` (``'fashion-mnist'`` or an ImageNet-layout folder) for ``split``.

    Args:
        spec: ``'fashion-mnist'`` (the Debian package's IDX files) or a folder with ``train/`` and
            ``val/`` (or ``validation/``) subfolders of class folders.
        split: ``'train'``, ``'val'`` or ``'test'`` (Fashion-MNIST: val and test are the 10k test set).
        img_size: image side; Fashion-MNIST is 28 only; image folders default to 224.
        is_training: training transforms (default: ``split == 'train'``).
        in_chans: 1 reads image folders as grayscale, 3 (default) as RGB.
        seed: seed of Fashion-MNIST's augmentation (see :meth:`FashionMNIST.set_epoch`).
        augment: False turns training augmentation off (training transforms without randomness).
        mean, std: normalisation of image folders (default ImageNet's, or 0.5 for grayscale).
        **transform_kwargs: passed to ``timm.data.create_transform`` for image folders, e.g.
            ``auto_augment='rand-m9-mstd0.5-inc1'``, ``re_prob=0.25``, ``color_jitter=0.3``,
            ``interpolation='bicubic'``, ``crop_pct=0.875``.
    """
    is_training = (split == "train") if is_training is None else bool(is_training)
    if _is_fashion_mnist(spec):
        if img_size not in (None, 28):
            raise ValueError(f"Fashion-MNIST images are 28x28; got img_size={img_size}")
        if in_chans not in (None, 1):
            raise ValueError(f"Fashion-MNIST images have 1 channel; got in_chans={in_chans}")
        unknown = {k for k, v in transform_kwargs.items() if v not in (None, 0, 0.0, False)}
        if unknown:
            raise ValueError(f"transform options {sorted(unknown)} apply to image folders only; Fashion-MNIST uses "
                             f"random crop (padding 2) and horizontal flip (random erasing and mixup are applied "
                             f"on batches by slab.train)")
        return FashionMNIST("test" if split in ("val", "test") else split, train_augment=is_training and augment,
                            seed=seed)
    spec = os.fspath(spec)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"dataset {spec!r} is neither 'fashion-mnist' nor an existing image folder"
                                f"{did_you_mean(spec, FASHION_MNIST_NAMES)} (ImageNet layout: ROOT/train/CLASS/*.jpg, "
                                f"ROOT/val/CLASS/*.jpg)")
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset, create_transform
    in_chans = 3 if in_chans is None else int(in_chans)
    if in_chans not in (1, 3):
        raise ValueError(f"image folders are read as grayscale (in_chans=1) or RGB (in_chans=3); got {in_chans}")
    if mean is None:
        mean = IMAGENET_DEFAULT_MEAN if in_chans == 3 else (0.5,)
    if std is None:
        std = IMAGENET_DEFAULT_STD if in_chans == 3 else (0.5,)
    kwargs = dict(interpolation="bicubic")
    if in_chans == 1:
        kwargs["color_jitter"] = 0.0  # colour jitter needs RGB
    kwargs.update({k: v for k, v in transform_kwargs.items() if v is not None})
    transform = create_transform((in_chans, img_size or 224, img_size or 224), is_training=is_training,
                                 no_aug=not augment, mean=tuple(mean), std=tuple(std), **kwargs)
    folder = _split_folder(spec, split)
    classes = _class_map(spec)
    if split != "train":
        _check_split_classes(spec, folder, classes)
    ds = ImageDataset(folder, split=split, class_map=classes, transform=transform,
                      input_img_mode="L" if in_chans == 1 else "RGB")
    if len(ds) == 0:
        raise FileNotFoundError(f"{folder} holds no images")
    return ds
