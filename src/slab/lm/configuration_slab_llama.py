"""Configuration of SLAB-LLaMA: a LLaMA decoder whose RMSNorms can be PRepBN/RepBN, and folded away.

The fields are LLaMA's (:class:`transformers.LlamaConfig`, so a LLaMA config converts by adding
``norm=``) plus the normalization ones below.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

__all__ = ["SlabLlamaConfig", "LM_NORMS", "BN_STATS", "ATTN_TYPES", "SLA_POSITIONS"]

#: 'rmsnorm' is LLaMA's baseline, 'prepbn' the progressive RMSNorm -> RepBN replacement, 'repbn' RepBN
#: from the start, 'none' the norm-free (fused) form.
LM_NORMS = ("rmsnorm", "prepbn", "repbn", "none")
#: Where BatchNorm takes its statistics in training (eval always uses the running statistics):
#: 'batch' all real tokens of the batch (the authors'; a position sees its sequence's future through
#: the mean/variance), 'causal' tokens at positions <= t of every row (no future leak),
#: 'running' the running statistics (no leak, no gradient through the statistics); 'frozen' the running
#: statistics, never updated: training then optimises exactly the eval form, the model that folds.
BN_STATS = ("batch", "causal", "running", "frozen")
#: Whole-model attention types; a string of one letter per layer ('S' softmax, 'L' SLA) mixes them.
ATTN_TYPES = {"softmax": "S", "sla": "L"}
#: Position information of SLA layers: 'rope' rotates q and k before the ReLU kernel, 'none' leaves
#: positions to the causal depthwise conv on V (and to the causal order itself).
SLA_POSITIONS = ("rope", "none")


@strict
class SlabLlamaConfig(LlamaConfig):
    r"""LLaMA configuration plus:

    norm (`str`, defaults to "prepbn"): one of ``LM_NORMS``.
    bn_eps (`float`): BatchNorm epsilon of RepBN.
    bn_momentum (`float`): BatchNorm running-statistics momentum.
    repbn_alpha_init (`float`, defaults to 0.0): initial RepBN ``alpha``. BN weight and bias start at 0 as
        well (the authors' language-model initialisation): the BN branch starts as the zero map and is
        learned while ``lam`` decays.
    bn_stats (`str`, defaults to "batch"): one of ``BN_STATS``.
    bn_causal_prior (`float`, defaults to 256.0): with ``bn_stats='causal'``, the prefix statistics of position
        ``t`` are shrunk towards the running statistics as if these were that many extra tokens (the first
        positions have only a few tokens per batch, and their noisy statistics are far from the running ones
        used in eval; 0: the plain prefix statistics). Past batches only: no future token leaks in.
    first_token_affine (`bool`): each sequence's first token (the attention sink, whose residual stream is far
        larger than the others' in pretrained LLaMAs) stays out of the BN statistics and gets its own
        per-channel affine in every RepBN; after folding, a :class:`slab.lm.norm.FirstTokenAffine` on that token.
    folded_bias (`bool`): the consumers of folded norms (q/k/v, gate/up projections, lm_head) carry a bias.
        Set by :func:`slab.fuse`, together with ``norm='none'`` and ``tie_word_embeddings=False`` (folding the
        final norm into lm_head scales its columns, so it can no longer share the embedding matrix).
    attn_type (`str`, defaults to "softmax"): 'softmax' (LLaMA's attention), 'sla' (causal simplified linear
        attention, :mod:`slab.lm.sla`) or one letter per layer, 'S' softmax / 'L' SLA (e.g. 'SLSL').
    sla_conv_kernel (`int`, defaults to 4): kernel size of the causal depthwise conv on V in SLA layers.
    sla_position (`str`, defaults to "rope"): one of ``SLA_POSITIONS``.
    sla_chunk_size (`int`, defaults to 64): tokens per chunk of the chunked parallel SLA form (quadratic inside
        a chunk, a carried d x d state between chunks); changes speed, not results.
    """

    model_type = "slab_llama"

    norm: str = "prepbn"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    repbn_alpha_init: float = 0.0
    bn_stats: str = "batch"
    bn_causal_prior: float = 256.0
    first_token_affine: bool = False
    folded_bias: bool = False
    attn_type: str = "softmax"
    sla_conv_kernel: int = 4
    sla_position: str = "rope"
    sla_chunk_size: int = 64

    def __post_init__(self, **kwargs):
        if self.norm not in LM_NORMS:
            raise ValueError(f"SlabLlamaConfig.norm must be one of {LM_NORMS}, got {self.norm!r}")
        if self.bn_stats not in BN_STATS:
            raise ValueError(f"SlabLlamaConfig.bn_stats must be one of {BN_STATS}, got {self.bn_stats!r}")
        if not self.bn_causal_prior >= 0.0:
            raise ValueError(f"SlabLlamaConfig.bn_causal_prior must be >= 0 (a token count), got {self.bn_causal_prior}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"SlabLlamaConfig.bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if self.bn_eps <= 0:
            raise ValueError(f"SlabLlamaConfig.bn_eps must be positive, got {self.bn_eps}")
        if self.sla_conv_kernel < 1:
            raise ValueError(f"SlabLlamaConfig.sla_conv_kernel must be >= 1, got {self.sla_conv_kernel}")
        if self.sla_position not in SLA_POSITIONS:
            raise ValueError(f"SlabLlamaConfig.sla_position must be one of {SLA_POSITIONS}, got {self.sla_position!r}")
        if self.sla_chunk_size < 1:
            raise ValueError(f"SlabLlamaConfig.sla_chunk_size must be >= 1, got {self.sla_chunk_size}")
        super().__post_init__(**kwargs)
        self.layer_attn_types  # validates attn_type against num_hidden_layers

    @property
    def layer_attn_types(self) -> str:
        """One letter per layer, 'S' softmax or 'L' SLA (read, not stored: follows ``num_hidden_layers``)."""
        from ..layers.attention import attn_letters, parse_attn  # the models' parser: one grammar for attn=
        return attn_letters(parse_attn(self.attn_type, self.num_hidden_layers, unit="layer",
                                       name="SlabLlamaConfig.attn_type"))

    @property
    def has_sla(self) -> bool:
        return "L" in self.layer_attn_types

    @property
    def foldable(self) -> bool:
        """True when every norm can be folded (eval form is a per-channel affine)."""
        return self.norm in ("prepbn", "repbn", "none")
