"""nn.Module building blocks: norms (RepBN, PRepBN) and attention (softmax, SLA)."""
from .attention import (SimplifiedLinearAttention, SoftmaxAttention, dwc_on_values, merge_heads,
                        resize_positional_encoding, split_heads)
from .norm import (NORM_CHOICES, ChannelAffine, PRepBN, RepBN, RMSNorm, TokenBatchNorm, get_norm_layer,
                   set_prepbn_lambda)

__all__ = ["SimplifiedLinearAttention", "SoftmaxAttention", "dwc_on_values", "merge_heads",
           "resize_positional_encoding", "split_heads", "NORM_CHOICES", "ChannelAffine", "PRepBN", "RepBN",
           "RMSNorm", "TokenBatchNorm", "get_norm_layer", "set_prepbn_lambda"]
