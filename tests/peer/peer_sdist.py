"""The installed peer library's own test suite, taken from its source distribution at test time.

A library's tests are not part of its wheel, but its sdist carries them. :func:`load_peer_tests` downloads the sdist
of the *installed* version with pip (once; cached under ``~/.cache/slab/peer/``, or ``$SLAB_PEER_CACHE``), extracts
its ``tests/`` directory as an importable package and returns that package's name, so our test modules can import the
peer's test mixins and run them against our models. Nothing of the peer's test code is kept in this repository.

Offline, the caller skips with the reason; ``$SLAB_PEER_SDIST_DIR`` may point at a directory holding the sdist
(``<name>-<version>.tar.gz``) when pip cannot reach an index.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

__all__ = ["PeerTestsUnavailable", "load_peer_tests", "peer_tests"]


class PeerTestsUnavailable(RuntimeError):
    """The peer's sdist could not be obtained (no network and no local copy)."""


def _cache_root() -> Path:
    return Path(os.environ.get("SLAB_PEER_CACHE", Path.home() / ".cache" / "slab" / "peer"))


def _find_or_download_sdist(dist: str, version: str, into: Path) -> Path:
    name = f"{dist}-{version}.tar.gz"
    for folder in (into, os.environ.get("SLAB_PEER_SDIST_DIR")):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    into.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           f"{dist}=={version}", "-d", str(into)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerTestsUnavailable(f"pip download of the {dist} {version} sdist failed: {exc}") from exc
    if done.returncode != 0 or not (into / name).is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise PeerTestsUnavailable(f"could not download the {dist} {version} sdist (offline?); set "
                                   f"SLAB_PEER_SDIST_DIR to a folder holding {name}. pip said: {' | '.join(tail)}")
    return into / name


def load_peer_tests(dist: str, package: str, stubs: dict[str, str] | None = None) -> str:
    """Make the ``tests/`` directory of the installed ``dist``'s sdist importable as ``package``; returns ``package``.

    ``stubs`` maps a module path inside ``tests/`` (``"generation/test_utils.py"``) to source written there only
    when the sdist does not ship that file: some sdists leave out subfolders that the common test modules import.
    Raises :class:`PeerTestsUnavailable` when the sdist cannot be had.
    """
    version = importlib.metadata.version(dist)
    home = _cache_root() / f"{dist}-{version}"
    target = home / package
    if not (target / "__init__.py").is_file():
        sdist = _find_or_download_sdist(dist, version, home)
        home.mkdir(parents=True, exist_ok=True)
        prefix = f"{dist}-{version}/tests/"
        staging = Path(tempfile.mkdtemp(prefix=f".{package}-", dir=home))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            if not members:
                raise PeerTestsUnavailable(f"{sdist} has no {prefix} directory")
            for member in members:
                member.name = member.name[len(prefix):]
                tar.extract(member, staging, filter="data")
        for relpath, source in (stubs or {}).items():
            path = staging / relpath
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(source)
        for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            (folder / "__init__.py").touch(exist_ok=True)
        # Another pytest worker may have finished first: keep its copy, drop ours.
        try:
            staging.rename(target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    if str(home) not in sys.path:
        sys.path.insert(0, str(home))
    return package


def peer_tests(dist: str) -> Path:
    """A directory holding ``tests/`` and ``pyproject.toml`` (its pytest markers) of the installed ``dist``'s sdist,
    for running the peer's test files as they are (timm's ``tests/test_models.py``). Only those two are unpacked,
    so the tests import the installed package, never the sdist's copy of it."""
    version = importlib.metadata.version(dist)
    home = _cache_root() / f"{dist}-{version}"
    root = home / "source"
    if (root / ".unpacked").exists():
        return root
    sdist = _find_or_download_sdist(dist, version, home)
    prefix = f"{dist}-{version}/"
    staging = Path(tempfile.mkdtemp(prefix=".source-", dir=home))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and (m.name.startswith(prefix + "tests/") or m.name == prefix + "pyproject.toml")]
        if not any(m.name.startswith(prefix + "tests/") for m in members):
            raise PeerTestsUnavailable(f"{sdist} has no tests/ directory")
        for member in members:
            member.name = member.name[len(prefix):]
            tar.extract(member, staging, filter="data")
    (staging / ".unpacked").touch()
    try:  # another process may have finished first: keep its copy
        staging.rename(root)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return root
