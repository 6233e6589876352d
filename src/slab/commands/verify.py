"""``slab verify``: check deploy artifacts against the model they came from.

    slab verify --model slab_deit_nano_patch4_28 --checkpoint run/best.pth \\
        --fused deploy/nano.safetensors --onnx deploy/nano.onnx --data fashion-mnist

The reference is the unfused model (``--model`` + ``--checkpoint``), or the fused checkpoint itself
when no checkpoint is given. Each candidate (the fused checkpoint, or ``slab.fuse`` of the reference
when ``--fused`` is absent; the ONNX file in ONNX Runtime) is compared on random inputs and, with
``--data``, on a dataset's test split: max absolute and relative error, and how many predicted classes
differ. Exit status 1 when a candidate is off by more than ``--rtol`` (relative, PyTorch candidates)
or ``--atol`` (absolute, ONNX).
"""
from __future__ import annotations

import argparse

from ..errors import positive_int_arg


def register(sub) -> None:
    p = sub.add_parser("verify", help="compare fused / ONNX deploy artifacts with the original model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="registered model name of the reference")
    p.add_argument("--checkpoint", default=None, help="trained (unfused) checkpoint of the reference")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON", help="architecture overrides as JSON")
    p.add_argument("--fused", default=None, metavar="PATH", help="fused checkpoint written by `slab fuse`")
    p.add_argument("--onnx", default=None, metavar="PATH", help="ONNX file written by `slab export`")
    p.add_argument("--data", default=None, metavar="DATASET", help="also compare on this dataset's test split")
    p.add_argument("--limit", type=int, default=None, help="at most this many dataset images")
    p.add_argument("--batches", type=positive_int_arg, default=4, help="random input batches (default 4)")
    p.add_argument("--batch-size", type=positive_int_arg, default=8)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-4)
    p.set_defaults(func=run)


def run(args) -> int:
    import warnings

    import slab
    from ..reparam.export import OnnxRuntimeModel, compare_outputs, load_fused, read_sidecar
    from ..files import require_file
    from .fuse import dataset_batches, input_shape_of, parse_model_kwargs, random_batches

    kwargs = parse_model_kwargs(args.model_kwargs)
    for flag, path in (("--checkpoint", args.checkpoint), ("--fused", args.fused), ("--onnx", args.onnx)):
        if path is not None:
            require_file(path, flag)  # before minutes of loading the others
    if args.fused and args.model is None:
        meta = read_sidecar(args.fused)
        args.model = meta["model"]
        kwargs = {**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("kwargs", {}).items()}, **kwargs}
    if args.model is None:
        raise ValueError("give --model (with --checkpoint) or --fused")
    if args.checkpoint is None and args.fused is None:
        raise ValueError("nothing to verify against: give --checkpoint (the trained model) and/or --fused")
    if args.checkpoint is not None:
        reference = slab.create_model(args.model, pretrained_file=args.checkpoint, **kwargs).eval()
        ref_label = f"{args.model} (unfused, {args.checkpoint})"
    else:
        reference = load_fused(args.fused)
        ref_label = f"{args.fused} (fused)"
    candidates = {}
    if args.fused and args.checkpoint is not None:
        candidates["fused checkpoint"] = (load_fused(args.fused, **kwargs), "rel")
    elif args.checkpoint is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            candidates["slab.fuse(model)"] = (slab.fuse(reference), "rel")
    if args.onnx:
        candidates["ONNX Runtime"] = (OnnxRuntimeModel(args.onnx), "abs")
    if not candidates:
        raise ValueError("nothing to verify: give --onnx, or --checkpoint with/without --fused")

    shape = input_shape_of(reference, args.img_size)
    print(f"reference: {ref_label}")
    ok = True
    for label, (candidate, kind) in candidates.items():
        sources = {"random": random_batches(shape, args.batch_size, args.batches)}
        if args.data:
            sources[args.data] = dataset_batches(args.data, 64, args.limit)
        for src, batches in sources.items():
            c = compare_outputs(reference, candidate, batches)
            err, tol = (c["max_rel"], args.rtol) if kind == "rel" else (c["max_abs"], args.atol)
            good = err <= tol
            ok &= good
            print(f"  {label:18s} {src:14s} {c['n']:6d} images  max|diff| {c['max_abs']:.3e}  relative "
                  f"{c['max_rel']:.3e}  argmax differs on {c['argmax_disagree']}  {'OK' if good else 'FAILED'}")
    print("all checks passed" if ok else "verification FAILED")
    return 0 if ok else 1
