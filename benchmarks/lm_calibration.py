"""Zero-shot quality of calibration variants: held-out perplexity after `calibrate_repbn` (no training).

    python benchmarks/lm_calibration.py MODEL [--calib-batches 16] [--eval-blocks 16] [VARIANT ...]

MODEL is what `slab convert-lm --model` takes (`smollm2`, a save_pretrained LLaMA directory, a .gguf file).
Each VARIANT is a JSON object of `calibrate_repbn` keyword arguments, e.g. '{}' (norms only) or
'{"refit_ridge": 0.01}'; it may set "calib_batches". Prints, per variant, the calibration time, the held-out
perplexity and the relative error of the held-out hidden states against the original's after every third layer.
Text: the Debian fortunes (`make lm-data`), calibration blocks of 8 x 64 tokens, held-out blocks of 128.
"""
import argparse
import json
import time

import torch

from slab.lm import SlabLlamaForCausalLM, data
from slab.lm.convert import calibrate_repbn
from slab.lm.sources import load_pretrained_llama
from slab.lm.train import perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("variants", nargs="*", default=["{}"])
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    llama, tok, description = load_pretrained_llama(args.model)
    ds = data.load_text(None, seed=0)
    train = data.pack_tokens(tok, ds["train"]["text"], 64, max_blocks=8 * 256)
    held_out = data.pack_tokens(tok, ds["test"]["text"], 128, max_blocks=args.eval_blocks)
    print(f"{description}: original held-out ppl {perplexity(llama, held_out, batch_size=4):.2f}", flush=True)
    with torch.no_grad():
        reference = llama(input_ids=held_out[:4], output_hidden_states=True).hidden_states
    for variant in args.variants:
        kwargs = json.loads(variant)
        n = kwargs.pop("calib_batches", args.calib_batches)
        student = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn", first_token_affine=True)
        t0 = time.time()
        calibrate_repbn(student, llama, [(train[i * 8:(i + 1) * 8], None) for i in range(n)], **kwargs)
        seconds = time.time() - t0
        with torch.no_grad():
            hidden = student(input_ids=held_out[:4], output_hidden_states=True).hidden_states
        errors = [float((h[:, 1:] - r[:, 1:]).norm() / r[:, 1:].norm()) for h, r in zip(hidden, reference)]
        print(f"{n} batches {kwargs}: {seconds:.0f}s, held-out ppl {perplexity(student, held_out, batch_size=4):.2f}; "
              f"hidden-state error after layers 0,3,6,...: {' '.join(f'{e:.2f}' for e in errors[1::3])}", flush=True)


if __name__ == "__main__":
    main()
