"""Deploy artifacts: fused checkpoints (safetensors + JSON sidecar) and ONNX export with checks.

* :func:`save_fused` / :func:`load_fused`: a fused (norm-free) state dict written atomically with a
  sidecar that names the model and its kwargs, so ``slab.create_model(name, deploy=True, ...)`` (or
  :func:`load_fused`) rebuilds it.
* :func:`compare_outputs`: max absolute / relative error between two models on the same inputs.
* :func:`export_onnx`: fuse (unless already fused), export with the current ``torch.export``-based
  exporter (falling back to the TorchScript exporter only if that fails), check the graph with
  ``onnx.checker``, refuse any normalization (or ``Sqrt``) node, run it in ONNX Runtime and compare
  with PyTorch (also at a second batch size when the batch is dynamic). Nothing is left at ``path``
  unless every check passed.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..errors import UserError, output_error
from ..files import open_onnx_session, require_file, safetensors_metadata

__all__ = ["FORBIDDEN_ONNX_OPS", "ExportError", "save_fused", "load_fused", "read_sidecar", "sidecar_path",
           "compare_outputs", "export_onnx", "onnx_op_histogram", "run_onnx", "OnnxRuntimeModel"]

#: ONNX op types that must not appear in an exported deploy model: any normalization, and ``Sqrt``
#: (what a normalization decomposes into). Checked in the main graph, subgraphs and local functions.
FORBIDDEN_ONNX_OPS = frozenset({
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "LpNormalization", "MeanVarianceNormalization", "Sqrt",
})

SIDECAR_FORMAT = "slab-fused"
SIDECAR_VERSION = 1


class ExportError(ValueError):
    """An export or a deploy check failed; nothing was written at the destination."""


# ---------------------------------------------------------------- fused checkpoints
def sidecar_path(path: str | os.PathLike) -> Path:
    """``fused.safetensors`` -> ``fused.json`` (the sidecar next to a fused checkpoint)."""
    return Path(path).with_suffix(".json")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"model kwarg value {value!r} ({type(value).__name__}) cannot be written to the JSON sidecar")


def _untuple(value: Any) -> Any:
    # JSON has no tuples; model constructors take tuples for per-stage settings.
    if isinstance(value, list):
        return tuple(_untuple(v) for v in value)
    if isinstance(value, dict):
        return {k: _untuple(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def _atomic_path(path: Path):
    """Yield a temporary path in ``path``'s folder; rename it onto ``path`` only if the block succeeds.

    A place that cannot be written raises :class:`slab.errors.UserError` naming ``path``, not the temporary file.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise output_error(path, e) from None
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise output_error(path, e) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_fused(model: nn.Module, path: str | os.PathLike, model_name: str, model_kwargs: dict | None = None,
               extra: dict | None = None) -> dict:
    """Write a fused model's state dict to ``path`` (safetensors) and its sidecar JSON, atomically.

    The sidecar (also stored in the safetensors header under ``"slab"``) holds the model name, the
    kwargs it was built with and ``deploy: true``; ``extra`` (e.g. verification results) is added.
    Returns the sidecar dict.
    """
    from safetensors.torch import save_file

    from .. import __version__
    from .fuse import remaining_norms
    left = remaining_norms(model)
    if left:
        raise ValueError(f"save_fused: the model still has normalization modules ({', '.join(left[:3])}); "
                         f"fuse it first with slab.fuse(model)")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"fused checkpoints are written as .safetensors; got {path}")
    meta = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "model": model_name,
            "kwargs": _jsonable(dict(model_kwargs or {})), "deploy": True, "slab_version": __version__}
    meta.update(_jsonable(extra or {}))
    # Private contiguous copies: safetensors refuses shared or strided storage.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with _atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"slab": json.dumps(meta)})
    with _atomic_path(sidecar_path(path)) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


#: what to do about a fused checkpoint that cannot be read
FUSED_FIX = "Write it again with `slab fuse --model NAME --checkpoint TRAINED --output PATH.safetensors`"


def read_sidecar(path: str | os.PathLike) -> dict:
    """The sidecar of a fused checkpoint: the JSON file next to it, else the safetensors header."""
    path = Path(require_file(path, "fused checkpoint"))
    side = sidecar_path(path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"sidecar {side} of {path} is not valid JSON: delete it (the .safetensors header holds "
                            f"a copy) or write both again with `slab fuse`") from None
    else:
        raw = safetensors_metadata(path, FUSED_FIX, "fused checkpoint").get("slab")
        if raw is None:
            raise UserError(f"{path} has no sidecar ({side.name}) and no 'slab' metadata: not written by `slab "
                            f"fuse`. For an unfused weights file use --model NAME --checkpoint {path}")
        meta = json.loads(raw)
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT or "model" not in meta:
        raise UserError(f"{side} is not a slab fused-checkpoint sidecar (no format {SIDECAR_FORMAT!r} and model "
                        f"entries); write it again with `slab fuse`")
    return meta


