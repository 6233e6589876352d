"""SLAB-LLaMA: LLaMA with progressive re-parameterised BatchNorm in place of RMSNorm.

Paper: "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized
Batch Normalization" (Guo et al., ICML 2024), section on LLaMA. Every RMSNorm of a LLaMA decoder
(``input_layernorm``, ``post_attention_layernorm``, the final ``norm``) becomes
``PRepBN = lam * RMSNorm + (1 - lam) * RepBN`` in training and RepBN in eval; after training,
:func:`slab.fuse` folds each RepBN into the projections that read it (q/k/v, gate/up, lm_head) and
returns a norm-free model (``norm='none'``) that computes the same function.

Attention, MLP and rotary embedding are transformers' LLaMA modules; submodule names are LLaMA's, so
a LLaMA checkpoint converts by copying (:meth:`SlabLlamaForCausalLM.from_llama`). ``attn_type`` makes some
or all layers causal SLA (:mod:`slab.lm.sla`), which generate with a constant-size state
(:class:`slab.lm.sla_cache.SlabLlamaCache`).
"""
import copy

import torch
import torch.nn as nn
from transformers import GenerationMixin, LlamaForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRotaryEmbedding
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ..layers.norm import PRepBN, RepBN
from ..reparam.fold import NotFoldableError
from .configuration_slab_llama import SlabLlamaConfig
from .norm import MASKED_NORMS, apply_norm, fold_norm, make_norm
from .sla import SlabLlamaSLAttention, make_attention
from .sla_cache import SlabLlamaCache

__all__ = ["SlabLlamaDecoderLayer", "SlabLlamaPreTrainedModel", "SlabLlamaModel", "SlabLlamaForCausalLM"]

logger = logging.get_logger(__name__)


