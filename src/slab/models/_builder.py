"""Model construction shared by every family: timm's builder, input checks, checkpoint loading."""
from __future__ import annotations

import contextlib
import difflib
import gzip
import json
import os
import re
import sys
from importlib import resources
from typing import Callable

import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, register_notrace_function

from ..errors import UserError, did_you_mean
from ..files import load_safetensors, torch_load
from ._authors import unwrap_checkpoint


def build_slab_model(model_cls: type, variant: str, pretrained: bool, filter_fn: Callable,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                     **kwargs) -> nn.Module:
    """``timm.build_model_with_cfg`` with our checkpoint filter (for timm's own ``pretrained=True`` path).

    ``device`` / ``dtype`` are timm's factory arguments: the model is built with ``device`` as the default
    device (``'meta'`` allocates nothing), then its floating-point tensors are cast to ``dtype``.
    """
    kwargs.setdefault("feature_cfg", dict(feature_cls="getter")) if kwargs.get("features_only") else None
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic depth rates rising linearly over ``depth`` blocks (computed on the CPU: also under a
    ``torch.device('meta')`` default, where a tensor has no values)."""
    return torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()


def new_classifier(model: nn.Module, in_features: int, num_classes: int) -> nn.Module:
    """A head for ``reset_classifier``: on the model's device and dtype, in its train/eval mode."""
    if num_classes <= 0:
        return nn.Identity()
    ref = next(model.parameters(), None)
    head = nn.Linear(in_features, num_classes, device=None if ref is None else ref.device,
                     dtype=None if ref is None else ref.dtype)
    return head.train(model.training)


def init_linear_layers(model: nn.Module, std: float = 0.02) -> None:
    """The ViT initialisation every family uses: Linear weights truncated normal (std 0.02), biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register_notrace_function  # raises on shapes: FX calls it with the real input instead of tracing it
def check_image_input(x: torch.Tensor, in_chans: int, multiple_of: int = 1, model: nn.Module | str | None = None,
                      min_size: int = 1) -> None:
    """Raise a ValueError naming the expected shape when ``x`` is not ``[B, in_chans, H, W]`` with valid H, W.

    ``model``: the model (or its class name, what the models pass: a constant for FX) named in the error.
    """
    name = model if isinstance(model, str) else type(model).__name__ if model is not None else "model"
    example = f"[B, {in_chans}, H, W] with H and W multiples of {multiple_of}" if multiple_of > 1 else f"[B, {in_chans}, H, W]"
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{name} expects images of shape {example}; got {tuple(x.shape)}"
                         + (" (wrong channel count: convert grayscale/RGB or build the model with "
                            f"in_chans={x.shape[1]})" if x.dim() == 4 else ""))
    h, w = x.shape[-2:]
    if h % multiple_of or w % multiple_of or h < min_size or w < min_size:
        raise ValueError(f"{name} expects images of shape {example}"
                         + (f", at least {min_size}x{min_size}" if min_size > 1 else "")
                         + f"; got {h}x{w}. Resize or pad to e.g. {max(min_size, -(-h // multiple_of) * multiple_of)}x"
                           f"{max(min_size, -(-w // multiple_of) * multiple_of)}.")


def slab_model_names() -> list[str]:
    """Registered model names whose entry point lives in this package."""
    names = []
    for name in timm.list_models():
        fn = timm.models.get_arch_name(name) and timm.models._registry._model_entrypoints.get(name)
        if fn is not None and getattr(fn, "__module__", "").startswith("slab."):
            names.append(name)
    return sorted(names)


def _family_module(model: nn.Module):
    return sys.modules[type(model).__module__]


#: what to do about a weights file that cannot be read
WEIGHTS_FIX = ("Give the weights of a `slab train` run (RUN/checkpoints/best.pt), the authors' released .pth, or a "
               ".safetensors state dict")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file; unwrap ``"model"``.

    A damaged or foreign file raises :class:`slab.errors.UserError` saying what the file is.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        return load_safetensors(path, WEIGHTS_FIX)
    return unwrap_checkpoint(torch_load(path, WEIGHTS_FIX))


def model_arguments(name: str) -> list[str]:
    """The keyword arguments of the class a registered model name builds (``[]`` when it cannot be told)."""
    import inspect
    fn = timm.models._registry._model_entrypoints.get(name)
    cls = getattr(fn, "__annotations__", {}).get("return")
    if isinstance(cls, str):  # ``from __future__ import annotations``: the class is named in its module
        cls = getattr(sys.modules.get(getattr(fn, "__module__", ""), None), cls, None)
    if not isinstance(cls, type):
        return []
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def model_kwargs_error(name: str, kwargs: dict, exc: TypeError) -> UserError | None:
    """A :class:`UserError` for a ``TypeError`` raised while building ``name`` from ``kwargs`` (None: not theirs)."""
    unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
    known = model_arguments(name)
    if unknown and unknown.group(1) in kwargs and unknown.group(1) not in known:
        key = unknown.group(1)
        return UserError(f"model '{name}' has no argument {key!r}{did_you_mean(key, known)}; its arguments: "
                         f"{', '.join(known)}")
    if kwargs:
        first_line = str(exc).splitlines()[0].rstrip(":")
        return UserError(f"model '{name}' cannot be built with {kwargs}: {first_line}. Check the types of these "
                         f"arguments (arguments: {', '.join(known)})")
    return None


def _authors_manifests() -> dict:
    with resources.files(__package__).joinpath("authors_manifests.json.gz").open("rb") as f:
        return json.loads(gzip.decompress(f.read()))


def closest_registered_model(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The registered model an authors' checkpoint looks like, by keys and shapes of the released manifests."""
    from . import AUTHORS_CHECKPOINTS
    have = {(k, tuple(v.shape)) for k, v in state_dict.items()}
    best, score = None, 0.0
    for file, manifest in _authors_manifests().items():
        ref = {(k, tuple(s)) for k, s in manifest.items()}
        jacc = len(have & ref) / max(1, len(have | ref))
        if jacc > score:
            best, score = AUTHORS_CHECKPOINTS.get(file), jacc
    return best if score > 0.3 else None


def load_checkpoint_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], model_name: str = "") -> nn.Module:
    """Run the family's ``checkpoint_filter_fn`` and load strictly, with an error a user can act on."""
    filter_fn = getattr(_family_module(model), "checkpoint_filter_fn", None)
    converted = filter_fn(state_dict, model) if filter_fn is not None else state_dict
    own = model.state_dict()
    missing = [k for k in own if k not in converted]
    unexpected = [k for k in converted if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in converted and tuple(converted[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[:5]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (first: {mismatched[:3]})")
        guess = closest_registered_model(state_dict)
        hint = f" It looks like a checkpoint of '{guess}'." if guess and guess != model_name else ""
        raise ValueError(f"checkpoint does not fit model '{model_name or type(model).__name__}': "
                         + "; ".join(parts) + "." + hint)
    model.load_state_dict(converted, strict=True)
    return model


def unknown_model_error(name: str, names: list[str]) -> ValueError:
    # Names that extend what was typed (a missing suffix is the usual slip) first, then fuzzy matches.
    prefixed = [n for n in names if n.startswith(name)]
    close = (prefixed + [n for n in difflib.get_close_matches(name, names, n=5, cutoff=0.4) if n not in prefixed])[:5]
    hint = f" Closest registered names: {', '.join(close)}." if close else ""
    return ValueError(f"unknown model '{name}'.{hint} See `slab models` or slab.list_models() for all names.")
