"""Run the full ``slab bench`` suite and refresh the result tables of docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_deploy.py [--threads 1] [--quick]
    .venv/bin/python benchmarks/bench_deploy.py --render benchmarks/results/bench.json   # tables only

Results (``bench.json``, ``bench.md``, ``attention_latency.png``) go to ``benchmarks/results/``; the
generated tables replace the block between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in
docs/benchmarks.md (the hand-written text around it is kept).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch/ONNX Runtime threads")
    parser.add_argument("--quick", action="store_true", help="the --quick suite (for trying this script)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="do not measure: re-render the tables of an existing bench.json")
    args = parser.parse_args()

    import torch

    from slab.bench.run import FULL, QUICK, render_markdown, run_bench
    if args.render:
        import json
        result = json.loads(args.render.read_text())
        (args.render.parent / "bench.md").write_text(render_markdown(result))
        plot = args.render.parent / "attention_latency.png"
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_bench(QUICK() if args.quick else FULL(), args.output)
        plot = args.output / "attention_latency.png"
    if plot.is_file():
        (ROOT / "docs" / "img").mkdir(exist_ok=True)
        shutil.copyfile(plot, ROOT / "docs" / "img" / "attention_latency.png")
    tables = render_markdown(result, plot_path="img/attention_latency.png")
    text = DOC.read_text() if DOC.is_file() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{tables}{END}{tail}")
    print(f"updated {DOC}")


if __name__ == "__main__":
    main()
