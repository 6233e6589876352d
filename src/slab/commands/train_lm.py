"""``slab train-lm``: train a SLAB-LLaMA from scratch on local text (default: Debian's fortunes).

Trains a byte-level BPE tokenizer on the training split, packs the text into blocks, trains with the
PRepBN schedule driven by optimizer steps (single process, or DDP under ``torchrun``), then for BN
models recalibrates the statistics, evaluates held-out perplexity, fuses and evaluates the fused model.
Outputs in ``--output``: ``tokenizer/``, ``metrics.jsonl`` (one line per optimizer step),
``checkpoints/step_*.pt`` (resumable: the default ``--resume auto``), ``model/`` and ``fused/``
(``save_pretrained``, safetensors), ``results.json``.
"""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("train-lm", help="train a SLAB-LLaMA language model from scratch on local text",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--output", default="outputs/lm", help="output directory (metrics.jsonl, checkpoints/, model/, fused/; resumes from its checkpoints)")
    p.add_argument("--text", nargs="*", default=None,
                   help="text files or directories (default: /usr/share/games/fortunes, see `make lm-data`)")
    p.add_argument("--norm", default="prepbn", choices=["rmsnorm", "prepbn", "repbn"])
    p.add_argument("--bn-stats", default="batch", choices=["batch", "causal", "running"],
                   help="BN statistics in training: batch (authors'; leaks future tokens), causal (prefix), running")
    p.add_argument("--bn-causal-prior", type=float, default=256.0,
                   help="with --bn-stats causal: weight, in tokens, of the running statistics pooled into each "
                        "position's prefix statistics (0: plain prefix statistics; 1.069 x RMSNorm where 256 gave "
                        "1.029 x, docs/language_models.md)")
    p.add_argument("--bn-init", default="calibrate", choices=["zero", "fit", "calibrate"],
                   help="RepBN branches when lam first drops: calibrate (default: sequential least squares against the "
                        "model's RMSNorm form), fit (each to its own RMSNorm), zero (the authors')")
    p.add_argument("--bn-consistency", type=float, default=0.0,
                   help="weight of the branch-consistency loss (RepBN branch vs detached RMSNorm branch) in the transition")
    p.add_argument("--attn-type", default="softmax",
                   help="'softmax', 'sla' (causal simplified linear attention) or one letter per layer, S softmax / "
                        "L SLA (e.g. SLSL)")
    p.add_argument("--sla-conv-kernel", type=int, default=4, help="causal depthwise conv on V in SLA layers")
    p.add_argument("--sla-position", default="rope", choices=["rope", "none"],
                   help="SLA positions: RoPE before the ReLU kernel, or none (the conv and causal order only)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 3 x hidden)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--padding", default="pack", choices=["pack", "pad"],
                   help="pack: concatenated blocks, all tokens real; pad: one entry per row, right-padded")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", "--max-steps", dest="steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20, help="LR warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--prepbn-warmup", type=int, default=None,
                   help="steps with lam = 1 (RMSNorm only); default: --prepbn-warmup-fraction of --steps")
    p.add_argument("--prepbn-warmup-fraction", type=float, default=0.6,
                   help="steps with lam = 1 as a fraction of --steps")
    p.add_argument("--prepbn-transition", type=float, default=0.0,
                   help="PRepBN decay length as a fraction of --steps (default 0: the calibrated switch at once; the "
                        "authors decay over most of the run, e.g. 0.8 with --bn-init zero --prepbn-warmup-fraction 0)")
    p.add_argument("--recalibrate-batches", type=int, default=16)
    p.add_argument("--eval-blocks", type=int, default=256, help="held-out blocks for perplexity")
    p.add_argument("--held-out", type=float, default=0.05, help="fraction of entries held out")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start over even if --output has a checkpoint "
                                                            "(its checkpoints are deleted)")
    from slab.engine.cli import add_run_arguments
    add_run_arguments(p, defaults={"resume": "auto"}, skip=("max_steps", "save_every", "output", "threads"))
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    """Settings that cannot train as asked: refused before anything is read or written."""
    from slab.lm import SlabLlamaConfig
    from slab.schedule import PRepBNSchedule
    SlabLlamaConfig(num_hidden_layers=args.layers, attn_type=args.attn_type, sla_conv_kernel=args.sla_conv_kernel,
                    sla_position=args.sla_position)  # raises ValueError on a bad --attn-type
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.warmup >= args.steps:
        raise ValueError(f"--warmup {args.warmup} (LR warm-up steps) is not shorter than --steps {args.steps}: the "
                         f"learning rate would never reach --lr {args.lr}; use --warmup < --steps")
    if args.norm == "prepbn":
        PRepBNSchedule(None, args.steps, warmup_steps=prepbn_warmup_steps(args),
                       transition_fraction=args.prepbn_transition)  # raises if the transition ends after training


