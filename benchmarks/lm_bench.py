"""Generation speed of SLAB-LLaMA: RMSNorm vs fused PRepBN (norm-free) at equal size.

    .venv/bin/python benchmarks/lm_bench.py --size small --batch-sizes 1,8
    .venv/bin/python benchmarks/lm_bench.py --size smollm2-135m --json outputs/lm_bench.json

Same as ``slab lm-bench``; prints prefill and decode tokens/s at batch 1 and 8 on CPU, or on the GPU
(with its name) when one is available.
"""
import argparse
import sys

from slab.commands import lm_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="lm_bench")
    sub = parser.add_subparsers(dest="command")
    lm_bench.register(sub)
    args = parser.parse_args(["lm-bench", *sys.argv[1:]])
    sys.exit(args.func(args))
