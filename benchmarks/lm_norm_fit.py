"""How linear is each RMSNorm of a LLaMA on real text? Per-token RMS of every norm's input and the error of
the best per-channel affine map (what a RepBN is at inference), with and without each sequence's first token.

    python benchmarks/lm_norm_fit.py smollm2            # SmolLM2-135M (make lm-data)
    python benchmarks/lm_norm_fit.py RUN_DIR/model      # a `slab train-lm --norm rmsnorm` model

Columns: median RMS of the first token (r0) and of the others (med, p99, max); relative squared error of the
least-squares per-channel fit over all tokens, on the first tokens, and fitted without the first tokens.
Held-out fortunes, 8 blocks of 128 tokens.
"""
import sys

import torch

from slab.lm import SlabLlamaForCausalLM, data


def load(source):
    if source == "smollm2":
        from slab.lm.smollm2 import load_smollm2
        return load_smollm2()
    from transformers import AutoTokenizer
    return SlabLlamaForCausalLM.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)


def fit_error(x, y, rows):
    """Relative squared error per token of the least-squares per-channel map fitted on ``rows``."""
    xm, ym = x[rows], y[rows]
    mx, my = xm.mean(0), ym.mean(0)
    s = ((xm - mx) * (ym - my)).mean(0) / (xm - mx).pow(2).mean(0).clamp_min(1e-12)
    return (x * s + my - s * mx - y).pow(2).sum(-1) / y.pow(2).sum(-1)


def main(source):
    torch.set_num_threads(1)
    model, tok = load(source)
    ids = data.pack_tokens(tok, data.load_text(None, seed=0)["test"]["text"], 128, max_blocks=8)
    rows = []

    def hook(name):
        def fn(module, inputs, output):
            x, y = inputs[0].detach().float(), output.detach().float()
            r = x.pow(2).mean(-1).sqrt()
            flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            first = torch.zeros_like(r, dtype=torch.bool)
            first[:, 0] = True
            e_all = fit_error(flat_x, flat_y, torch.ones_like(first.reshape(-1))).view_as(r)
            e_rest = fit_error(flat_x, flat_y, ~first.reshape(-1)).view_as(r)
            rest = r[:, 1:]
            rows.append(f"{name:40s} r0 {r[:, 0].median():8.3g}  med {rest.median():7.3g}  p99 {rest.quantile(.99):7.3g}  "
                        f"max {rest.max():7.3g} | fit all {e_all[:, 1:].mean():.3f} (first {e_all[:, 0].mean():.3g})  "
                        f"without first {e_rest[:, 1:].mean():.3f}")
        return fn

    for name, module in model.named_modules():
        if name.endswith("layernorm") or name == "model.norm":
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        model(input_ids=ids)
    print("\n".join(rows))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
