"""How every op of :mod:`slab.ops` chooses between its torch path and its Triton kernels (``impl=``)."""
from __future__ import annotations

import os
from typing import Callable

import torch

__all__ = ["IMPLS", "triton_auto_allowed", "triton_importable", "choose_impl", "load_kernels"]

IMPLS = (None, "torch", "triton")

_importable: dict = {}


def triton_auto_allowed(x: torch.Tensor) -> bool:
    """Whether an automatic ``impl`` choice may take a Triton path for ``x``: a CUDA tensor, ``SLAB_TRITON=1`` in
    the environment, and not under tracing or compiling (exporters and dynamo cannot see into a Triton launch).

    The kernels are verified only under Triton's interpreter so far (no GPU has been lent to this project yet):
    until a GPU run has checked them compiled, the automatic choice needs that opt-in."""
    if not x.is_cuda or not torch.cuda.is_available() or os.environ.get("SLAB_TRITON", "0") != "1":
        return False
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())


def triton_importable(load: Callable) -> bool:
    """Whether ``load()`` (an op's Triton kernel module) imports, checked once per module; the automatic choice
    falls back to torch when not."""
    if load not in _importable:
        try:
            load()
            _importable[load] = True
        except Exception:  # noqa: BLE001 - a missing or broken Triton install: use the torch path
            _importable[load] = False
    return _importable[load]


def choose_impl(op: str, impl: str | None, load: Callable, x: torch.Tensor, *inputs) -> str:
    """``impl`` itself when given (after checking it), else automatic: 'triton' where :func:`triton_auto_allowed`
    for ``x``, the kernels import and their ``unsupported(*inputs)`` finds nothing; 'torch' otherwise, on purpose
    and by this check."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of None (automatic), 'torch', 'triton'; got {impl!r}")
    if impl is not None:
        return impl
    if not triton_auto_allowed(x) or not triton_importable(load) or load().unsupported(*inputs) is not None:
        return "torch"
    return "triton"


def load_kernels(op: str, load: Callable):
    """The kernel module for an explicit ``impl='triton'``: a missing Triton is an error naming the op."""
    try:
        return load()
    except ImportError as e:
        raise RuntimeError(f"{op}(impl='triton') needs an importable triton package: {e}") from e
