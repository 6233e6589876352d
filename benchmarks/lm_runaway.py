"""How often does a norm-free LLaMA's residual stream run away? Counts held-out blocks on which a converted
(or fused) model's hidden state, away from each sequence's first token, passes an RMS bound in some layer.

    python benchmarks/lm_runaway.py OUT/fused                 # `slab convert-lm --output OUT`
    python benchmarks/lm_runaway.py OUT/fused --reference ~/.cache/slab/smollm2-135m-instruct-f32

Without a norm nothing controls a token's scale, and SwiGLU's output grows with the square of its input: a
token that starts too large grows layer after layer, to inf (docs/language_models.md). The original model's
residual stream stays under 40 RMS away from the first token in SmolLM2-135M on most blocks, but a few hold a
second sink token far above that; so with ``--reference`` (the original model) a block counts as runaway where
the model's peak is more than --factor times the reference's on the same block (or not finite). Held-out
fortunes (the split `convert-lm` never trains on), blocks of --seq-len tokens.
"""
import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slab.lm import data


def block_peaks(model, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Per block, the largest per-token RMS of the residual stream after any decoder layer, first token excluded
    (inf where it is not finite)."""
    peaks = []
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            hidden = model(input_ids=ids[i: i + batch_size], use_cache=False, output_hidden_states=True).hidden_states
            rms = torch.stack([h[:, 1:].float().pow(2).mean(-1).sqrt() for h in hidden[1:-1]])  # layers, B, T-1
            peak = rms.amax(dim=(0, 2))
            peaks.append(torch.where(torch.isfinite(peak), peak, torch.full_like(peak, float("inf"))))
    return torch.cat(peaks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a save_pretrained LLaMA / SLAB-LLaMA directory with its tokenizer")
    p.add_argument("--reference", default=None, help="the original model's directory (relative criterion)")
    p.add_argument("--bound", type=float, default=200.0, help="absolute RMS bound, without --reference")
    p.add_argument("--factor", type=float, default=10.0, help="x the reference's peak, with --reference")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = data.pack_tokens(tok, data.load_text(None, seed=0)["test"]["text"], a.seq_len, max_blocks=a.blocks)
    peaks = block_peaks(model, ids)
    n = ids.shape[0]
    print(f"{a.model}: {int((peaks >= a.bound).sum())} of {n} held-out blocks of {a.seq_len} tokens pass RMS "
          f"{a.bound:g} after some layer; {int(torch.isinf(peaks).sum())} not finite")
    if a.reference:
        ref = block_peaks(AutoModelForCausalLM.from_pretrained(a.reference).eval(), ids)
        print(f"reference {a.reference}: {int((ref >= a.bound).sum())} of {n} pass RMS {a.bound:g}")
        print(f"runaway (peak > {a.factor:g} x the reference's on the same block, or not finite): "
              f"{int((peaks > a.factor * ref).sum())} of {n}")


if __name__ == "__main__":
    main()
