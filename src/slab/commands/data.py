"""``slab data``: make datasets. ``slab data fmnist-scenes`` writes a COCO-format instance segmentation set."""
from __future__ import annotations

from ..errors import positive_int_arg


def register(sub) -> None:
    p = sub.add_parser("data", help="make datasets (fmnist-scenes: COCO-format scenes of Fashion-MNIST items)")
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    s = kinds.add_parser("fmnist-scenes", help="compose Fashion-MNIST items onto canvases, write COCO train/val",
                         description="Compose real Fashion-MNIST items (Debian package dataset-fashion-mnist) onto "
                                     "larger canvases and write a COCO-format instance segmentation dataset: "
                                     "OUTPUT/{train,val}/*.png and OUTPUT/annotations/instances_{train,val}.json "
                                     "(RLE masks, boxes, the 10 Fashion-MNIST classes). Train scenes use the "
                                     "training items, val scenes the test items.")
    s.add_argument("--output", required=True, help="dataset folder")
    s.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    s.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    s.add_argument("--canvas", type=int, default=128, help="image side in pixels (default 128)")
    s.add_argument("--max-items", type=positive_int_arg, default=4, help="items per image, at most (default 4)")
    s.add_argument("--min-scale", type=float, default=1.0, help="smallest item side / 28 (default 1.0)")
    s.add_argument("--max-scale", type=float, default=2.0, help="largest item side / 28 (default 2.0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fmnist-dir", default=None, help="folder of the Fashion-MNIST IDX files "
                                                      "(default /usr/share/datasets/fashion-mnist)")
    s.set_defaults(func=_fmnist_scenes)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _fmnist_scenes(args) -> int:
    import time

    from ..data.fashion_mnist import FASHION_MNIST_DIR
    from ..errors import check_output_dir
    if min(args.train, args.val) < 0 or max(args.train, args.val) == 0:
        raise ValueError(f"--train and --val count images: >= 0 each and not both 0, got {args.train} and {args.val}")
    check_output_dir(args.output)
    from ..detection.scenes import SceneConfig, make_fmnist_scenes
    start = time.perf_counter()
    cfg = SceneConfig(canvas=args.canvas, max_items=args.max_items, min_scale=args.min_scale, max_scale=args.max_scale)
    files = make_fmnist_scenes(args.output, args.train, args.val, cfg, seed=args.seed,
                               root=args.fmnist_dir or FASHION_MNIST_DIR)
    for split, path in files.items():
        print(f"{split}: {path}")
    print(f"wrote {args.train} train / {args.val} val scenes to {args.output} in {time.perf_counter() - start:.1f}s")
    return 0
