"""``slab recalibrate``: re-estimate the BatchNorm statistics of a trained checkpoint, write a new one."""
from __future__ import annotations

import os

from ..errors import positive_int_arg


def register(sub) -> None:
    p = sub.add_parser("recalibrate", help="re-estimate BN statistics of a checkpoint over training batches",
                       description="BN recalibration (as the SLAB authors do before evaluation): reset every "
                                   "BatchNorm's running statistics and re-estimate them as a cumulative average over "
                                   "N batches of training images (no augmentation), with the rest of the model frozen "
                                   "in eval mode (PRepBN layers run their RepBN branch only). Writes a new checkpoint "
                                   "atomically; the input is left as it is.")
    p.add_argument("checkpoint", help="checkpoint written by 'slab train'")
    p.add_argument("--batches", type=int, default=200, help="training batches to average over (default 200)")
    p.add_argument("--batch-size", type=positive_int_arg, default=None, help="default: the run's batch size")
    p.add_argument("--data", default=None, help="dataset (default: the run's)")
    p.add_argument("--output", default=None, help="new checkpoint (default: CHECKPOINT with suffix _recal.pt)")
    p.add_argument("--ema", action="store_true", help="also recalibrate the EMA weights")
    p.add_argument("--eval", action="store_true", help="print val top-1 before and after")
    p.add_argument("--device", default=None)
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.set_defaults(func=run)


def run(args) -> int:
    from torch.utils.data import DataLoader

    from slab.data import ShardSampler, build_dataset
    from slab.errors import check_device, check_output_file
    from slab.train import (atomic_save, build_model, evaluate, load_trained_model, recalibrate_bn,
                            recalibration_loader)
    from slab.train.task import _num_workers
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    out = args.output or os.path.splitext(args.checkpoint)[0] + "_recal.pt"
    if os.path.abspath(out) == os.path.abspath(args.checkpoint):
        raise ValueError("--output must differ from the input checkpoint (the original is kept)")
    check_output_file(out)
    device = check_device(args.device)
    model, cfg, state = load_trained_model(args.checkpoint)
    if args.data:
        cfg = cfg.replace(data=args.data)
    model.to(device)
    loader = recalibration_loader(cfg, batch_size=args.batch_size)
    val = None
    if args.eval:
        ds = build_dataset(cfg.data, "val", img_size=cfg.img_size, is_training=False)
        val = DataLoader(ds, batch_size=256, sampler=ShardSampler(len(ds)), num_workers=_num_workers(cfg))
        before = evaluate(model, val, device=device, amp=args.amp, reduce=False)
    used = recalibrate_bn(model, loader, args.batches, device=device, amp=args.amp, reduce=False)
    new = dict(state)
    new["model"] = {k: v.cpu() for k, v in model.state_dict().items()}
    if args.ema and state.get("ema") is not None:
        ema = build_model(cfg)
        ema.load_state_dict(state["ema"])
        ema.to(device)
        recalibrate_bn(ema, loader, args.batches, device=device, amp=args.amp, reduce=False)
        new["ema"] = {k: v.cpu() for k, v in ema.state_dict().items()}
    new["recalibrated"] = {"batches": used, "batch_size": args.batch_size or cfg.batch_size, "data": cfg.data,
                           "source": os.path.abspath(args.checkpoint)}
    atomic_save(new, out)
    msg = f"slab recalibrate: BN statistics re-estimated over {used} batches; wrote {out}"
    if val is not None:
        after = evaluate(model, val, device=device, amp=args.amp, reduce=False)
        msg += f"; val top-1 {before['top1']:.2f} -> {after['top1']:.2f}"
    print(msg)
    return 0
