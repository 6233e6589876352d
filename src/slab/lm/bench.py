"""Generation speed of SLAB-LLaMA: prefill and decode tokens/s, RMSNorm vs fused (norm-free) at equal size;
and decode cost per token against the context length for softmax, SLA and hybrid attention.

The fused model is what :func:`slab.fuse` returns for a PRepBN model: no normalization op, biases on
q/k/v, gate/up and lm_head. Its speed does not depend on the weight values, so the benchmark builds both
forms from one configuration (random weights) unless given trained models.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn

from .configuration_slab_llama import SlabLlamaConfig
from .modeling_slab_llama import SlabLlamaForCausalLM

__all__ = ["BENCH_SIZES", "bench_config", "time_generation", "bench_pair", "device_name", "time_at_context",
           "bench_context", "format_context_table"]

#: Architectures for the benchmark; 'smollm2-135m' is SmolLM2-135M's shape.
BENCH_SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=4096),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=16384),
    "context256": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def bench_config(size: str, norm: str, max_positions: int = 2048, attn_type: str = "softmax") -> SlabLlamaConfig:
    """Config of ``size`` with ``norm``; ``norm='fused'`` is the layout :func:`slab.fuse` returns."""
    if size not in BENCH_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {list(BENCH_SIZES)}")
    kw = dict(BENCH_SIZES[size], max_position_embeddings=max_positions, attn_type=attn_type)
    if norm == "fused":
        kw.update(norm="none", folded_bias=True, tie_word_embeddings=False)
    else:
        kw.update(norm=norm)
    return SlabLlamaConfig(**kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _timed_greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device):
    """``(prefill seconds, decode seconds, cache)`` of one greedy run: the prompt forward with the cache, then
    ``new_tokens`` one-token steps."""
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    _sync(device)
    t1 = time.perf_counter()
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1, cache


@torch.inference_mode()
def time_generation(model: nn.Module, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
                    device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """Median prefill and decode throughput of greedy decoding with the KV cache.

    prefill tokens/s = ``batch * prompt_len / t(prompt forward)``; decode tokens/s =
    ``batch * new_tokens / t(new_tokens one-token steps)``. One warm-up run is not counted.
    """
    device = torch.device(device)
    model.eval().to(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
    prefill, decode = [], []
    for r in range(repeats + 1):
        t_prefill, t_decode, _ = _timed_greedy(model, prompt, new_tokens, device)
        if r:
            prefill.append(batch * prompt_len / t_prefill)
            decode.append(batch * new_tokens / t_decode)
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode)}


def bench_pair(size: str = "small", batches=(1, 8), prompt_len: int = 128, new_tokens: int = 32,
               repeats: int = 3, device: str | None = None, models: dict | None = None) -> dict:
    """RMSNorm vs fused-PRepBN throughput at equal size; ``models`` may give trained ``{name: model}`` instead."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if models is None:
        torch.manual_seed(0)
        models = {"rmsnorm": SlabLlamaForCausalLM(bench_config(size, "rmsnorm", prompt_len + new_tokens + 8)),
                  "fused-prepbn": SlabLlamaForCausalLM(bench_config(size, "fused", prompt_len + new_tokens + 8))}
    for model in models.values():  # warm every model up once: the first calls pay one-time costs
        time_generation(model, max(batches), min(prompt_len, 16), 2, repeats=1, device=dev)
    rows = []
    for b in batches:
        for name, model in models.items():
            res = time_generation(model, b, prompt_len, new_tokens, repeats=repeats, device=dev)
            rows.append({"model": name, "batch": b, **res})
    names = list(models)
    ratios = {}
    if len(names) == 2:
        for b in batches:
            a, f = [next(r for r in rows if r["model"] == n and r["batch"] == b) for n in names]
            ratios[f"batch{b}"] = {"prefill": f["prefill_tok_s"] / a["prefill_tok_s"],
                                   "decode": f["decode_tok_s"] / a["decode_tok_s"]}
    return {"size": size, "device": device_name(dev), "prompt_len": prompt_len, "new_tokens": new_tokens,
            "rows": rows, "ratio_second_over_first": ratios}


