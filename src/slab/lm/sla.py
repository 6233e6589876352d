"""Causal SLA for decoders: SLAB's simplified linear attention made causal, with a constant-size state.

SLA (``shared/docs/method.md`` section 4) in a decoder: ``q, k = ReLU(q), ReLU(k)`` (after RoPE with
``sla_position='rope'``), and per head, at position t,

    O_t = q_t S_t / (q_t . z_t + eps),  S_t = sum_{j<=t} k_j v_j^T  [d, d],  z_t = sum_{j<=t} k_j  [d],

plus a causal depthwise conv over the sequence on V (the decoder's version of SLA's 2-D DWC: the same
``d``-channel conv for every head, looking ``sla_conv_kernel - 1`` tokens back), then ``o_proj``.
Generating keeps only ``S``, ``z`` and the last ``kernel - 1`` values per layer (:mod:`slab.lm.sla_cache`):
constant in the context length.

Three forms of the same function:

* :func:`causal_sla_reference`: the O(T^2) masked form, the readable float32 specification (tests).
* :func:`causal_sla_chunked`: what training, prefill and decoding run: quadratic inside chunks of C tokens,
  the state carried between chunks (O(T C d + T d^2)); with C = 1 it is the recurrence.
* :class:`SlabLlamaSLAttention`: the layer, projections named as LLaMA's (so PRepBN folds into q/k/v as in a
  softmax layer).

Padding (a 2-D ``attention_mask``, 0 = padding) zeroes the padded tokens' keys and values: they add nothing
to the state, the normaliser or the conv, so a left-padded row computes what the unpadded row does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb, repeat_kv

from .configuration_slab_llama import SlabLlamaConfig

__all__ = ["causal_sla_reference", "causal_sla_chunked", "causal_depthwise_conv", "SlabLlamaSLAttention",
           "make_attention", "SLA_EPS"]

#: Added to the normaliser, as in vision SLA: a query whose kernel features are all 0 outputs 0.
SLA_EPS = 1e-6


def causal_sla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = SLA_EPS) -> torch.Tensor:
    """O(T^2) masked causal linear attention. ``q, k`` ``[B, H, T, d]`` (kernel applied, >= 0), ``v`` ``[B, H, T, e]``.

    Returns ``[B, H, T, e]`` float32: ``O_t = sum_{j<=t} (q_t.k_j) v_j / (sum_{j<=t} q_t.k_j + eps)``.
    """
    q, k, v = q.float(), k.float(), v.float()
    scores = (q @ k.transpose(-1, -2)).tril()
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


def _exclusive_cumsum(x: torch.Tensor, dim: int, start: torch.Tensor | None) -> torch.Tensor:
    """``out[i] = start + sum_{j<i} x[j]`` along ``dim`` (a shifted cumulative sum; no subtraction, so no
    cancellation error)."""
    total = x.cumsum(dim)
    before = torch.cat([torch.zeros_like(total.narrow(dim, 0, 1)), total.narrow(dim, 0, x.shape[dim] - 1)], dim)
    return before if start is None else before + start.unsqueeze(dim)


def causal_sla_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None = None,
                       key_sum: torch.Tensor | None = None, chunk_size: int = 64, eps: float = SLA_EPS
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal linear attention in chunks, continuing from ``state`` / ``key_sum`` (None: an empty prefix).

    ``q, k`` ``[B, H, T, d]`` (kernel applied), ``v`` ``[B, H, T, e]``; ``state`` ``[B, H, d, e]`` (sum of
    ``k_j v_j^T`` over the prefix), ``key_sum`` ``[B, H, d]``. Returns the output ``[B, H, T, e]`` and the new
    ``state`` and ``key_sum``, all float32 with autocast off (the normaliser of a ReLU kernel overflows in
    half precision). Inside a chunk the masked quadratic form, between chunks the carried state; every chunk's
    entry state comes from one cumulative sum over chunks, so there is no Python loop over the sequence.
    """
    batch, heads, length, dim = q.shape
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        if length == 1:  # a decoding step: the recurrence itself, without the chunk bookkeeping
            state = k.transpose(-1, -2) @ v + (0 if state is None else state)
            key_sum = k[:, :, 0] + (0 if key_sum is None else key_sum)
            return (q @ state) / (q @ key_sum.unsqueeze(-1) + eps), state, key_sum
        chunk = max(1, min(chunk_size, length))
        chunks = -(-length // chunk)
        pad = chunks * chunk - length  # zero keys/values add nothing; the padded queries' outputs are dropped
        q, k, v = (F.pad(x, (0, 0, 0, pad)).view(batch, heads, chunks, chunk, x.shape[-1]) for x in (q, k, v))
        chunk_state = k.transpose(-1, -2) @ v  # [B, H, n, d, e]
        chunk_key_sum = k.sum(3)  # [B, H, n, d]
        state_before = _exclusive_cumsum(chunk_state, 2, state)
        key_sum_before = _exclusive_cumsum(chunk_key_sum, 2, key_sum)
        scores = (q @ k.transpose(-1, -2)).tril()  # [B, H, n, C, C]
        numerator = scores @ v + q @ state_before
        normaliser = scores.sum(-1) + (q @ key_sum_before.unsqueeze(-1)).squeeze(-1)
        out = numerator / (normaliser.unsqueeze(-1) + eps)
        out = out.reshape(batch, heads, chunks * chunk, -1)[:, :, :length]
        return out, state_before[:, :, -1] + chunk_state[:, :, -1], key_sum_before[:, :, -1] + chunk_key_sum[:, :, -1]


def causal_depthwise_conv(v: torch.Tensor, conv: nn.Conv1d, tail: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal depthwise conv over the sequence: ``v`` ``[B, H, T, d]``, ``conv`` a ``d``-channel depthwise
    ``Conv1d`` (the same for every head), ``tail`` ``[B, H, kernel - 1, d]`` the values before ``v`` (None: zeros,
    the start of the sequence). Returns the conv output ``[B, H, T, d]`` and the new tail (the last ``kernel - 1``
    values of ``[tail, v]``)."""
    batch, heads, length, dim = v.shape
    context = conv.kernel_size[0] - 1
    if tail is None:
        tail = v.new_zeros(batch, heads, context, dim)
    seq = torch.cat([tail.to(v.dtype), v], dim=2)  # [B, H, context + T, d]
    out = conv(seq.reshape(batch * heads, context + length, dim).transpose(1, 2))  # [BH, d, T]
    return out.transpose(1, 2).reshape(batch, heads, length, dim), seq[:, :, seq.shape[2] - context:]


class SlabLlamaSLAttention(nn.Module):
    """Causal SLA with LLaMA's projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) and ``dwc``, the
    causal depthwise conv on V. Same call as :class:`LlamaAttention`, except that ``attention_mask`` is the 2-D
    padding mask ``[B, T]`` of the new tokens (True/1 = real) or None; returns ``(output, None)`` (there are no
    attention weights)."""

    def __init__(self, config: SlabLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.chunk_size = config.sla_chunk_size
        self.use_rope = config.sla_position == "rope"
        heads, kv_heads, bias = config.num_attention_heads, config.num_key_value_heads, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=bias)
        self.dwc = nn.Conv1d(self.head_dim, self.head_dim, config.sla_conv_kernel, groups=self.head_dim)

    def _state_layer(self, past_key_values):
        from .sla_cache import SLAStateLayer
        layer = past_key_values.layers[self.layer_idx] if self.layer_idx < len(past_key_values.layers) else None
        if not isinstance(layer, SLAStateLayer):
            raise ValueError(f"layer {self.layer_idx} is an SLA layer and keeps a d x d state, but the cache holds "
                             f"{type(layer).__name__} there; pass slab.lm.SlabLlamaCache(config) (what use_cache=True "
                             f"and generate() create by default)")
        return layer

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values=None, **kwargs
                ) -> tuple[torch.Tensor, None]:
        """``hidden_states`` ``[B, T, C]`` -> ``[B, T, C]``; with a cache, continues from (and updates) this layer's
        state."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        q, k = F.relu(q), F.relu(k)
        if attention_mask is not None:
            real = attention_mask.to(k.dtype)[:, None, :, None]  # [B, 1, T, 1]
            k, v = k * real, v * real
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        layer = self._state_layer(past_key_values) if past_key_values is not None else None
        state, key_sum, tail = layer.read() if layer is not None else (None, None, None)
        attn, state, key_sum = causal_sla_chunked(q, k, v, state, key_sum, chunk_size=self.chunk_size)
        local, tail = causal_depthwise_conv(v, self.dwc, tail)
        if layer is not None:
            layer.write(state, key_sum, tail, new_tokens=input_shape[1])
        out = (attn.to(v.dtype) + local).transpose(1, 2).reshape(*input_shape, -1)
        return self.o_proj(out), None


def make_attention(config: SlabLlamaConfig, layer_idx: int) -> nn.Module:
    """The attention module of layer ``layer_idx``: LLaMA's softmax attention ('S') or causal SLA ('L')."""
    if config.layer_attn_types[layer_idx] == "L":
        return SlabLlamaSLAttention(config, layer_idx)
    return LlamaAttention(config=config, layer_idx=layer_idx)
