"""COCO-format instance data for torchvision detectors: images + ``instances_<split>.json``.

Layouts found by :func:`resolve_split` under a root directory ``DIR``:

* ``DIR/<split>/*.png`` + ``DIR/annotations/instances_<split>.json`` (what ``slab data fmnist-scenes`` writes);
* COCO 2017: ``DIR/train2017`` + ``DIR/annotations/instances_train2017.json`` (``--train-split train2017``);
* ``DIR/images/<split>`` or ``DIR/instances_<split>.json`` also work.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..files import require_file

__all__ = ["CocoInstances", "resolve_split", "collate", "load_coco", "coco_problems"]


def load_coco(ann_file: str | os.PathLike, image_dir: str | os.PathLike | None = None):
    """``pycocotools.coco.COCO`` of a checked annotation file, without its prints.

    Raises :class:`UserError` naming the file and its first problems when it is not valid JSON or
    not valid COCO (see :func:`coco_problems`); pycocotools would fail later, deep in training.
    """
    try:
        from pycocotools.coco import COCO
    except ImportError as e:  # pragma: no cover - dependency message
        raise ImportError("detection needs pycocotools: pip install 'slab[detection]'") from e
    ann_file = require_file(ann_file, "COCO annotation file")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"COCO annotation file {ann_file} is not valid JSON ({e}); write it again (`slab data "
                        f"fmnist-scenes` makes a valid set)") from None
    problems = coco_problems(data, image_dir)
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UserError(f"COCO annotation file {ann_file} is not valid: {'; '.join(problems[:5])}{more}. Fix the file "
                        f"(format: https://cocodataset.org/#format-data)")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _is_box(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)
            and value[2] >= 0 and value[3] >= 0)


def _annotation_problems(i: int, ann, images: set, categories: set) -> list[str]:
    if not isinstance(ann, dict):
        return [f"annotations[{i}] is not an object"]
    missing = [k for k in ("image_id", "category_id", "bbox", "segmentation") if k not in ann]
    if missing:
        return [f"annotations[{i}] lacks {', '.join(missing)}"]
    out = []
    if ann["image_id"] not in images:
        out.append(f"annotations[{i}] refers to image_id {ann['image_id']!r}, which 'images' lacks")
    if ann["category_id"] not in categories:
        out.append(f"annotations[{i}] refers to category_id {ann['category_id']!r}, which 'categories' lacks")
    if not _is_box(ann["bbox"]):
        out.append(f"annotations[{i}] has bbox {ann['bbox']!r}; expected [x, y, width, height] with width, height >= 0")
    if not isinstance(ann["segmentation"], (list, dict)):
        out.append(f"annotations[{i}] has a segmentation that is neither polygons (a list) nor RLE (an object)")
    return out


def coco_problems(data, image_dir: str | os.PathLike | None = None) -> list[str]:
    """What makes ``data`` (a parsed annotation file) unusable for training or COCOeval; ``[]`` when nothing."""
    if not isinstance(data, dict):
        return [f"the top level is a {type(data).__name__}, not an object with images, annotations, categories"]
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        return [f"it has no {k!r} list" for k in missing]
    problems = []
    if not data["categories"]:
        problems.append("'categories' is empty")
    categories = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    images = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            problems.append(f"images[{i}] lacks id or file_name")
            continue
        images.add(im["id"])
        if image_dir is not None and not os.path.isfile(os.path.join(image_dir, im["file_name"])):
            problems.append(f"images[{i}] names {im['file_name']!r}, which {image_dir} lacks")
    for i, ann in enumerate(data["annotations"]):
        problems += _annotation_problems(i, ann, images, categories)
    return problems


def resolve_split(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """``(image_dir, annotation_file)`` of ``split`` under ``root`` (see the module docstring)."""
    root = Path(root)
    anns = [root / "annotations" / f"instances_{split}.json", root / f"instances_{split}.json"]
    dirs = [root / split, root / "images" / split, root / "images"]
    ann = next((a for a in anns if a.is_file()), None)
    img = next((d for d in dirs if d.is_dir()), None)
    if ann is None or img is None:
        raise FileNotFoundError(
            f"no COCO split '{split}' under {root}: expected an image folder ({', '.join(str(d) for d in dirs[:2])}) "
            f"and annotations ({anns[0]}). Make a small dataset with `slab data fmnist-scenes --output {root}`.")
    return img, ann


class CocoInstances(Dataset):
    """Images and instance targets of a COCO-format split, in torchvision's detection format.

    ``dataset[i] -> (image [C, H, W] float in [0, 1], target)`` with ``target`` holding ``boxes``
    (``[N, 4]`` xyxy, pixels), ``labels`` (1..K, contiguous over the sorted category ids), ``masks``
    (``[N, H, W]`` uint8), ``image_id``, ``area``, ``iscrowd``. Crowd regions and degenerate boxes are
    left out of the targets (COCOeval still sees them in the ground truth file).

    Args:
        image_dir, ann_file: the split (see :func:`resolve_split`).
        train: drop images without any usable annotation (torchvision's reference recipe) and apply
            horizontal flips with probability ``hflip``.
        in_chans: 3 (RGB) or 1 (grayscale) images.
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike, train: bool = False,
                 hflip: float = 0.5, in_chans: int = 3):
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self.image_dir = Path(image_dir)
        self.coco = load_coco(ann_file, image_dir)
        self.train = train
        self.hflip = hflip if train else 0.0
        self.in_chans = in_chans
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if any(self._usable(a) for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids

    @property
    def num_classes(self) -> int:
        """Object categories + background."""
        return len(self.cat_ids) + 1

    @property
    def class_names(self) -> list[str]:
        return [self.coco.cats[c]["name"] for c in self.cat_ids]

    @staticmethod
    def _usable(ann: dict) -> bool:
        x, y, w, h = ann["bbox"]
        return not ann.get("iscrowd", 0) and w >= 1 and h >= 1

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> torch.Tensor:
        from PIL import Image
        info = self.coco.imgs[image_id]
        with Image.open(self.image_dir / info["file_name"]) as im:
            arr = np.asarray(im.convert("RGB" if self.in_chans == 3 else "L"))
        t = torch.from_numpy(arr.copy())
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
        return t.float().div_(255.0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id = self.ids[index]
        image = self.load_image(image_id)
        h, w = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if self._usable(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        if anns:
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]))
        else:
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": masks,
            "image_id": image_id,
            "area": torch.tensor([a.get("area", 0.0) for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if self.hflip and torch.rand(()) < self.hflip:
            image = image.flip(-1)
            target["masks"] = masks.flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, target


def collate(batch: list) -> tuple[list, list]:
    """Lists of images and targets (torchvision detectors take lists of differently sized images)."""
    return tuple(zip(*batch))
