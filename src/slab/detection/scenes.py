"""A real COCO-format instance segmentation dataset made from Fashion-MNIST items.

Each scene is a ``canvas x canvas`` RGB image with a dark, noisy background and 1..``max_items``
Fashion-MNIST items (real photographs from the Debian package ``dataset-fashion-mnist``), each scaled,
tinted and pasted at a random place. An item's mask is its pixels above a threshold; later items
occlude earlier ones, and a placement is rejected when it would hide too much of an item already
there, so every visible object is annotated. Train scenes use the Fashion-MNIST training split, val
scenes its test split (no item is shared).

Output (COCO layout)::

    DIR/train/000000.png ...            DIR/annotations/instances_train.json
    DIR/val/000000.png ...              DIR/annotations/instances_val.json

with ``segmentation`` as compressed RLE, ``bbox`` ``[x, y, w, h]`` of the visible mask, ``area`` its
pixel count, ``iscrowd`` 0, and the 10 Fashion-MNIST classes as categories 1..10.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FashionMNIST

__all__ = ["FASHION_MNIST_CLASSES", "load_fashion_mnist", "SceneConfig", "compose_scene", "write_coco_split",
           "make_fmnist_scenes"]


def load_fashion_mnist(split: str = "train", root: str | os.PathLike = FASHION_MNIST_DIR
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(images ``[N, 28, 28]`` uint8, labels ``[N]``) of the ``'train'`` or ``'test'`` split (:mod:`slab.data`)."""
    data = FashionMNIST(split, root=root)
    return data.images.numpy(), data.targets.numpy()


@dataclass
class SceneConfig:
    """How scenes are composed.

    canvas: image side in pixels. max_items: up to this many items per scene (at least 1).
    min_scale, max_scale: item side = 28 * scale. threshold: item pixel values (0..255) above it are the mask.
    min_visible: fraction of an item that must stay visible when later items are placed.
    """
    canvas: int = 128
    max_items: int = 4
    min_scale: float = 1.0
    max_scale: float = 2.0
    threshold: int = 25
    min_visible: float = 0.6

    def __post_init__(self):
        if self.canvas < 32:
            raise ValueError(f"canvas must be at least 32 pixels, got {self.canvas}")
        if not 1 <= self.max_items:
            raise ValueError(f"max_items must be >= 1, got {self.max_items}")
        if not 0 < self.min_scale <= self.max_scale or 28 * self.max_scale > self.canvas:
            raise ValueError(f"scales must satisfy 0 < min_scale <= max_scale and 28 * max_scale <= canvas "
                             f"({self.canvas}); got {self.min_scale}, {self.max_scale}")


def _resize(item: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR))


def compose_scene(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: SceneConfig
                  ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One scene: (RGB image ``[S, S, 3]`` uint8, [(class index 0..9, visible mask ``[S, S]`` bool), ...])."""
    s = cfg.canvas
    base = rng.uniform(0, 40)
    canvas = np.clip(base + rng.normal(0, 6, size=(s, s, 3)), 0, 255)
    objects: list[list] = []  # [label, visible mask, full area]
    for _ in range(int(rng.integers(1, cfg.max_items + 1))):
        k = int(rng.integers(len(images)))
        side = int(round(28 * rng.uniform(cfg.min_scale, cfg.max_scale)))
        item = _resize(images[k], side)
        mask = item > cfg.threshold
        if mask.sum() < 16:
            continue
        for _try in range(20):
            y, x = (int(v) for v in rng.integers(0, s - side + 1, size=2))
            full = np.zeros((s, s), dtype=bool)
            full[y:y + side, x:x + side] = mask
            if all((obj[1] & ~full).sum() >= cfg.min_visible * obj[2] for obj in objects):
                break
        else:
            continue
        tint = rng.uniform(0.55, 1.0, size=3)
        patch = canvas[y:y + side, x:x + side]
        patch[mask] = item[mask][:, None] * tint
        for obj in objects:
            obj[1] &= ~full
        objects.append([int(labels[k]), full, int(full.sum())])
    return canvas.astype(np.uint8), [(obj[0], obj[1]) for obj in objects]


def _annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict:
    from pycocotools import mask as mask_util
    ys, xs = np.nonzero(mask)
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": rle,
            "area": int(mask.sum()), "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                               int(ys.max() - ys.min() + 1)], "iscrowd": 0}


def write_coco_split(output: str | os.PathLike, split: str, num_images: int, images: np.ndarray,
                     labels: np.ndarray, cfg: SceneConfig, seed: int = 0) -> Path:
    """Compose ``num_images`` scenes, write ``output/<split>/*.png`` and ``output/annotations/instances_<split>.json``."""
    from PIL import Image
    output = Path(output)
    img_dir = output / split
    img_dir.mkdir(parents=True, exist_ok=True)
    (output / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coco = {
        "info": {"description": f"Fashion-MNIST scenes ({split}), made by `slab data fmnist-scenes`",
                 "version": "1.0", "contributor": "slab; items from Fashion-MNIST (Zalando Research, MIT licence)"},
        "licenses": [{"id": 1, "name": "MIT", "url": "https://github.com/zalandoresearch/fashion-mnist"}],
        "images": [], "annotations": [],
        "categories": [{"id": i + 1, "name": n, "supercategory": "fashion"} for i, n in enumerate(FASHION_MNIST_CLASSES)],
    }
    ann_id = 1
    for image_id in range(1, num_images + 1):
        image, objects = compose_scene(images, labels, rng, cfg)
        name = f"{image_id:06d}.png"
        Image.fromarray(image).save(img_dir / name)
        coco["images"].append({"id": image_id, "file_name": name, "width": cfg.canvas, "height": cfg.canvas,
                               "license": 1})
        for label, mask in objects:
            if mask.any():
                coco["annotations"].append(_annotation(mask, ann_id, image_id, label + 1))
                ann_id += 1
    ann_file = output / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps(coco))
    return ann_file


def make_fmnist_scenes(output: str | os.PathLike, num_train: int, num_val: int, cfg: SceneConfig | None = None,
                       seed: int = 0, root: str | os.PathLike = FASHION_MNIST_DIR) -> dict[str, Path]:
    """Write the train and val splits (train scenes from Fashion-MNIST's training items, val from its test items)."""
    cfg = cfg or SceneConfig()
    out = {}
    for split, source, n, s in (("train", "train", num_train, seed), ("val", "test", num_val, seed + 1)):
        if n <= 0:
            continue
        images, labels = load_fashion_mnist(source, root)
        out[split] = write_coco_split(output, split, n, images, labels, cfg, seed=s)
    return out
