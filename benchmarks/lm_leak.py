"""How much does BatchNorm in training leak future tokens? (SLAB-LLaMA, docs/language_models.md)

    .venv/bin/python benchmarks/lm_leak.py outputs/lm_cmp/prepbn/model

Loads a trained (unfused) PRepBN SLAB-LLaMA, puts it in training mode with lam = 0 (RepBN only),
and for each BN statistics mode (batch / causal / running) reports the max relative change of the
logits at positions <= t when every token after t is replaced (by random tokens, or by other held-out
text), for a batch of held-out text, plus
the same in eval mode (must be 0).
"""
import argparse
import json

import torch

from slab.layers.norm import set_prepbn_lambda
from slab.lm import CausalRepBN, SlabLlamaForCausalLM, data
from slab.lm.causality import future_leak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--positions", default="0,15,63,126")
    args = p.parse_args()
    from transformers import PreTrainedTokenizerFast
    model = SlabLlamaForCausalLM.from_pretrained(args.model_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(args.model_dir)
    ds = data.load_text()
    blocks = data.pack_tokens(tok, ds["test"]["text"], args.seq_len, max_blocks=2 * args.batch_size)
    ids, other = blocks[: args.batch_size], blocks[args.batch_size:]
    set_prepbn_lambda(model, 0.0)
    rows = {}
    for stats in ("batch", "causal", "running"):
        for m in model.modules():
            if isinstance(m, CausalRepBN):
                m.stats = stats
        rows[f"train/{stats}/random"] = {t: future_leak(model, ids, int(t), training=True)
                                         for t in args.positions.split(",")}
        rows[f"train/{stats}/other-text"] = {t: future_leak(model, ids, int(t), training=True, replacement=other)
                                             for t in args.positions.split(",")}
    rows["eval"] = {t: future_leak(model, ids, int(t), training=False) for t in args.positions.split(",")}
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
