"""Training-loss curves of `slab train-lm` / `slab convert-lm` runs with the PRepBN lambda, as one PNG.

    python benchmarks/lm_curves.py OUT.png RUN_DIR[=LABEL] ...

Reads each run's results.json (or checkpoint.pt: ``history``: one entry per optimizer step with ``loss`` and ``lam``), smooths
the loss over 25 steps and draws lambda of the PRepBN runs on a second axis.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smooth(values, width=25):
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-width:]
        out.append(sum(acc) / len(acc))
    return out


def load_history(run: Path) -> list[dict]:
    """results.json's ``history``, or the one in checkpoint.pt (runs whose results predate the field)."""
    res = json.loads((run / "results.json").read_text())
    if "history" in res:
        return res["history"]
    import torch
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["state"]["history"]


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out, runs = Path(argv[0]), argv[1:]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    lam_ax = ax.twinx()
    for spec in runs:
        path, _, label = spec.partition("=")
        hist = load_history(Path(path))
        steps = [h["step"] for h in hist]
        line, = ax.plot(steps, smooth([h["loss"] for h in hist]), label=label or Path(path).name)
        if any(h.get("lam") is not None for h in hist):
            lam_ax.plot(steps, [h["lam"] for h in hist], color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (25-step mean)")
    lam_ax.set_ylabel("PRepBN lambda (dotted)")
    lam_ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
