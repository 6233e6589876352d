"""nn.Module building blocks: norms (RepBN, PRepBN) and attention (softmax, SLA) with their lookups."""
from .attention import (ATTN_FORMS, ATTN_KINDS, SimplifiedLinearAttention, SLACore, SoftmaxAttention, dwc_on_tokens,
                        get_attn_layer, merge_heads, parse_attn, resize_positional_encoding, split_heads)
from .norm import (NORM_CHOICES, ChannelAffine, PRepBN, RepBN, RMSNorm, TokenBatchNorm, get_norm_layer,
                   set_prepbn_lambda)

__all__ = ["ATTN_FORMS", "ATTN_KINDS", "SimplifiedLinearAttention", "SLACore", "SoftmaxAttention", "dwc_on_tokens",
           "get_attn_layer", "merge_heads", "parse_attn", "resize_positional_encoding", "split_heads", "NORM_CHOICES",
           "ChannelAffine", "PRepBN", "RepBN", "RMSNorm", "TokenBatchNorm", "get_norm_layer", "set_prepbn_lambda"]
