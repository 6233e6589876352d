"""``slab train-det``: train and evaluate Mask R-CNN with a SLAB backbone on COCO-format data."""
from __future__ import annotations

import sys

from ..errors import positive_int_arg


def register(sub) -> None:
    p = sub.add_parser("train-det", help="train/evaluate Mask R-CNN + FPN with a SLAB backbone (COCO box/mask mAP)",
                       description="Train Mask R-CNN (torchvision) with a SLAB backbone on COCO-format data "
                                   "(images + annotations/instances_<split>.json) and report COCO box and mask mAP. "
                                   "Settings: the defaults are the paper's 1x schedule (configs/det_maskrcnn_1x.yaml); "
                                   "a --config file, then the options below, then --set key=value override them. "
                                   "Under torchrun, each process trains on its shard (DDP).")
    p.add_argument("--config", help="YAML settings file (e.g. configs/det_fmnist_demo.yaml, or a bare name in configs/)")
    p.add_argument("--backbone", help="registered model name (see `slab models`)")
    p.add_argument("--data", help="COCO-format folder (see `slab data fmnist-scenes`)")
    p.add_argument("--pretrained", help="ImageNet checkpoint for the backbone (ours or the authors' .pth)")
    p.add_argument("--prepbn", choices=["frozen", "continue"], help="PRepBN during detection training")
    p.add_argument("--epochs", type=positive_int_arg)
    p.add_argument("--max-steps", type=positive_int_arg, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=positive_int_arg, help="images per step per process")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--trainable-layers", type=int, help="0..5 backbone stages trained, from the top (5: all)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--num-workers", type=int, help="data loading processes")
    p.add_argument("--output", help="output folder (metrics.jsonl, checkpoints/, model.pth, metrics.json, log.txt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, YAML value (e.g. --set min_size=[96,128] --set backbone_kwargs={depth:4})")
    from ..engine.cli import add_run_arguments
    add_run_arguments(p, skip=("max_steps", "output"))
    p.add_argument("--eval-only", metavar="MODEL_PTH", help="evaluate a saved detector on the val split")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..detection.config import load_config, parse_override
    overrides = {k: getattr(args, k) for k in ("backbone", "data", "pretrained", "prepbn", "epochs", "max_steps",
                                                "batch_size", "lr", "weight_decay", "trainable_layers", "device",
                                                "num_workers", "output")}
    cfg = load_config(args.config, overrides)
    for item in args.set:
        key, value = parse_override(item)
        from ..detection.config import merge_config
        cfg = merge_config(cfg, {key: value}, f"--set {item}")
    from ..detection.engine import train_detector
    from ..engine import NonFiniteLossError
    try:
        train_detector(cfg, resume=args.resume, eval_only=args.eval_only, save_every=args.save_every or 0,
                       stop_at_step=args.stop_at_step, threads=args.threads)
    except NonFiniteLossError as e:
        print(f"slab train-det: {e}", file=sys.stderr)
        return 3
    return 0