def prepbn_warmup_steps(args) -> int:
    """--prepbn-warmup in steps, or --prepbn-warmup-fraction of --steps."""
    if args.prepbn_warmup is not None:
        return args.prepbn_warmup
    return int(round(args.prepbn_warmup_fraction * args.steps))


def run(args) -> int:
    from pathlib import Path

    import torch

    import slab
    from slab.lm import SlabLlamaConfig, SlabLlamaForCausalLM, data
    from slab.lm.train import TrainLMConfig, init_distributed, perplexity, recalibrate_bn, train_lm

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed()
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} exists and is not a directory")
    log = print if rank == 0 else (lambda *a, **k: None)

    # Everything that can fail on bad input runs before --output is created.
    ds = data.load_text(args.text, held_out=args.held_out, seed=args.seed)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists() and not args.no_resume:
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tokenizer = data.train_tokenizer(ds["train"]["text"], vocab_size=args.vocab_size)
    try:
        if args.padding == "pack":
            train_ids, train_mask = data.pack_tokens(tokenizer, ds["train"]["text"], args.seq_len), None
            eval_ids, eval_mask = data.pack_tokens(tokenizer, ds["test"]["text"], args.seq_len,
                                                   max_blocks=args.eval_blocks), None
        else:
            train_ids, train_mask = data.pad_rows(tokenizer, ds["train"]["text"], args.seq_len)
            eval_ids, eval_mask = data.pad_rows(tokenizer, ds["test"]["text"][: args.eval_blocks], args.seq_len)
    except ValueError as e:
        raise ValueError(f"--text is too short for --seq-len {args.seq_len}: {e}; give more text or a smaller "
                         f"--seq-len") from None
    if train_ids.shape[0] < args.batch_size * world:
        raise ValueError(f"--text gives {train_ids.shape[0]} training sequences of {args.seq_len} tokens, fewer than "
                         f"one batch ({args.batch_size} x {world}); give more text or a smaller --batch-size/--seq-len")
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (tok_dir / "tokenizer.json").exists():
        tokenizer.save_pretrained(tok_dir)
    log(f"data: {train_ids.shape[0]} training / {eval_ids.shape[0]} held-out sequences of {args.seq_len} tokens, "
        f"vocabulary {len(tokenizer)}")

    torch.manual_seed(args.seed)
    config = SlabLlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate or 3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, norm=args.norm, bn_stats=args.bn_stats, tie_word_embeddings=True,
        bn_causal_prior=args.bn_causal_prior,
        attn_type=args.attn_type, sla_conv_kernel=args.sla_conv_kernel, sla_position=args.sla_position,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = SlabLlamaForCausalLM(config)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, norm={args.norm}, "
        f"bn_stats={args.bn_stats}, attn_type={args.attn_type}")
    cfg = TrainLMConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        warmup_steps=args.warmup, weight_decay=args.weight_decay, prepbn_warmup=prepbn_warmup_steps(args),
                        prepbn_transition=args.prepbn_transition, bn_init=args.bn_init,
                        bn_consistency=args.bn_consistency,
                        eval_every=args.eval_every,
                        save_every=args.save_every, amp=args.amp, seed=args.seed)
    summary = train_lm(model, train_ids, cfg, out, train_mask=train_mask, eval_ids=eval_ids, eval_mask=eval_mask,
                       resume=False if args.no_resume else args.resume, log=log, progress=not args.no_progress,
                       stop_at_step=args.stop_at_step, threads=args.threads)
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    if rank != 0 or summary["stopped_early"]:
        return 0
    results = {"norm": args.norm, "attn_type": args.attn_type, "sla_conv_kernel": args.sla_conv_kernel,
               "sla_position": args.sla_position, "bn_stats": args.bn_stats, "bn_causal_prior": args.bn_causal_prior, "bn_init": args.bn_init, "steps": summary["step"],
               "bad_steps": summary["bad_steps"], "final_train_loss": summary["history"][-1]["loss"],
               "train_tokens_per_s": summary["train_tokens_per_s"], "world_size": world,
               "history": summary["history"], "eval": summary["eval"]}
    if config.foldable:
        bs = args.batch_size
        n = recalibrate_bn(model, ((train_ids[i * bs:(i + 1) * bs].to(device),
                                    train_mask[i * bs:(i + 1) * bs].to(device) if train_mask is not None else None)
                                   for i in range(min(args.recalibrate_batches, train_ids.shape[0] // bs))))
        log(f"recalibrated BN statistics over {n} batches")
    results["ppl"] = perplexity(model, eval_ids, eval_mask, batch_size=args.batch_size, device=device)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    if config.foldable:
        fused = slab.fuse(model)
        results["ppl_fused"] = perplexity(fused, eval_ids, eval_mask, batch_size=args.batch_size, device=device)
        fused.save_pretrained(out / "fused")
        tokenizer.save_pretrained(out / "fused")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log(json.dumps({k: v for k, v in results.items() if k not in ("history", "eval")}, indent=2))
    return 0
