"""timm's stage interface written once for every staged family (PVT v1/v2, Swin, CSwin).

A family mixes :class:`StagedModel` in ahead of ``nn.Module`` and supplies its stages; the mixin gives it
``forward_intermediates``, ``prune_intermediate_layers``, ``set_grad_checkpointing`` and the eager loops over
the stages and their blocks. The family supplies:

* ``num_stages``, ``feature_info`` (one entry per stage), ``grad_checkpointing`` (False at construction);
* ``stage_output_fmt``: the layout its stages hand on, ``'NCHW'`` (PVT) or ``'NHWC'`` (Swin, CSwin);
* ``has_final_norm``: whether ``self.norm`` follows the last stage;
* ``_embed(x)``: input checks and whatever runs before stage 0;
* ``_stage(i, x)``: stage ``i``, whose output is the feature ``forward_intermediates`` taps;
* ``_remove_stages(keep)``: drop the modules of stages ``keep, keep + 1, ...`` (their attribute names are the
  authors' checkpoint keys, so each family knows its own).

TorchScript compiles none of this (it cannot loop over stages held under computed names); each family's
``forward_features`` takes its written-out path when scripted.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.models._features import feature_take_indices

__all__ = ["StagedModel"]


class StagedModel:
    """Mixin: intermediates, pruning and gradient checkpointing over a family's stages (see the module docstring)."""

    stage_output_fmt: str = "NCHW"
    has_final_norm: bool = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def run_blocks(self, blocks: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        """``x`` through ``blocks`` (each called ``blk(x, *args)``), checkpointed when enabled."""
        for blk in blocks:
            if self.grad_checkpointing:
                x = torch.utils.checkpoint.checkpoint(blk, x, *args, use_reentrant=False)
            else:
                x = blk(x, *args)
        return x

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and every stage (no final norm): the eager body of ``forward_features``."""
        x = self._embed(x)
        for i in range(self.num_stages):
            x = self._stage(i, x)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.has_final_norm else x

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs at ``indices`` (last n if int, all if None), as in timm.

        ``norm`` applies the final norm (where the family has one) to the last stage's output. Returns the
        list, or ``(final features, list)`` unless ``intermediates_only``; the final features are normalised
        only when the last stage ran.
        """
        formats = tuple(dict.fromkeys(("NCHW", self.stage_output_fmt)))
        if output_fmt not in formats:
            raise ValueError(f"output_fmt must be one of {formats}, got {output_fmt!r}")
        take, max_index = feature_take_indices(self.num_stages, indices)
        last = max_index if stop_early else self.num_stages - 1
        x = self._embed(x)
        intermediates = []
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in take:
                y = self.final_norm(x) if norm and i == self.num_stages - 1 else x
                intermediates.append(self._in_format(y, output_fmt))
        if intermediates_only:
            return intermediates
        return (self.final_norm(x) if last == self.num_stages - 1 else x), intermediates

    def _in_format(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        if output_fmt == self.stage_output_fmt:
            return x
        return x.permute(0, 3, 1, 2).contiguous()  # NHWC stages, NCHW asked

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices``, the final norm when asked or when it no longer fits
        (it is made for the last stage), and the head; returns the absolute indices."""
        take, max_index = feature_take_indices(self.num_stages, indices)
        keep = max_index + 1
        if self.has_final_norm and (prune_norm or keep < self.num_stages):
            self.norm = nn.Identity()
        self._remove_stages(keep)
        self.num_stages = keep
        self.feature_info = self.feature_info[:keep]
        self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
        if prune_head:
            self.reset_classifier(0, "")
        return take
