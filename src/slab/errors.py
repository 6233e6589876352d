"""Bad input, reported as such: one exception type and the checks at the boundary that raise it.

:class:`UserError` is what a check raises when an argument, a file or a folder given by the user is
wrong; its message names the problem and the fix. ``slab``'s command line prints it as
``slab CMD: error: MESSAGE`` and exits with status 2, without a traceback. The helpers here are the
checks every command shares: close matches for unknown names, outputs that can be written, devices
that exist, JSON objects on the command line. Reading damaged files is :mod:`slab.files`.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import tempfile
from typing import Iterable

__all__ = ["UserError", "did_you_mean", "check_choices", "check_output_dir", "check_output_file", "output_error",
           "check_device", "parse_json_object", "positive_int_arg", "positive_float_arg", "nonnegative_int_arg"]


class UserError(ValueError):
    """Bad input (an argument, a file, a folder): the message names the problem and how to fix it.

    A ``ValueError``, so code that already catches ``ValueError`` for bad settings keeps working.
    """


def did_you_mean(word: str, choices: Iterable[str], n: int = 2) -> str:
    """``" (did you mean 'a' or 'b'?)"`` for the choices closest to ``word``, or ``""``."""
    word, choices = str(word), [str(c) for c in choices]
    # Choices that extend what was typed are the answer when there are any: a dropped suffix is the usual slip.
    close = [c for c in choices if c.startswith(word) and c != word][:n]
    close = close or difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def check_choices(values: Iterable[str], choices: Iterable[str], what: str) -> None:
    """Raise naming every value of ``values`` outside ``choices``, with close matches and the full list."""
    choices = list(choices)
    unknown = [v for v in values if v not in choices]
    if unknown:
        named = ", ".join(f"{v!r}{did_you_mean(v, choices)}" for v in unknown)
        raise UserError(f"unknown {what} {named}; choose from {', '.join(choices)}")


# ---------------------------------------------------------------- outputs
_ERRNO_REASONS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
                  errno.EDQUOT: "disk quota exceeded", errno.ENOENT: "nothing can be created there"}


def output_error(path: str | os.PathLike, exc: OSError, flag: str = "") -> UserError:
    """A :class:`UserError` for an ``OSError`` met while writing ``path`` (the final name, never a temporary one)."""
    reason = _ERRNO_REASONS.get(exc.errno, exc.strerror or str(exc))
    what = f"{flag} " if flag else ""
    return UserError(f"cannot write {what}{os.fspath(path)}: {reason}; choose another place, one you can write to")


def _existing_ancestor(path: str) -> str:
    """``path`` itself or the nearest folder above it that exists (what a ``makedirs`` would create under)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _probe_writable(folder: str, target: str, flag: str) -> None:
    """Create and remove a file in ``folder``: the only test that also holds for root, /sys and read-only mounts."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise output_error(target, e, flag) from None


def _check_folder(folder: str, target: str, flag: str) -> None:
    """Raise unless ``folder`` exists or can be made, and can be written to; messages name ``target``."""
    base = _existing_ancestor(folder)
    if not os.path.isdir(base):
        what = "is" if base == os.path.abspath(target) else f"would be under {base}, which is"
        raise UserError(f"{flag} {target} {what} an existing file, not a folder: choose another name")
    _probe_writable(base, target, flag)


def check_output_dir(path: str | os.PathLike, flag: str = "--output") -> None:
    """Raise unless ``path`` is a folder that exists or can be made, and can be written to. Creates nothing."""
    _check_folder(os.fspath(path), os.fspath(path), flag)


def check_output_file(path: str | os.PathLike, flag: str = "--output", suffixes: tuple[str, ...] = ()) -> None:
    """Raise unless ``path`` can be written as a file (its folder exists or can be made). Creates nothing."""
    path = os.fspath(path)
    if suffixes and not path.endswith(suffixes):
        raise UserError(f"{flag} must end in {' or '.join(suffixes)}, got {path}")
    if os.path.isdir(path):
        example = os.path.join(path, "out" + (suffixes[0] if suffixes else os.path.splitext(path)[1]))
        raise UserError(f"{flag} {path} is an existing folder; give a file name, e.g. {example}")
    _check_folder(os.path.dirname(os.path.abspath(path)), path, flag)


# ---------------------------------------------------------------- devices
def check_device(spec: str | None):
    """``torch.device(spec)``, refusing device types torch does not know and GPUs this machine lacks."""
    import torch
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {spec!r} is not a device{did_you_mean(spec, ['cpu', 'cuda', 'cuda:0'])}; "
                        f"use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {spec}: this machine has no usable CUDA GPU (torch.cuda.is_available() is "
                            f"False); use --device cpu, or leave --device out to pick a GPU only when there is one")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {spec}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type not in ("cpu", "mps", "xpu", "meta"):
        raise UserError(f"--device {spec}: slab runs on cpu or cuda")
    return device


# ---------------------------------------------------------------- command-line values
def parse_json_object(text: str | None, flag: str = "--model-kwargs") -> dict:
    """A JSON object given on the command line, as a dict."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} is not valid JSON ({e.msg} at character {e.pos} of {text!r}); write a JSON object "
                        f"with double quotes, e.g. '{{\"num_classes\": 10, \"img_size\": [32, 32]}}'") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object like '{{\"num_classes\": 10}}', got {type(value).__name__} "
                        f"{text!r}")
    return value


def _number_arg(text: str, cast, expected: str, ok, must: str):
    """Parse ``text`` with ``cast`` for an argparse ``type=``; ``ok(value)`` or an error saying it ``must`` ..."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        shown = repr(text) if cast is float else value  # a float as typed ('inf'), a count as parsed
        raise argparse.ArgumentTypeError(f"must be {must}, got {shown}")
    return value


def positive_int_arg(text: str) -> int:
    """argparse ``type=`` for a count that must be at least 1."""
    return _number_arg(text, int, "a positive whole number", lambda v: v >= 1, "at least 1")


def positive_float_arg(text: str) -> float:
    """argparse ``type=`` for an amount that must be a finite number above 0 (e.g. epochs)."""
    return _number_arg(text, float, "a positive number", lambda v: 0 < v < float("inf"), "a finite number above 0")


def nonnegative_int_arg(text: str) -> int:
    """argparse ``type=`` for a count where 0 means off."""
    return _number_arg(text, int, "a whole number >= 0", lambda v: v >= 0, "0 (off) or more")
