"""SLAB for language models: SLAB-LLaMA (PRepBN in place of RMSNorm, foldable to a norm-free LLaMA).

``import slab.lm`` registers ``model_type="slab_llama"`` with transformers' ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads a
saved SLAB-LLaMA, fused or not.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_slab_llama import BN_STATS, LM_NORMS, SlabLlamaConfig
from .modeling_slab_llama import (SlabLlamaDecoderLayer, SlabLlamaForCausalLM, SlabLlamaModel,
                                  SlabLlamaPreTrainedModel)
from .callbacks import PRepBNCallback
from .norm import CausalRepBN
from .sla_cache import SlabLlamaCache

AutoConfig.register(SlabLlamaConfig.model_type, SlabLlamaConfig, exist_ok=True)
AutoModel.register(SlabLlamaConfig, SlabLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(SlabLlamaConfig, SlabLlamaForCausalLM, exist_ok=True)

__all__ = ["SlabLlamaConfig", "SlabLlamaModel", "SlabLlamaForCausalLM", "SlabLlamaPreTrainedModel",
           "SlabLlamaDecoderLayer", "CausalRepBN", "PRepBNCallback", "LM_NORMS", "BN_STATS", "SlabLlamaCache"]
