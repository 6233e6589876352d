"""``slab lm-bench``: generation tokens/s (prefill and decode) of SLAB-LLaMA, RMSNorm vs fused PRepBN; with
``--contexts``, decode cost per token against the context length for softmax, SLA and hybrid attention."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("lm-bench", help="tokens/s of prefill and decode: RMSNorm vs fused PRepBN at equal size")
    p.add_argument("--size", default=None, help="tiny, small, context256 or smollm2-135m (default: small; "
                                                "context256 with --contexts)")
    p.add_argument("--contexts", default=None,
                   help="comma-separated context lengths (e.g. 128,2048,8192): decode ms/token, prefill ms/token and "
                        "cache size at each, per --attn-types, batch 1")
    p.add_argument("--attn-types", default="softmax,sla,SLSL",
                   help="with --contexts: comma-separated attn_type values to compare")
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

    from slab.lm.bench import bench_context, bench_pair, format_context_table, format_table
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.contexts:
        result = _run_context(args, bench_context)
        print(format_context_table(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    batches = tuple(int(b) for b in args.batch_sizes.split(",") if b)
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
    result = bench_pair(args.size or "small", batches=batches, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                        repeats=args.repeats, device=args.device)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _run_context(args, bench_context) -> dict:
    from slab.lm import SlabLlamaConfig
    contexts = tuple(int(c) for c in args.contexts.split(",") if c)
    if not contexts or min(contexts) < 1:
        raise ValueError(f"--contexts must be positive integers, got {args.contexts!r}")
    names = [a for a in args.attn_types.split(",") if a]
    layers = 4 if args.size in (None, "context256") else None
    for name in names:  # a bad attn_type fails here, before any timing
        SlabLlamaConfig(num_hidden_layers=layers or len(name), attn_type=name)
    attn_types = {("hybrid " + n if n not in ("softmax", "sla") else n): n for n in names}
    return bench_context(attn_types, contexts, new_tokens=args.new_tokens, repeats=args.repeats,
                         size=args.size or "context256", device=args.device)