def load_fused(path: str | os.PathLike, **overrides) -> nn.Module:
    """Rebuild the deploy model a fused checkpoint describes: ``create_model(name, deploy=True, ...)``."""
    from ..models import create_model
    meta = read_sidecar(path)
    # A damaged tensor file with an intact sidecar must still say it is a fused checkpoint that is damaged.
    safetensors_metadata(path, FUSED_FIX, "fused checkpoint")  # opening checks the header and the file's length
    kwargs = {**_untuple(meta.get("kwargs", {})), **overrides}
    return create_model(meta["model"], pretrained_file=path, deploy=True, **kwargs).eval()


# ---------------------------------------------------------------- comparisons
@torch.no_grad()
def compare_outputs(reference: nn.Module, candidate: nn.Module, inputs: Iterable[torch.Tensor]) -> dict:
    """Max absolute and relative (``max|a-b| / max|a|``) output difference over ``inputs``.

    Also counts how often the arg-max (predicted class) differs.
    """
    max_abs, max_ref, n, disagree = 0.0, 0.0, 0, 0
    for x in inputs:
        a, b = reference(x), candidate(x)
        if a.shape != b.shape:
            raise ValueError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        if not torch.isfinite(b).all():
            return {"max_abs": float("inf"), "max_rel": float("inf"), "n": n + x.shape[0], "argmax_disagree": None}
        max_abs = max(max_abs, (a.double() - b.double()).abs().max().item())
        max_ref = max(max_ref, a.double().abs().max().item())
        if a.dim() == 2:
            disagree += int((a.argmax(-1) != b.argmax(-1)).sum())
        n += x.shape[0]
    return {"max_abs": max_abs, "max_rel": max_abs / (max_ref + 1e-30), "n": n, "argmax_disagree": disagree}


# ---------------------------------------------------------------- ONNX
def _iter_nodes(graph) -> Iterable:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                yield from _iter_nodes(attr.g)
            for g in attr.graphs:
                yield from _iter_nodes(g)


