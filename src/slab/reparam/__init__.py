"""Fusion (norm folding) and export."""
from .fold import (FOLDABLE_NORMS, NORM_TYPES, NotFoldableError, as_channel_affine, fold_into_consumers,
                   fold_into_producer, norm_affine, zero_preimage)
from .fuse import default_statistics_paths, fuse, remaining_norms

__all__ = ["FOLDABLE_NORMS", "NORM_TYPES", "NotFoldableError", "as_channel_affine", "fold_into_consumers",
           "fold_into_producer", "norm_affine", "zero_preimage", "default_statistics_paths", "fuse",
           "remaining_norms"]