def _ensure_bias(linear: nn.Linear) -> None:
    """Give ``linear`` a zero bias if it has none (the folded layout always has one)."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device,
                                               dtype=linear.weight.dtype))


def _rope_type(config: SlabLlamaConfig) -> str:
    return (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")


class SlabLlamaDecoderLayer(GradientCheckpointingLayer):
    """LLaMA decoder layer (pre-norm attention + SwiGLU MLP) with a configurable norm and attention type."""

    def __init__(self, config: SlabLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = make_attention(config, layer_idx)
        self.uses_sla = isinstance(self.self_attn, SlabLlamaSLAttention)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = make_norm(config)
        self.post_attention_layernorm = make_norm(config)
        if config.folded_bias:
            for linear in self._consumers():
                _ensure_bias(linear)

    def _consumers(self) -> list[nn.Linear]:
        return [self.self_attn.q_proj, self.self_attn.k_proj, self.self_attn.v_proj,
                self.mlp.gate_proj, self.mlp.up_proj]

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool | None = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                token_mask: torch.Tensor | None = None, first_token: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        """``hidden_states`` ``[B, T, C]``; ``token_mask`` ``[B, T]`` bool (True = real token) for BN statistics;
        ``first_token`` ``[B, T]`` bool marks each sequence's first token (``first_token_affine`` configs);
        ``padding_mask`` ``[B, T]`` (1 = real token) is what an SLA layer takes in place of ``attention_mask``."""
        residual = hidden_states
        hidden_states = apply_norm(self.input_layernorm, hidden_states, token_mask, first_token)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states,
                                          attention_mask=padding_mask if self.uses_sla else attention_mask,
                                          position_ids=position_ids, past_key_values=past_key_values,
                                          use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = apply_norm(self.post_attention_layernorm, hidden_states, token_mask, first_token)
        return residual + self.mlp(hidden_states)

    def fuse(self) -> "SlabLlamaDecoderLayer":
        """Fold ``input_layernorm`` into q/k/v and ``post_attention_layernorm`` into gate/up (eval form)."""
        attn, mlp = self.self_attn, self.mlp
        self.input_layernorm = fold_norm(self.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        self.post_attention_layernorm = fold_norm(self.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for linear in self._consumers():
            _ensure_bias(linear)
        return self


class SlabLlamaPreTrainedModel(PreTrainedModel):
    config_class = SlabLlamaConfig
    config: SlabLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SlabLlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Eval forwards (what generate() compiles) have no data-dependent control flow: the input checks that read
    # values run on CPU tensors only, outside torch.compile.
    _can_compile_fullgraph = True
    # transformers' hooks record these modules' outputs for output_hidden_states / output_attentions.
    _can_record_outputs = {"hidden_states": SlabLlamaDecoderLayer, "attentions": LlamaAttention}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Children are initialised before their parent, so this overrides the BatchNorm defaults (1/0).
        if isinstance(module, RepBN):
            init.constant_(module.alpha, self.config.repbn_alpha_init)
            init.zeros_(module.bn.weight)
            init.zeros_(module.bn.bias)
            if getattr(module, "first_scale", None) is not None:
                init.zeros_(module.first_scale)
                init.zeros_(module.first_shift)
        elif isinstance(module, PRepBN):
            init.constant_(module.lam, module.lam_value)  # non-persistent buffer


class SlabLlamaModel(SlabLlamaPreTrainedModel):
    """The decoder stack: embeddings -> layers -> final norm. Returns :class:`BaseModelOutputWithPast`."""

    def __init__(self, config: SlabLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([SlabLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = make_norm(config)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def _check_inputs(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
        """Shape and dtype checks (metadata only); the range of token ids only where reading values costs no
        device-to-host copy: a CPU tensor, outside compilation and tracing. On an accelerator an out-of-range id
        fails in the embedding lookup, as in any transformers model."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids [B, T] or inputs_embeds [B, T, C]")
        shape = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape)
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {shape}")
        if input_ids is not None and input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids (torch.long or torch.int32), got {input_ids.dtype}; "
                             f"tokenize the text (tokenizer(..., return_tensors='pt')) or cast with .long()")
        if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size):
            raise ValueError(f"inputs_embeds must be [B, T, {self.config.hidden_size}], got shape {shape}")
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"empty batch: input of shape {shape} has no tokens")
        if (input_ids is not None and input_ids.device.type == "cpu" and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing()):
            vocab = self.embed_tokens.num_embeddings  # follows resize_token_embeddings
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            if lo < 0 or hi >= vocab:
                raise ValueError(f"input_ids must be in [0, {vocab}), got values in [{lo}, {hi}]")

    def _warn_past_context(self, past_seen: int, length: int) -> None:
        """RoPE has no hard length limit, and transformers' LLaMA runs past ``max_position_embeddings`` (RoPE scaling
        relies on it); beyond the trained context of an unscaled RoPE the outputs degrade, so say so, once.
        :meth:`SlabLlamaForCausalLM.generate` refuses such lengths up front."""
        last = past_seen + length - 1
        if (isinstance(last, int) and last >= self.config.max_position_embeddings and _rope_type(self.config) == "default"
                and not torch.compiler.is_compiling()):
            logger.warning_once(f"position {last} (past {past_seen} + {length} new tokens) is beyond "
                                f"max_position_embeddings={self.config.max_position_embeddings}, the context the "
                                f"model was built for; outputs there are extrapolated")

    def _token_mask(self, attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
        """``[B, T]`` bool of real tokens for the BN statistics (training only; eval uses running statistics)."""
        if attention_mask is None or not self.training or attention_mask.dim() != 2:
            return None
        if not any(isinstance(m, MASKED_NORMS) for m in (self.norm, self.layers[0].input_layernorm)):
            return None
        if attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not cover the input "
                             f"[{batch}, {length}]")
        return attention_mask[:, -length:].to(torch.bool)

    def _first_token(self, attention_mask: torch.Tensor | None, batch: int, length: int, past_seen: int,
                     device: torch.device) -> torch.Tensor | None:
        """``[B, T]`` bool marking each row's first real token (``first_token_affine`` only; None when the input
        continues a cached prefix, which holds that token). Left padding: the first position the mask keeps."""
        if not self.config.first_token_affine or past_seen > 0:
            return None
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask[:, -length:].to(torch.bool)
            start = real.to(torch.int8).argmax(dim=1)  # first True (0 for a row with none)
        else:
            start = torch.zeros(batch, dtype=torch.long, device=device)
        return torch.arange(length, device=device).unsqueeze(0) == start.unsqueeze(1)

    def _padding_mask(self, attention_mask: torch.Tensor | None, past_key_values: Cache | None, batch: int,
                      length: int) -> torch.Tensor | None:
        """The new tokens' ``[B, T]`` padding mask for SLA layers (None without SLA layers or without a mask); checks
        that an SLA model got a cache it can use and a mask it can read."""
        if not self.config.has_sla:
            return None
        if past_key_values is not None and not isinstance(past_key_values, SlabLlamaCache):
            raise ValueError(f"this model has SLA layers (attn_type={self.config.attn_type!r}), which keep a "
                             f"constant-size state, not a KV cache; got {type(past_key_values).__name__}. Pass "
                             f"slab.lm.SlabLlamaCache(model.config) or use_cache=True (static, offloaded and quantized "
                             f"caches are not available for SLA layers)")
        if past_key_values is not None and past_key_values.layer_attn_types != self.config.layer_attn_types:
            raise ValueError(f"the SlabLlamaCache was built for layers {past_key_values.layer_attn_types!r} but this model's "
                             f"layers are {self.config.layer_attn_types!r}; build it with SlabLlamaCache(model.config)")
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
            raise ValueError(f"SLA layers need a 2D padding attention_mask [B, past + T] = [{batch}, >= {length}] "
                             f"(1 = real token), got shape {tuple(attention_mask.shape)}")
        return attention_mask[:, -length:]

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutputWithPast:
        """``input_ids`` ``[B, T]`` (or ``inputs_embeds`` ``[B, T, C]``); ``attention_mask`` ``[B, past + T]``
        (1 = real token) or a prepared 4D mask. Returns ``last_hidden_state`` ``[B, T, C]``; ``hidden_states`` and
        ``attentions`` with ``output_hidden_states`` / ``output_attentions`` (recorded by transformers' hooks)."""
        self._check_inputs(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = SlabLlamaCache(self.config) if self.config.has_sla else DynamicCache(config=self.config)
        padding_mask = self._padding_mask(attention_mask, past_key_values, batch, length)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(length, device=inputs_embeds.device) + past_seen).unsqueeze(0)
            self._warn_past_context(past_seen, length)
        token_mask = self._token_mask(attention_mask, batch, length)
        first_token = self._first_token(attention_mask, batch, length, past_seen, inputs_embeds.device)
        causal_mask = None
        if "S" in self.config.layer_attn_types:  # SLA layers are causal by construction and take padding_mask
            causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                             attention_mask=attention_mask, past_key_values=past_key_values,
                                             position_ids=position_ids,
                                             layer_idx=self.config.layer_attn_types.index("S"))
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(hidden_states, attention_mask=causal_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  position_embeddings=position_embeddings, token_mask=token_mask,
                                  first_token=first_token, padding_mask=padding_mask, **kwargs)
        hidden_states = apply_norm(self.norm, hidden_states, token_mask, first_token)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class SlabLlamaForCausalLM(SlabLlamaPreTrainedModel, GenerationMixin):
    """SLAB-LLaMA with a language-model head. ``generate()`` works with the KV cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # LLaMA's plans: a tied head reads the (sharded) embedding matrix, so it needs its own TP entry.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: SlabLlamaConfig):
        super().__init__(config)
        self.model = SlabLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.folded_bias)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs: Unpack[TransformersKwargs]) -> CausalLMOutputWithPast:
        """Logits ``[B, T, V]`` (the positions ``logits_to_keep`` selects: the last ones if an int > 0); ``loss``
        when ``labels`` is given (shifted inside, -100 ignored) or ``shift_labels`` (already aligned with the
        logits, as sequence-parallel trainers pass them)."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """With SLA layers, generate() decodes with a :class:`SlabLlamaCache` (constant-size SLA states beside the
        softmax layers' KV caches); the other cache implementations hold keys and values only and are refused."""
        if (not self.config.has_sla or model_kwargs.get("past_key_values") is not None
                or generation_config.use_cache is False):
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.cache_implementation is not None:
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} is not available for a "
                             f"model with SLA layers (attn_type={self.config.attn_type!r}): they keep a d x d state, "
                             f"not keys and values; leave cache_implementation unset (SlabLlamaCache is used)")
        model_kwargs["past_key_values"] = SlabLlamaCache(self.config)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args, **kwargs) -> dict:
        """generate() with an unscaled RoPE stops at ``max_position_embeddings`` with a ``ValueError`` (the model
        forward itself only warns there, as LLaMA's does not refuse)."""
        if input_ids is not None and _rope_type(self.config) == "default" \
                and input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence too long: generating position {input_ids.shape[1] - 1} but "
                             f"max_position_embeddings is {self.config.max_position_embeddings}; lower max_new_tokens, "
                             f"truncate the prompt, raise max_position_embeddings or configure RoPE scaling")
        return super().prepare_inputs_for_generation(input_ids, *args, **kwargs)

    # ----------------------------------------------------------------------------------------- fusion
    def fuse(self) -> "SlabLlamaForCausalLM":
        """Fold the final norm into ``lm_head`` (untying it from the embeddings) and mark the config fused.

        Called by :func:`slab.fuse`, which then folds every decoder layer (its ``fuse()``). The result has
        ``norm='none'``, ``folded_bias=True``, ``tie_word_embeddings=False`` and saves/loads as such.
        """
        if not self.config.foldable:
            raise NotFoldableError(f"norm={self.config.norm!r} normalises with per-token statistics and cannot be "
                                   f"folded; train with norm='prepbn' (see SlabLlamaForCausalLM.from_llama)")
        if self.lm_head.weight is self.model.embed_tokens.weight or self.config.tie_word_embeddings:
            self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach().clone())
        self.model.norm = fold_norm(self.model.norm, [self.lm_head])
        _ensure_bias(self.lm_head)
        self.config.norm = "none"
        self.config.folded_bias = True
        self.config.tie_word_embeddings = False
        self.all_tied_weights_keys = {}
        return self

    # ------------------------------------------------------------------------------------ conversion
    @classmethod
    def from_llama(cls, llama: LlamaForCausalLM, norm: str = "prepbn", **config_overrides
                   ) -> "SlabLlamaForCausalLM":
        """A SLAB-LLaMA with the weights of a transformers ``LlamaForCausalLM`` (copied, not shared).

        ``norm='rmsnorm'`` gives the same model (identical logits); ``norm='prepbn'`` copies each RMSNorm gain
        into the PRepBN's RMSNorm branch, so in training with ``lam = 1`` (the start of the PRepBN schedule) the
        logits are identical too. The RepBN branch starts as the zero map (alpha and BN affine 0, as the authors
        did); fine-tune with :class:`slab.PRepBNSchedule`, recalibrate the BN statistics, then :func:`slab.fuse`.
        Before that, an eval-mode 'prepbn' model (RepBN only) is not a usable language model.
        """
        if norm not in ("rmsnorm", "prepbn"):
            raise ValueError(f"from_llama supports norm='rmsnorm' or 'prepbn' (got {norm!r}); 'repbn' would drop "
                             f"the RMSNorm gains and 'none' is what slab.fuse returns after training")
        if not isinstance(llama, LlamaForCausalLM):
            raise ValueError(f"from_llama expects a transformers LlamaForCausalLM, got {type(llama).__name__}")
        src = llama.config.to_dict()
        for key in ("model_type", "architectures", "quantization_config", "_name_or_path", "transformers_version",
                    "auto_map", "_commit_hash", "dtype", "torch_dtype"):
            src.pop(key, None)
        src.update(norm=norm, **config_overrides)
        config = SlabLlamaConfig(**src)
        config._attn_implementation = llama.config._attn_implementation
        ref = next(llama.parameters())
        with init.no_init_weights():
            model = cls(config)
        model.to(device=ref.device, dtype=ref.dtype)
        state = {}
        for key, value in llama.state_dict().items():
            if norm == "prepbn" and key.endswith("norm.weight"):
                key = key[: -len("weight")] + "ln.weight"
            state[key] = value  # load_state_dict copies
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (".repbn." in k or (config.tie_word_embeddings and k == "lm_head.weight"))]
        if missing or unexpected:
            raise ValueError(f"from_llama: LLaMA weights do not map onto SLAB-LLaMA: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if config.tie_word_embeddings:
            model.tie_weights()
        model._reset_bn_branches()
        model.generation_config = copy.deepcopy(llama.generation_config)
        model.train(llama.training)
        return model

    def _reset_bn_branches(self) -> None:
        """The authors' LM initialisation of every RepBN: alpha 0 (config), BN affine 0, statistics 0/1."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, RepBN):
                    m.alpha.fill_(self.config.repbn_alpha_init)
                    m.bn.weight.zero_()
                    m.bn.bias.zero_()
                    if getattr(m, "first_scale", None) is not None:
                        m.first_scale.zero_()
                        m.first_shift.zero_()
                    m.bn.reset_running_stats()
                if isinstance(m, PRepBN):
                    m.set_lambda(1.0)

    def to_llama(self) -> LlamaForCausalLM:
        """The equivalent transformers ``LlamaForCausalLM`` (only for ``norm='rmsnorm'``)."""
        if self.config.norm != "rmsnorm":
            raise ValueError(f"only an rmsnorm SLAB-LLaMA is a plain LLaMA; this one has norm={self.config.norm!r}")
        if self.config.has_sla:
            raise ValueError(f"only a softmax-attention SLAB-LLaMA is a plain LLaMA; this one has "
                             f"attn_type={self.config.attn_type!r}")
        from transformers import LlamaConfig
        src = self.config.to_dict()
        for key in ("model_type", "architectures", "norm", "bn_eps", "bn_momentum", "repbn_alpha_init", "bn_stats",
                    "folded_bias", "transformers_version", "dtype", "attn_type", "sla_conv_kernel", "sla_position",
                    "sla_chunk_size"):
            src.pop(key, None)
        llama = LlamaForCausalLM(LlamaConfig(**src))
        llama.load_state_dict(self.state_dict(), strict=False)
        if llama.config.tie_word_embeddings:
            llama.tie_weights()
        return llama.to(next(self.parameters()).dtype)

