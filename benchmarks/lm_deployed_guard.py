"""Would a scale guard kept in the deployed model save a norm-free LLaMA from runaway tokens? Held-out
perplexity of a converted (or fused) model with a guard applied, in eval, after every decoder layer.

    python benchmarks/lm_deployed_guard.py OUT/fused --reference ~/.cache/slab/smollm2-135m-instruct-f32

Two guards, their bounds from the original model (``--reference``) on calibration blocks of the training split:

* ``clamp F``: each layer's residual stream clamped elementwise to F x the original's largest absolute value there;
* ``cap F``: each token's residual stream scaled down to at most F x the original's largest per-token RMS there
  (first token exempt: it is the attention sink, far larger by design).

Measured answer (docs/language_models.md, "A scale guard kept in the deployed model does not work"): neither
rescues a block that runs away, and any bound tight enough to matter costs every other block.
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from slab.lm import data


def reference_bounds(reference, ids: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per decoder layer: the largest |value| and the largest per-token RMS (first token excluded) of the
    original's residual stream on ``ids``."""
    with torch.no_grad():
        hidden = reference(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[1:]
    return ([float(h.abs().max()) for h in hidden],
            [float(h[:, 1:].float().pow(2).mean(-1).sqrt().max()) for h in hidden])


def guard_hook(kind: str, bound: float):
    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        if kind == "clamp":
            x = x.clamp(-bound, bound)
        else:  # cap: scale each token (after the first) down to RMS <= bound
            rms = x[:, 1:].float().pow(2).mean(-1, keepdim=True).sqrt()
            x = torch.cat([x[:, :1], x[:, 1:] * (bound / rms).clamp(max=1.0).to(x.dtype)], dim=1)
        return (x,) + tuple(output[1:]) if isinstance(output, tuple) else x
    return hook


def block_losses(model, ids: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Mean next-token cross-entropy of each block (nan where the model is not finite)."""
    out = []
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            block = ids[i: i + batch_size]
            logits = model(input_ids=block, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.flatten(0, 1), block[:, 1:].flatten(), reduction="none")
            out += loss.view(block.shape[0], -1).mean(1).tolist()
    return out


def summary(name: str, losses: list[float]) -> dict:
    finite = [x for x in losses if math.isfinite(x)]
    mean = sum(losses) / len(losses)
    return {"guard": name, "ppl": math.exp(mean) if math.isfinite(mean) else float("inf"),
            "finite_blocks": len(finite), "blocks": len(losses),
            "ppl_finite_blocks": math.exp(sum(finite) / len(finite)) if finite else float("nan"),
            "worst_block_losses": sorted(losses, key=lambda x: (math.isfinite(x), x))[-3:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a save_pretrained SLAB-LLaMA directory with its tokenizer")
    p.add_argument("--reference", required=True, help="the original model's directory (the bounds)")
    p.add_argument("--factors", type=float, nargs="+", default=[8.0, 4.0, 2.0])
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-blocks", type=int, default=32, help="64-token training blocks for the bounds")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    text = data.load_text(None, seed=0)
    eval_ids = data.pack_tokens(tok, text["test"]["text"], a.seq_len, max_blocks=a.eval_blocks)
    calib_ids = data.pack_tokens(tok, text["train"]["text"], 64, max_blocks=a.calib_blocks)
    peak_abs, peak_rms = reference_bounds(AutoModelForCausalLM.from_pretrained(a.reference).eval(), calib_ids)
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    rows = [summary("none", block_losses(model, eval_ids))]
    for kind, peaks in (("clamp", peak_abs), ("cap", peak_rms)):
        for factor in a.factors:
            handles = [layer.register_forward_hook(guard_hook(kind, factor * peak))
                       for layer, peak in zip(model.model.layers, peaks)]
            try:
                rows.append(summary(f"{kind} {factor:g}", block_losses(model, eval_ids)))
            finally:
                for h in handles:
                    h.remove()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
