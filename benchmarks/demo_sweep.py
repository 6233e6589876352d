"""The recipe sweep behind ``slab demo`` (docs/demo.md): train one form with one recipe, append the result.

Each call trains one model on Fashion-MNIST with the given recipe, evaluates on the 10 000 test
images after every epoch, and appends one JSON line (the recipe, the top-1 per epoch, the final
top-1, the wall and CPU time, the 1-minute load average at start and end) to ``--log``.

    OMP_NUM_THREADS=1 python benchmarks/demo_sweep.py --form ln --lr 2e-3 --epochs 4 --log sweep.jsonl
    python benchmarks/demo_sweep.py --table sweep.jsonl     # the markdown table of docs/demo.md
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

FORMS = {"ln": dict(norm="ln", attn="softmax"), "prepbn": dict(norm="prepbn", attn="softmax"),
         "slab": dict(norm="prepbn", attn="sla"),
         # the study's (slab study) other norm ablations, tuned the same way
         "bn": dict(norm="bn", attn="softmax"), "repbn": dict(norm="repbn", attn="softmax")}


def table(path: str) -> str:
    """The markdown table of every run logged in ``path`` (docs/demo.md), in the order run."""
    head = ("| # | form | model kwargs | epochs | batch | lr | warm-up | label smoothing | augment | "
            "top-1 per epoch | top-1 | wall (s) | CPU (s) | load |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    with open(path) as f:
        for i, line in enumerate(f, 1):
            r = json.loads(line)
            shown = ", ".join(str(x) for x in r["top1_per_epoch"])
            lines.append(f"| {i} | {r['form']} | {json.dumps(r['model_kwargs']) if r['model_kwargs'] else '-'} | "
                         f"{r['epochs']:g} | {r['batch_size']} | {r['lr']:g} | {r['warmup']} | "
                         f"{r['label_smoothing']:g} | {'no' if r['no_augment'] else 'yes'} | {shown} | "
                         f"**{r['top1']:.2f}** | {r['time_s']:.0f} | {r.get('cpu_s', '-')} | "
                         f"{r['load_start']:.1f}-{r['load_end']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", metavar="LOG", help="print the markdown table of LOG and exit")
    p.add_argument("--form", choices=sorted(FORMS))
    p.add_argument("--model", default="slab_deit_nano_patch4_28")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"embed_dim\": 96}'")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", default="0.05", help="lr warm-up: fraction, steps or '<n>ep'")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--reprob", type=float, default=0.0)
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--prepbn-transition", default="0.8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log")
    a = p.parse_args()
    if a.table:
        print(table(a.table))
        return
    if not (a.form and a.log):
        p.error("--form and --log are required to run (or --table LOG)")
    torch.set_num_threads(a.threads)
    from slab.train import TrainConfig, train
    from slab.train.config import parse_amount

    out = tempfile.mkdtemp(prefix="demo_sweep_")
    cfg = TrainConfig(model=a.model, model_kwargs={**FORMS[a.form], **a.model_kwargs}, data="fashion-mnist",
                      epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, lr_warmup=parse_amount(a.warmup),
                      min_lr=a.min_lr, weight_decay=a.weight_decay, label_smoothing=a.label_smoothing,
                      augment=not a.no_augment, reprob=a.reprob, drop_path=a.drop_path,
                      prepbn_transition=parse_amount(a.prepbn_transition), seed=a.seed, output=out,
                      progress=False, num_workers=0, eval_every=60000 // a.batch_size, eval_batch_size=1000,
                      keep_last=1, log_every=10_000)
    load0, t0, cpu0 = os.getloadavg()[0], time.time(), time.process_time()
    r = train(cfg)
    rec = {"form": a.form, **{k: v for k, v in vars(a).items() if k not in ("form", "log")},
           "top1_per_epoch": [round(e["top1"], 2) for e in r.evals], "top1": round(r.final["top1"], 2),
           "steps": r.steps, "time_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - cpu0, 1),
           "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2)}
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(rec))
    with open(a.log, "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
