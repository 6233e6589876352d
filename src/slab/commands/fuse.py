"""``slab fuse``: fold every norm of a trained model, verify, and write the deploy checkpoint.

    slab fuse --model slab_deit_nano_patch4_28 --checkpoint run/best.pth --output deploy/nano.safetensors \\
        --verify-data fashion-mnist

Loads the model (``slab.create_model(name, pretrained_file=...)``), fuses it (``slab.fuse``), checks
fused == unfused on random inputs (and, with ``--verify-data``, on a dataset's test split), writes the
fused state dict as safetensors plus a JSON sidecar (atomically: temporary file + rename, nothing is
written when verification fails) and prints a fusion report: latency of the unfused and fused
models next to the LayerNorm form and the norm-free bound of the same architecture.
``slab.create_model(name, deploy=True, pretrained_file=OUT)`` (or ``slab.reparam.export.load_fused``)
loads the result.
"""
from __future__ import annotations

import argparse
import warnings

from ..errors import check_output_file, parse_json_object, positive_int_arg


# ---------------------------------------------------------------- helpers shared by fuse/export/verify
def add_model_arguments(p: argparse.ArgumentParser, checkpoint_required: bool = False) -> None:
    p.add_argument("--model", required=True, help="registered model name (see `slab models`)")
    p.add_argument("--checkpoint", required=checkpoint_required, default=None,
                   help="trained checkpoint (.pth/.safetensors, ours or the authors')")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON",
                   help='architecture overrides as JSON, e.g. \'{"num_classes": 10, "img_size": 160}\'')


def parse_model_kwargs(text: str) -> dict:
    """``--model-kwargs`` JSON as constructor arguments (JSON lists become the tuples constructors take)."""
    kwargs = parse_json_object(text, "--model-kwargs")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def input_shape_of(model, img_size: int | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` a model expects: its pretrained config, or ``img_size`` when given."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (getattr(model, "in_chans", 3), 224, 224))
    c = getattr(model, "in_chans", c)
    img = getattr(model, "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2:
        h, w = img
    if img_size:
        h = w = int(img_size)
    return int(c), int(h), int(w)


def random_batches(shape: tuple[int, int, int], batch: int, count: int, seed: int = 0) -> list:
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for _ in range(count)]


def dataset_batches(spec: str, batch: int, limit: int | None = None):
    """Images of ``spec``'s test split (labels dropped), ``batch`` at a time."""
    from torch.utils.data import DataLoader

    from ..data import build_dataset
    ds = build_dataset(spec, "test")
    seen = 0
    for images, _ in DataLoader(ds, batch_size=batch, shuffle=False):
        if limit is not None:
            if seen >= limit:
                break
            images = images[:limit - seen]
        seen += images.shape[0]
        yield images


def format_ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f} ms"


# ---------------------------------------------------------------- command
def register(sub) -> None:
    p = sub.add_parser("fuse", help="fold every norm into its neighbours, verify, write a deploy checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, checkpoint_required=True)
    p.add_argument("--output", required=True, help="fused checkpoint to write (.safetensors; a .json sidecar is "
                                                   "written next to it)")
    p.add_argument("--verify-data", default=None, metavar="DATASET",
                   help="also verify on this dataset's test split ('fashion-mnist' or an image folder)")
    p.add_argument("--verify-limit", type=int, default=None, help="at most this many dataset images")
    p.add_argument("--verify-batches", type=positive_int_arg, default=4,
                   help="random input batches to verify on (default 4)")
    p.add_argument("--batch-size", type=positive_int_arg, default=8, help="batch size of the verification (default 8)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="max relative error max|fused-unfused|/max|unfused| accepted (default 1e-4)")
    p.add_argument("--latency-batch", type=positive_int_arg, default=1,
                   help="batch size of the latency report (default 1)")
    p.add_argument("--latency-repeats", type=positive_int_arg, default=20,
                   help="interleaved rounds per model (default 20)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency report")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    import slab
    from ..bench.latency import count_params, model_latency
    from ..bench.models import build_norm_form
    from ..reparam.export import compare_outputs, save_fused
    from ..reparam.fuse import default_statistics_paths

    kwargs = parse_model_kwargs(args.model_kwargs)
    check_output_file(args.output, suffixes=(".safetensors",))
    model = slab.create_model(args.model, pretrained_file=args.checkpoint, **kwargs).eval()
    stale = default_statistics_paths(model)
    if stale:
        print(f"warning: {len(stale)} BatchNorm layer(s) still have their initial statistics (e.g. {stale[0]}): "
              f"was the model trained/recalibrated (`slab recalibrate`)?")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported above
        fused = slab.fuse(model)
    shape = input_shape_of(model, args.img_size)

    checks = {"random": compare_outputs(model, fused, random_batches(shape, args.batch_size, args.verify_batches))}
    if args.verify_data:
        checks[args.verify_data] = compare_outputs(model, fused, dataset_batches(args.verify_data, 256,
                                                                                 args.verify_limit))
    print(f"== {args.model}: fused vs unfused (float32, eval)")
    ok = True
    for name, c in checks.items():
        good = c["max_rel"] <= args.rtol
        ok &= good
        print(f"  {name:14s} {c['n']:6d} images  max|diff| {c['max_abs']:.3e}  relative {c['max_rel']:.3e}  "
              f"argmax differs on {c['argmax_disagree']}  {'OK' if good else 'FAILED'}")
    if not ok:
        raise ValueError(f"fused model differs from the unfused one beyond --rtol {args.rtol:g}; nothing written")

    meta = save_fused(fused, args.output, args.model, kwargs,
                      extra={"source_checkpoint": str(args.checkpoint), "verification": checks})
    print(f"wrote {args.output} (+ {args.output[:-len('.safetensors')]}.json): load with "
          f"slab.create_model({args.model!r}, deploy=True, pretrained_file=..., **kwargs) or "
          f"slab.reparam.export.load_fused(path)")

    if not args.no_latency:
        forms = {"LN form": "ln", "norm-free bound": "none"}
        models = {"unfused": model, "fused": fused}
        for label, norm in forms.items():
            try:
                models[label] = build_norm_form(args.model, norm, **kwargs).eval()
            except (TypeError, ValueError) as e:
                print(f"  ({label} not available for {args.model}: {e})")
        x = torch.randn(args.latency_batch, *shape)
        t = model_latency(models, x, repeats=args.latency_repeats, max_time=60)
        base_ln = t["LN form"].robust if "LN form" in t else None
        base_bound = t["norm-free bound"].robust if "norm-free bound" in t else None
        print(f"== latency, batch {args.latency_batch}, {tuple(shape)} input, {torch.get_num_threads()} threads "
              f"(20th percentile of {args.latency_repeats} interleaved rounds)")
        print(f"  {'model':16s} {'params':>10s} {'latency':>12s} {'vs LN':>7s} {'vs bound':>9s}")
        for name, m in models.items():
            r = t[name].robust
            vs_ln = f"{r / base_ln:7.3f}" if base_ln else "      -"
            vs_b = f"{r / base_bound:9.3f}" if base_bound else "        -"
            print(f"  {name:16s} {count_params(m):10,d} {format_ms(r):>12s} {vs_ln} {vs_b}")
    return 0
