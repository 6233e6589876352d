"""``slab eval``: top-1 and loss of a trained checkpoint on a dataset split."""
from __future__ import annotations

import json

from ..errors import UserError, positive_int_arg


def register(sub) -> None:
    p = sub.add_parser("eval", help="top-1 of a checkpoint on a dataset split",
                       description="Evaluate a checkpoint written by 'slab train' (or, with --model, a plain weights "
                                   "file) on the val/test or train split of a dataset.")
    p.add_argument("checkpoint", help="checkpoint file (runs/x/checkpoints/step_*.pt, best.pt, ...)")
    p.add_argument("--data", default=None, help="dataset (default: the one the run trained on)")
    p.add_argument("--split", default="val", choices=("val", "test", "train"), help="split (default val)")
    p.add_argument("--model", default=None, help="registered model, for a plain weights file (not a training checkpoint)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--batch-size", type=positive_int_arg, default=256)
    p.add_argument("--max-batches", type=positive_int_arg, default=None, help="stop after N batches")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def load_for_eval(args):
    """``(model, TrainConfig)`` of ``args.checkpoint``: a training checkpoint, weights with --model, or a fused file."""
    from slab.files import is_fused_checkpoint, require_file
    from slab.train import TrainConfig, build_model, load_trained_model
    require_file(args.checkpoint, "checkpoint")
    if is_fused_checkpoint(args.checkpoint):
        return _load_fused_for_eval(args)
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


def _load_fused_for_eval(args):
    from slab.reparam.export import load_fused, read_sidecar
    from slab.train import TrainConfig
    if args.data is None:
        raise UserError(f"{args.checkpoint} is a fused deploy checkpoint (written by `slab fuse`), which does not "
                        f"record its dataset: give --data (e.g. --data fashion-mnist)")
    if args.ema:
        raise UserError(f"{args.checkpoint} is a fused deploy checkpoint: it holds one set of weights, no EMA; "
                        f"drop --ema (fuse the EMA weights of the run to evaluate them)")
    name = read_sidecar(args.checkpoint)["model"]
    if args.model not in (None, name):
        raise UserError(f"{args.checkpoint} is a fused checkpoint of {name!r}, not of --model {args.model!r}: "
                        f"drop --model (the file names its model)")
    cfg = TrainConfig(model=name, data=args.data, img_size=args.img_size, max_steps=1, num_workers=args.num_workers)
    return load_fused(args.checkpoint), cfg


def run(args) -> int:
    from torch.utils.data import DataLoader

    from slab.data import build_dataset
    from slab.errors import check_device
    from slab.train import evaluate
    from slab.train.task import _num_workers
    device = check_device(args.device)
    model, cfg = load_for_eval(args)
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
