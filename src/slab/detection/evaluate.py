"""COCO box and mask mAP with pycocotools' COCOeval."""
from __future__ import annotations

import contextlib
import io
from typing import Iterable

import numpy as np
import torch

__all__ = ["STAT_NAMES", "encode_masks", "to_coco_results", "coco_evaluate", "evaluate"]

#: The first six COCOeval statistics (AP over IoU 0.5:0.95, at 0.5, at 0.75, small, medium, large).
STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


def encode_masks(masks: torch.Tensor, threshold: float = 0.5) -> list[dict]:
    """``[N, H, W]`` (or ``[N, 1, H, W]``) probabilities or 0/1 -> compressed RLEs with JSON-ready ``counts``."""
    from pycocotools import mask as mask_util
    if masks.dim() == 4:
        masks = masks[:, 0]
    binary = (masks > threshold).to(torch.uint8).cpu().numpy()
    if binary.shape[0] == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def to_coco_results(outputs: Iterable[dict], image_ids: Iterable[int], label_to_cat: dict[int, int],
                    mask_threshold: float = 0.5) -> tuple[list[dict], list[dict]]:
    """torchvision detector outputs -> (box results, mask results) in COCO's result format.

    Boxes go ``xyxy -> xywh``; labels map back to category ids; masks are thresholded and RLE-encoded.
    """
    boxes_out, masks_out = [], []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().cpu().double()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = out["scores"].detach().cpu().tolist()
        cats = [label_to_cat[int(label)] for label in out["labels"].cpu().tolist()]
        for box, score, cat in zip(xywh, scores, cats):
            boxes_out.append({"image_id": int(image_id), "category_id": cat, "bbox": box, "score": float(score)})
        if "masks" in out:
            for rle, score, cat in zip(encode_masks(out["masks"], mask_threshold), scores, cats):
                masks_out.append({"image_id": int(image_id), "category_id": cat, "segmentation": rle,
                                  "score": float(score)})
    return boxes_out, masks_out


def coco_evaluate(coco_gt, results: list[dict], iou_type: str, image_ids: list[int] | None = None
                  ) -> tuple[dict[str, float], str]:
    """COCOeval of ``results`` against ``coco_gt`` (``'bbox'`` or ``'segm'``): (metrics, printed summary).

    No results at all gives 0 for every metric (pycocotools cannot load an empty result list).
    """
    from pycocotools.cocoeval import COCOeval
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if not results:
        return {name: 0.0 for name in STAT_NAMES}, f"{iou_type}: no detections\n"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats[:6])}, buf.getvalue()


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, device: str | torch.device = "cpu", batch_size: int = 2,
             num_workers: int = 0, log=None) -> dict:
    """Box and mask mAP of ``model`` on a :class:`slab.detection.data.CocoInstances` split.

    Returns ``{"bbox": {...}, "segm": {...}, "summary": str, "images": n, "seconds": t}``.
    """
    import time

    from torch.utils.data import DataLoader

    from .data import collate
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    boxes, masks, ids = [], [], []
    start = time.perf_counter()
    for images, targets in loader:
        outputs = model([im.to(device) for im in images])
        image_ids = [t["image_id"] for t in targets]
        b, m = to_coco_results(outputs, image_ids, dataset.label_to_cat)
        boxes += b
        masks += m
        ids += image_ids
    seconds = time.perf_counter() - start
    box_metrics, box_text = coco_evaluate(dataset.coco, boxes, "bbox", ids)
    mask_metrics, mask_text = coco_evaluate(dataset.coco, masks, "segm", ids)
    model.train(was_training)
    return {"bbox": box_metrics, "segm": mask_metrics, "summary": f"bbox\n{box_text}segm\n{mask_text}",
            "images": len(ids), "seconds": seconds}
