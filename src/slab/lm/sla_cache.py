"""Generation cache of SLAB-LLaMA with SLA layers: a constant-size state per SLA layer beside softmax KV caches.

An SLA layer's past is, per head, ``S = sum_j k_j v_j^T`` (``[d, d]``), ``z = sum_j k_j`` (``[d]``), both float32,
and the last ``sla_conv_kernel - 1`` values for the causal conv on V: ``B * H * (d^2 + d + (kernel - 1) d)``
numbers, whatever the context length. Softmax layers of a hybrid model keep transformers' ``DynamicLayer``.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .configuration_slab_llama import SlabLlamaConfig

__all__ = ["SLAStateLayer", "SlabLlamaCache", "cache_bytes"]


class SLAStateLayer(CacheLayerMixin):
    """One SLA layer's past: ``state`` ``[B, H, d, d]``, ``key_sum`` ``[B, H, d]`` (float32) and ``value_tail``
    ``[B, H, kernel - 1, d]``; ``seen`` counts the tokens folded in (the sequence length for positions and masks).
    """

    supports_early_init = False  # filled by the layer's first forward, not by key/value tensors

    def __init__(self, **kwargs):
        super().__init__()
        self.state: torch.Tensor | None = None
        self.key_sum: torch.Tensor | None = None
        self.value_tail: torch.Tensor | None = None
        self.seen = 0

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in ("state", "key_sum", "value_tail")
                if getattr(self, name) is not None}

    def read(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        return self.state, self.key_sum, self.value_tail

    def write(self, state: torch.Tensor, key_sum: torch.Tensor, value_tail: torch.Tensor, new_tokens: int) -> None:
        self.state, self.key_sum, self.value_tail = state, key_sum, value_tail
        self.seen += new_tokens
        self.is_initialized = True

    # CacheLayerMixin's key/value interface does not apply to a state.
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise ValueError("an SLA layer's cache holds a state, not keys and values; it is filled by the layer itself")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise ValueError("update(keys, values) was called on an SLA layer's cache: SLA layers keep a d x d state "
                         "(SLAStateLayer.write), not a KV cache")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = self.key_sum = self.value_tail = None
        self.seen = 0
        self.is_initialized = False

    def _map(self, fn) -> None:
        for name, tensor in self._tensors().items():
            setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        pass  # never offloaded by SlabLlamaCache (no offloading option)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("an SLA state cannot be cropped: tokens once summed into it cannot be taken out "
                         "(assisted/speculative decoding and DoLa need a KV cache; use an attn_type='softmax' model)")


class SlabLlamaCache(Cache):
    """Per layer of ``config.layer_attn_types``: a ``DynamicLayer`` (KV cache) for 'S', an :class:`SLAStateLayer`
    for 'L'. ``use_cache=True`` and ``generate()`` create it for models with SLA layers."""

    def __init__(self, config: SlabLlamaConfig):
        self.layer_attn_types = config.layer_attn_types
        layers = [SLAStateLayer() if kind == "L" else DynamicLayer() for kind in self.layer_attn_types]
        super().__init__(layers=layers)


def cache_bytes(cache: Cache) -> int:
    """Bytes held by the tensors of ``cache`` (KV caches and SLA states)."""
    total = 0
    for layer in cache.layers:
        tensors = layer._tensors().values() if isinstance(layer, SLAStateLayer) else (layer.keys, layer.values)
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total
