"""Pure functions: the SLA op and the PRepBN training mix (references and fast paths), and the folding arithmetic."""
from .folding import (affine_of_batchnorm, compose_affine, fold_affine_into_consumer,
                      fold_affine_into_depthwise_consumer, fold_affine_into_producer)
from .linear_attention import linear_attention
from .naive import linear_attention_reference, prepbn_mix_reference
from .prepbn import prepbn_mix

__all__ = ["linear_attention", "linear_attention_reference", "prepbn_mix", "prepbn_mix_reference",
           "affine_of_batchnorm", "compose_affine", "fold_affine_into_consumer", "fold_affine_into_depthwise_consumer",
           "fold_affine_into_producer"]