def onnx_op_histogram(model_proto) -> dict[str, int]:
    """Op type -> count over the graph, its subgraphs and local functions."""
    counts = collections.Counter(n.op_type for n in _iter_nodes(model_proto.graph))
    for fn in model_proto.functions:
        counts.update(n.op_type for n in fn.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _forbidden_nodes(model_proto) -> list[str]:
    found = [f"{n.op_type} ({n.name or 'unnamed'})" for n in _iter_nodes(model_proto.graph)
             if n.op_type in FORBIDDEN_ONNX_OPS]
    for fn in model_proto.functions:
        found += [f"{n.op_type} (function {fn.name})" for n in fn.node if n.op_type in FORBIDDEN_ONNX_OPS]
    return found


class OnnxRuntimeModel:
    """An ONNX file as a callable ``tensor -> tensor`` on ONNX Runtime's CPU provider.

    A model exported with a fixed batch size is run on chunks of that size.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.path = str(path)
        self.session = open_onnx_session(self.path, opts)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def run(self, x):
        """Run on a numpy array (no chunking)."""
        return self.session.run(None, {self.input_name: x})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float()
        if self.fixed_batch is None or x.shape[0] == self.fixed_batch:
            return torch.from_numpy(self.run(x.numpy()))
        if x.shape[0] % self.fixed_batch:
            raise ValueError(f"{self.path} was exported for batch {self.fixed_batch}; got a batch of {x.shape[0]}")
        return torch.cat([torch.from_numpy(self.run(c.numpy())) for c in x.split(self.fixed_batch)])


def run_onnx(path: str | os.PathLike, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """Run an exported model in ONNX Runtime (CPU) on ``x``; returns a float32 tensor."""
    return OnnxRuntimeModel(path, threads)(x)


def _export_dynamo(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None, dynamic_batch: bool,
                   verbose: bool) -> None:
    kwargs = dict(dynamo=True, input_names=["input"], output_names=["output"], external_data=False)
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},)
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink, warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kwargs)


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None, dynamic_batch: bool,
                        verbose: bool) -> None:
    kwargs = dict(dynamo=False, input_names=["input"], output_names=["output"], opset_version=int(opset or 18),
                  do_constant_folding=True)
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kwargs)


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int, int, int] = (1, 3, 224, 224),
                dynamic_batch: bool = True, opset: int | None = None, *, fuse: bool = True, atol: float = 1e-4,
                exporter: str = "auto", verbose: bool = False, seed: int = 0, require_norm_free: bool = True
                ) -> dict:
    """Export a deploy (norm-free) model to ONNX and check it; returns a report dict.

    Args:
        model: a SLAB model. Unless it is already fused (``slab.fuse`` output), an eval copy is fused
            first (the input model is untouched).
        path: destination ``.onnx``. Written atomically: only after every check passed.
        input_size: ``(B, C, H, W)`` of the example input.
        dynamic_batch: export the batch dimension as dynamic (checked at a second batch size).
        opset: ONNX opset (default: the exporter's current default).
        fuse: fuse an unfused model first (``False`` exports as is; a normalization left then fails
            the check).
        atol: max absolute difference allowed between ONNX Runtime and PyTorch outputs.
        exporter: ``'auto'`` (``torch.export``-based, falling back to TorchScript on failure),
            ``'dynamo'`` or ``'torchscript'``.
        require_norm_free: refuse normalization / ``Sqrt`` nodes (the deploy check). ``False`` only for
            baselines that are meant to keep their norms (benchmarking the LayerNorm form).

    Raises:
        ExportError: export failed, the checker rejected the graph, a normalization or ``Sqrt`` node
            remains, or ONNX Runtime disagrees with PyTorch by more than ``atol``.
    """
    import onnx

    from .fuse import fuse as fuse_model
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    if len(tuple(input_size)) != 4:
        raise ValueError(f"input_size must be (B, C, H, W), got {input_size}")
    path = Path(path)
    if fuse and not getattr(model, "is_fused", False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # default-statistics warning: the caller's fuse step reports it
            model = fuse_model(model)
    elif model.training:
        model = copy.deepcopy(model).eval()
    if require_norm_free:
        from .fuse import remaining_norms
        left = remaining_norms(model)
        if left:
            # An eval BN/RepBN would export as a constant per-channel Mul/Add (no norm node, but not folded):
            # refuse structurally, before exporting.
            raise ExportError(f"the model still has normalization modules: {', '.join(left[:5])}"
                              + ("" if len(left) <= 5 else f" (+{len(left) - 5} more)")
                              + ". Export a fused model (slab.fuse, or fuse=True).")
    b, c, h, w = (int(v) for v in input_size)
    g = torch.Generator().manual_seed(seed)
    # torch.export specialises a dimension of size 1: trace a dynamic batch with at least 2.
    x = torch.randn(max(b, 2) if dynamic_batch else b, c, h, w, generator=g)
    with torch.no_grad():
        want = model(x)

    report: dict[str, Any] = {"path": str(path), "input_size": [b, c, h, w], "dynamic_batch": dynamic_batch}
    with _atomic_path(path) as tmp:
        errors = []
        order = {"auto": ("dynamo", "torchscript"), "dynamo": ("dynamo",), "torchscript": ("torchscript",)}[exporter]
        for kind in order:
            try:
                (_export_dynamo if kind == "dynamo" else _export_torchscript)(model, x, tmp, opset, dynamic_batch,
                                                                              verbose)
                report["exporter"] = kind
                break
            except Exception as e:  # noqa: BLE001 - try the next exporter, report all failures
                errors.append(f"{kind}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
        else:
            raise ExportError("ONNX export failed: " + " | ".join(errors))
        if errors:
            report["fallback_reason"] = errors
        proto = onnx.load(str(tmp))
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnx.checker rejected the exported graph: {e}") from None
        bad = _forbidden_nodes(proto) if require_norm_free else []
        if bad:
            raise ExportError(f"the exported graph still normalizes: {len(bad)} forbidden node(s): {', '.join(bad[:8])}"
                              + ("" if len(bad) <= 8 else f" (+{len(bad) - 8} more)")
                              + ". A normalization node means a norm was not folded: export a fused model "
                                "(slab.fuse names any norm it cannot fold). A lone Sqrt can also be an attention "
                                "scale the exporter did not constant-fold (the TorchScript exporter does this): use "
                                "the default exporter.")
        report["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        report["ops"] = onnx_op_histogram(proto)
        report["nodes"] = sum(report["ops"].values())
        checks = [(x, want)]
        if dynamic_batch:
            x2 = torch.randn(x.shape[0] + 1, c, h, w, generator=g)
            with torch.no_grad():
                checks.append((x2, model(x2)))
        diffs = {}
        for xi, ref in checks:
            got = run_onnx(tmp, xi)
            if got.shape != ref.shape:
                raise ExportError(f"ONNX Runtime output shape {tuple(got.shape)} != PyTorch {tuple(ref.shape)} "
                                  f"at batch {xi.shape[0]}")
            diff = (got.double() - ref.double()).abs().max().item()
            diffs[int(xi.shape[0])] = diff
            if not diff <= atol:
                raise ExportError(f"ONNX Runtime and PyTorch disagree at batch {xi.shape[0]}: max |diff| = "
                                  f"{diff:.3e} > atol {atol:.1e}")
        report["max_abs_diff"] = diffs
    report["bytes"] = path.stat().st_size
    return report