def format_table(result: dict) -> str:
    lines = [f"device: {result['device']}  size: {result['size']}  prompt {result['prompt_len']}  "
             f"new tokens {result['new_tokens']}",
             f"{'model':>14} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13}"]
    for r in result["rows"]:
        lines.append(f"{r['model']:>14} {r['batch']:>5} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f}")
    for k, v in result["ratio_second_over_first"].items():
        lines.append(f"ratio {k}: prefill x{v['prefill']:.3f}, decode x{v['decode']:.3f}")
    return "\n".join(lines)


@torch.inference_mode()
def time_at_context(model: nn.Module, context: int, new_tokens: int, repeats: int = 2,
                    device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """Prefill ``context`` tokens (batch 1), then decode ``new_tokens`` greedily with the cache.

    Returns the median prefill ms per token, decode ms per token and the cache's size in MiB after decoding
    (:func:`slab.lm.sla_cache.cache_bytes`: KV caches grow with the context, SLA states do not).
    """
    from .sla_cache import cache_bytes
    device = torch.device(device)
    model.eval().to(device)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    prompt = prompt.to(device)
    prefill, decode = [], []
    for _ in range(repeats):
        t_prefill, t_decode, cache = _timed_greedy(model, prompt, new_tokens, device)
        prefill.append(1e3 * t_prefill / context)
        decode.append(1e3 * t_decode / new_tokens)
    return {"prefill_ms_per_token": statistics.median(prefill), "decode_ms_per_token": statistics.median(decode),
            "cache_mib": cache_bytes(cache) / 2 ** 20}


def bench_context(attn_types: dict | None = None, contexts=(128, 2048, 8192), new_tokens: int = 32,
                  repeats: int = 2, size: str = "context256", device: str | None = None) -> dict:
    """Decode ms/token, prefill ms/token and cache size at each context length for each ``{name: attn_type}``
    (fused layout, random weights: speed does not depend on the values). Ratios: each model's decode cost at
    the longest context over the shortest, and softmax's over each model's at the longest."""
    attn_types = attn_types or {"softmax": "softmax", "sla": "sla", "hybrid SLSL": "SLSL"}
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, attn_type in attn_types.items():
        torch.manual_seed(0)
        model = SlabLlamaForCausalLM(bench_config(size, "fused", max(contexts) + new_tokens + 8, attn_type))
        time_at_context(model, min(contexts), 2, repeats=1, device=dev)  # warm-up: one-time costs
        for context in contexts:
            rows.append({"model": name, "attn_type": attn_type, "context": context,
                         **time_at_context(model, context, new_tokens, repeats=repeats, device=dev)})
    cost = {(r["model"], r["context"]): r["decode_ms_per_token"] for r in rows}
    short, long = min(contexts), max(contexts)
    ratios = {name: {f"decode_{long}_over_{short}": cost[name, long] / cost[name, short]} for name in attn_types}
    if "softmax" in attn_types:
        for name in attn_types:
            ratios[name][f"softmax_over_this_at_{long}"] = cost["softmax", long] / cost[name, long]
    return {"size": size, "device": device_name(dev), "new_tokens": new_tokens, "repeats": repeats, "rows": rows,
            "ratios": ratios}


def format_context_table(result: dict) -> str:
    lines = [f"device: {result['device']}  size: {result['size']}  batch 1, {result['new_tokens']} decoded tokens, "
             f"median of {result['repeats']}",
             f"{'model':>12} {'context':>8} {'decode ms/tok':>14} {'prefill ms/tok':>15} {'cache MiB':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['model']:>12} {r['context']:>8} {r['decode_ms_per_token']:>14.3f} "
                     f"{r['prefill_ms_per_token']:>15.4f} {r['cache_mib']:>10.3f}")
    for name, ratios in result["ratios"].items():
        lines.append(f"{name}: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))
    return "\n".join(lines)
