"""Reading the files users hand to slab (checkpoints, ONNX models, YAML), with errors that say what the file is.

A damaged or wrong file otherwise surfaces as the reader's own message (safetensors' Rust error,
ONNX Runtime's protobuf error, or torch's advice to unpickle arbitrary objects, which slab never
takes). Here the first bytes of the file are looked at instead, so the message says *what* the file
is: empty, truncated, random bytes, or another format (a PyTorch checkpoint given where a
safetensors file belongs, a fused deploy checkpoint given where a training checkpoint belongs, ...).
"""
from __future__ import annotations

import json
import os
import struct

from .errors import UserError

__all__ = ["sniff_format", "unreadable_file_error", "require_file", "torch_load", "load_safetensors",
           "safetensors_metadata", "is_fused_checkpoint", "open_onnx_session", "load_yaml_file",
           "load_yaml_value"]

#: what :func:`sniff_format` returns -> how messages name it
FORMAT_NAMES = {
    "empty": "an empty file (0 bytes)",
    "torch": "a PyTorch checkpoint (torch.save zip archive)",
    "pickle": "a legacy PyTorch/pickle file",
    "safetensors": "a safetensors file",
    "truncated safetensors": "a truncated safetensors file (its header announces more bytes than the file holds)",
    "onnx": "an ONNX model",
    "gzip": "a gzip archive",
    "image": "an image",
    "json": "a JSON text file",
    "text": "a text file",
    "unknown": "no known format (random or corrupt bytes)",
}


def _looks_like_safetensors(head: bytes, size: int) -> str | None:
    # safetensors: an 8-byte little-endian header length, then that many bytes of JSON starting with '{'.
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len < 2 or header_len > 100_000_000:
        return None
    return "safetensors" if 8 + header_len <= size else "truncated safetensors"


def sniff_format(path: str | os.PathLike) -> str:
    """A key of :data:`FORMAT_NAMES` for the file at ``path``, from its first bytes."""
    size = os.path.getsize(path)
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(4096)
    safetensors = _looks_like_safetensors(head, size)
    if safetensors:
        return safetensors
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")):
        return "image"
    # ONNX ModelProto starts with field 1 (ir_version, a varint) and names its producer or opset domain early.
    if head[:1] == b"\x08" and any(w in head for w in (b"pytorch", b"onnx", b"ai.onnx")):
        return "onnx"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    if all(c.isprintable() or c.isspace() for c in text):
        return "json" if text.lstrip().startswith(("{", "[")) else "text"
    return "unknown"


def unreadable_file_error(path: str | os.PathLike, expected: str, fix: str, what: str = "") -> UserError:
    """``WHAT PATH cannot be read: <what the file really is>. FIX``, for a file its reader refused."""
    path = os.fspath(path)
    found = sniff_format(path)
    if found in (expected, "truncated " + expected):
        problem = "it is truncated or corrupt (its start is right, the rest cannot be read)"
    elif found == "empty":
        problem = "it is empty (0 bytes)"
    elif found == "unknown":
        problem = f"it is not {FORMAT_NAMES[expected]}: {FORMAT_NAMES['unknown']}"
    else:
        problem = f"it is {FORMAT_NAMES[found]}, not {FORMAT_NAMES[expected]}"
    return UserError(f"{what + ' ' if what else ''}{path} cannot be read: {problem}. {fix}".rstrip())


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    """``path`` as a string; ``FileNotFoundError``/``UserError`` when it is missing or a folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder; give the file itself")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def torch_load(path: str | os.PathLike, fix: str, what: str = "checkpoint", map_location="cpu"):
    """``torch.load(path, weights_only=True)``; a :class:`UserError` naming what the file is when that fails."""
    import torch
    path = require_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and EOF errors alike mean a file we cannot use
        if "weights only" in str(e).lower() and sniff_format(path) in ("torch", "pickle"):
            # Never relay torch's advice to unpickle arbitrary objects: that can run any code in the file.
            raise UserError(f"{what} {path} cannot be read: it holds pickled Python objects besides tensors and plain "
                            f"values, which slab does not load (unpickling them can run code). Re-save just the "
                            f"weights, e.g. torch.save(model.state_dict(), PATH)") from None
        raise unreadable_file_error(path, "torch", fix, what) from None


def load_safetensors(path: str | os.PathLike, fix: str, what: str = "checkpoint") -> dict:
    """``safetensors.torch.load_file(path)``; a :class:`UserError` naming what the file is when that fails."""
    from safetensors.torch import load_file
    path = require_file(path, what)
    try:
        return load_file(path)
    except Exception:  # noqa: BLE001 - SafetensorError and friends: the header or the data is damaged
        raise unreadable_file_error(path, "safetensors", fix, what) from None


def safetensors_metadata(path: str | os.PathLike, fix: str, what: str = "checkpoint") -> dict:
    """The string metadata of a safetensors header (``{}`` when there is none)."""
    from safetensors import safe_open
    path = require_file(path, what)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001
        raise unreadable_file_error(path, "safetensors", fix, what) from None


def is_fused_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a deploy checkpoint written by ``slab fuse`` (safetensors with ``slab`` metadata)."""
    path = os.fspath(path)
    if not os.path.isfile(path) or sniff_format(path) != "safetensors":
        return False
    try:
        return json.loads(safetensors_metadata(path, "").get("slab", "{}")).get("deploy") is True
    except (UserError, json.JSONDecodeError, AttributeError):
        return False


def open_onnx_session(path: str | os.PathLike, options=None, providers=("CPUExecutionProvider",)):
    """``onnxruntime.InferenceSession``; a :class:`UserError` naming what the file is when ONNX Runtime refuses it."""
    import onnxruntime as ort
    path = require_file(path, "ONNX file")
    try:
        return ort.InferenceSession(path, sess_options=options, providers=list(providers))
    except Exception:  # noqa: BLE001 - InvalidProtobuf, InvalidArgument, Fail, InvalidGraph
        raise unreadable_file_error(path, "onnx", "Re-export it with `slab export --output PATH.onnx`",
                                    "ONNX file") from None


def load_yaml_value(text: str, where: str):
    """One YAML value given on the command line (``[96, 128]``, ``{depth: 4}``, ``2e-4``)."""
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: the value is not valid YAML ({problem}); e.g. 2e-4, [96, 128] or "
                        f"{{depth: 4}}") from None


def load_yaml_file(path: str | os.PathLike, text: str | None = None) -> dict:
    """A YAML mapping from ``path`` (or from ``text``, named ``path`` in messages); errors name the line."""
    import yaml
    path = os.fspath(path)
    if text is None:
        with open(require_file(path, "config"), encoding="utf-8", errors="replace") as f:
            text = f.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config {path} is not valid YAML{where}: {problem}; fix the file (a mapping of "
                        f"option: value lines)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a YAML mapping of option names, got {type(data).__name__}")
    return data
