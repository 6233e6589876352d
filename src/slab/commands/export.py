"""``slab export``: fuse a model and export it to ONNX, checked end to end.

    slab export --model slab_deit_tiny_patch16_224 --checkpoint slab_deit_tiny.pth --output deit.onnx
    slab export --fused deploy/nano.safetensors --output nano.onnx

Fuses first (or loads a checkpoint written by ``slab fuse``), exports with the ``torch.export``-based
ONNX exporter (the TorchScript exporter only as a fallback), checks the graph with ``onnx.checker``,
refuses to finish if a normalization or ``Sqrt`` node remains, runs it in ONNX Runtime and compares
with PyTorch (max abs diff, default 1e-4; at two batch sizes when the batch is dynamic). The ``.onnx``
is written only when every check passed.
"""
from __future__ import annotations

import argparse

from ..errors import positive_int_arg


def register(sub) -> None:
    p = sub.add_parser("export", help="fuse and export to ONNX, checked with onnx.checker and ONNX Runtime",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registered model name (with --checkpoint, or random weights without)")
    src.add_argument("--fused", metavar="PATH", help="a fused checkpoint written by `slab fuse` (.safetensors)")
    p.add_argument("--checkpoint", default=None, help="trained checkpoint for --model")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON", help="architecture overrides as JSON")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--batch-size", type=positive_int_arg, default=1, help="batch of the example input (default 1)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's current one)")
    p.add_argument("--static-batch", action="store_true", help="export a fixed batch size")
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto")
    p.add_argument("--atol", type=float, default=1e-4, help="max |ONNX Runtime - PyTorch| accepted (default 1e-4)")
    p.add_argument("--verbose", action="store_true", help="show the exporter's own output")
    p.set_defaults(func=run)


def run(args) -> int:
    import warnings

    import slab
    from ..reparam.export import export_onnx, load_fused
    from ..errors import check_output_file
    from .fuse import input_shape_of, parse_model_kwargs

    check_output_file(args.output, suffixes=(".onnx",))
    if args.fused:
        if args.checkpoint:
            raise ValueError("--checkpoint goes with --model; a --fused file already holds the weights")
        model = load_fused(args.fused, **parse_model_kwargs(args.model_kwargs))
        label = args.fused
    else:
        model = slab.create_model(args.model, pretrained_file=args.checkpoint,
                                  **parse_model_kwargs(args.model_kwargs)).eval()
        if args.checkpoint is None:
            print("note: no --checkpoint: exporting random weights")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = slab.fuse(model)
        label = args.model
    shape = input_shape_of(model, args.img_size)
    report = export_onnx(model, args.output, (args.batch_size, *shape), dynamic_batch=not args.static_batch,
                         opset=args.opset, exporter=args.exporter, atol=args.atol, verbose=args.verbose)
    ops = ", ".join(f"{k} {v}" for k, v in report["ops"].items())
    print(f"exported {label} -> {report['path']} ({report['bytes'] / 1e6:.2f} MB, opset {report['opset']}, "
          f"{report['exporter']} exporter, {report['nodes']} nodes)")
    print(f"  ops: {ops}")
    print("  no normalization or Sqrt node; onnx.checker OK; ONNX Runtime vs PyTorch max |diff|: "
          + ", ".join(f"batch {b}: {d:.2e}" for b, d in report["max_abs_diff"].items()))
    return 0
