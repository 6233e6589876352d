"""``slab eval``: top-1 and loss of a trained checkpoint on a dataset split."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("eval", help="top-1 of a checkpoint on a dataset split",
                       description="Evaluate a checkpoint written by 'slab train' (or, with --model, a plain weights "
                                   "file) on the val/test or train split of a dataset.")
    p.add_argument("checkpoint", help="checkpoint file (runs/x/checkpoints/step_*.pt, best.pt, ...)")
    p.add_argument("--data", default=None, help="dataset (default: the one the run trained on)")
    p.add_argument("--split", default="val", choices=("val", "test", "train"), help="split (default val)")
    p.add_argument("--model", default=None, help="registered model, for a plain weights file (not a training checkpoint)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-batches", type=int, default=None, help="stop after N batches")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def load_for_eval(args):
    """``(model, TrainConfig)`` of ``args.checkpoint`` (a training checkpoint, or weights with --model)."""
    from slab.train import TrainConfig, build_model, load_trained_model
    if args.model is None:
        model, cfg, _ = load_trained_model(args.checkpoint, use_ema=args.ema)
        changes = {k: v for k, v in (("data", args.data), ("img_size", args.img_size),
                                     ("num_workers", args.num_workers)) if v is not None}
        return model, cfg.replace(**changes) if changes else cfg
    if args.data is None:
        raise ValueError("give --data with --model (a plain weights file does not say what it was trained on)")
    from slab.models import read_checkpoint
    from slab.models._builder import load_checkpoint_strict
    cfg = TrainConfig(model=args.model, data=args.data, img_size=args.img_size, max_steps=1,
                      num_workers=args.num_workers)
    model = build_model(cfg)
    load_checkpoint_strict(model, read_checkpoint(args.checkpoint), args.model)
    return model.eval(), cfg


def run(args) -> int:
    import torch
    from torch.utils.data import DataLoader

    from slab.data import build_dataset
    from slab.train import evaluate
    from slab.train.loop import _num_workers
    model, cfg = load_for_eval(args)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    ds = build_dataset(cfg.data, args.split, img_size=cfg.img_size, is_training=False)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=_num_workers(cfg))
    r = evaluate(model, loader, device=device, amp=args.amp, max_batches=args.max_batches, reduce=False)
    r.update(checkpoint=args.checkpoint, data=cfg.data, split=args.split, ema=bool(args.ema), model=cfg.model)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{cfg.model} on {cfg.data} {args.split} ({r['n']} images): top-1 {r['top1']:.2f}  loss {r['loss']:.4f}")
    return 0
