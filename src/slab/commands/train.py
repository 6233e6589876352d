"""``slab train``: train a registered model on Fashion-MNIST or an ImageNet-layout folder.

One process: ``slab train --model slab_deit_nano_patch4_28 --data fashion-mnist --max-steps 2000
--batch-size 128 --seed 0 --output runs/nano``. Many: the same arguments after
``torchrun --nproc_per_node N -m slab train`` (DDP). Values of ``--config YAML`` are defaults that
the flags override; every field of :class:`slab.train.TrainConfig` has a flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from ..errors import parse_json_object

_HELP = {
    "model": "registered model name (slab models)",
    "model_kwargs": "JSON of extra model arguments, e.g. '{\"norm\": \"ln\", \"attn\": \"softmax\"}'",
    "data": "'fashion-mnist' or an ImageNet-layout folder (ROOT/train/CLASS/*, ROOT/val/CLASS/*)",
    "img_size": "input side (image folders; default the model's)",
    "max_steps": "optimizer steps of the run (or give --epochs)",
    "epochs": "length of the run in epochs (when --max-steps is not given)",
    "batch_size": "per-process micro-batch; global batch = batch-size x grad-accum x processes",
    "grad_accum": "micro-batches per optimizer step (the LR and PRepBN schedules count optimizer steps)",
    "opt": "timm optimizer name",
    "lr": "learning rate (or base LR when --lr-base-batch is set)",
    "lr_base_batch": "scale lr by global_batch / this (DeiT: 512)",
    "weight_decay": "weight decay (not on norms, biases, positional encodings, RepBN alpha)",
    "betas": "Adam betas, two floats",
    "min_lr": "final LR of the cosine schedule",
    "warmup_lr": "LR at the start of the warm-up",
    "lr_warmup": "LR warm-up: steps (int), fraction of the run (float) or epochs ('5ep')",
    "prepbn_warmup": "PRepBN LN-only steps: steps, fraction or 'Nep'",
    "prepbn_transition": "PRepBN LN->BN transition length T: steps (int), fraction (float, default 0.8) or 'Nep'",
    "clip_grad": "clip the global gradient norm to this",
    "label_smoothing": "label smoothing",
    "mixup": "mixup alpha (0 = off)",
    "cutmix": "cutmix alpha (0 = off)",
    "mixup_prob": "probability of applying mixup or cutmix to a batch",
    "mixup_switch_prob": "probability of cutmix instead of mixup when both are on",
    "auto_augment": "timm auto-augment policy for image folders, e.g. rand-m9-mstd0.5-inc1 (RandAugment)",
    "reprob": "random erasing probability",
    "color_jitter": "colour jitter (image folders)",
    "drop_path": "stochastic depth rate",
    "augment": "training augmentation (--no-augment turns crop/flip/... off)",
    "ema": "keep an EMA of the weights (timm ModelEmaV3) and evaluate it too",
    "ema_decay": "EMA decay per optimizer step",
    "amp": "autocast dtype: none, bf16 or fp16 (SLA's normaliser stays float32)",
    "sync_bn": "SyncBatchNorm across processes (GPUs; for small per-device batches)",
    "device": "cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available, else cpu)",
    "num_workers": "data loader workers (default 0 for Fashion-MNIST, 8 for folders)",
    "threads": "torch CPU threads per process (0: torch's default)",
    "seed": "seed of initialisation, data order and augmentation",
    "output": "run folder: metrics.jsonl, config.yaml, checkpoints/",
    "resume": "'auto' (newest valid checkpoint of --output, if any) or a checkpoint file",
    "eval_every": "evaluate every N optimizer steps (0: only at the end)",
    "eval_batch_size": "evaluation batch (default 2 x batch-size)",
    "eval_max_batches": "evaluate on at most N batches per process (default: the whole split)",
    "save_every": "checkpoint every N optimizer steps (0: only at the end)",
    "keep_last": "periodic checkpoints kept (best.pt is kept besides)",
    "log_every": "print / update the progress bar every N steps",
    "progress": "tqdm progress bar (--no-progress prints a line every --log-every steps)",
    "recalibrate_batches": "after training, re-estimate BN statistics over N training batches",
    "stop_at_step": "stop after this step with a checkpoint, as if pre-empted (resume with --resume auto)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_config_arguments(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field, all defaulting to 'not given' (so YAML values survive)."""
    from slab.train.config import AMP_CHOICES, TrainConfig, parse_amount
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        tp = hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw: dict = dict(default=argparse.SUPPRESS,
                        help=_HELP.get(f.name, "") + (f" [default: {default}]" if default not in (None, {}) else ""))
        if f.name in ("lr_warmup", "prepbn_warmup", "prepbn_transition"):
            kw["type"] = parse_amount
        elif f.name == "model_kwargs":
            kw["type"] = str  # parsed in config_from_args, so a bad value reads like every other bad setting
        elif f.name == "betas":
            kw.update(type=float, nargs=2)
        elif f.name == "amp":
            kw["choices"] = AMP_CHOICES
        elif _base_type(tp) is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _base_type(tp)
        p.add_argument(_flag(f.name), dest=f.name, **kw)


def config_from_args(args: argparse.Namespace):
    """TrainConfig defaults < ``--config`` YAML < flags."""
    from slab.train import TrainConfig
    from slab.train.config import load_yaml
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k in TrainConfig.field_names()})
    if isinstance(values.get("model_kwargs"), str):
        values["model_kwargs"] = parse_json_object(values["model_kwargs"], "--model-kwargs")
    return TrainConfig.from_dict(values)


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (one process, or many under torchrun)",
                       description="Train a registered model with AdamW + cosine LR, the PRepBN schedule (driven by "
                                   "optimizer steps), timm augmentation, EMA, AMP, gradient accumulation, atomic "
                                   "checkpoints and exact resumption. Multi-process: torchrun --nproc_per_node N "
                                   "-m slab train ... (gloo on CPU, NCCL on GPU). See docs/training.md.")
    p.add_argument("--config", default=None,
                   help="YAML of TrainConfig fields (a file, or a packaged name: slab train --list-configs)")
    p.add_argument("--list-configs", action="store_true", help="list the packaged configs and exit")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from slab.train import NonFiniteLossError, train
    from slab.train.config import list_configs
    if args.list_configs:
        for name in list_configs():
            print(name)
        return 0
    cfg = config_from_args(args)
    try:
        result = train(cfg)
    except NonFiniteLossError as e:
        print(f"slab train: {e}", file=sys.stderr)
        return 3
    if result.stopped_early:
        print(f"slab train: stopped at step {result.steps}/{result.total_steps}; checkpoint {result.last_checkpoint}",
              file=sys.stderr)
        return 0
    final = result.final
    msg = f"slab train: {result.steps} steps in {result.elapsed_s:.1f}s; top-1 {final.get('top1', float('nan')):.2f}"
    if "ema_top1" in final:
        msg += f" (EMA {final['ema_top1']:.2f})"
    if result.last_checkpoint:
        msg += f"; checkpoint {result.last_checkpoint}"
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg)
    return 0
