"""``slab lm-bench``: generation tokens/s (prefill and decode) of SLAB-LLaMA, RMSNorm vs fused PRepBN."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("lm-bench", help="tokens/s of prefill and decode: RMSNorm vs fused PRepBN at equal size")
    p.add_argument("--size", default="small", help="tiny, small or smollm2-135m")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from slab.lm.bench import bench_pair, format_table
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.batch_sizes.split(",") if b)
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
    result = bench_pair(args.size, batches=batches, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                        repeats=args.repeats, device=args.device)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
