"""The test suite of an installed peer library (timm), taken from its source distribution at test time.

Peers' tests are not copied into this repository: the sdist of the *installed* version is fetched
once with pip (``pip download --no-binary :all:``), and its ``tests/`` and ``pyproject.toml`` (pytest
markers) are unpacked into a cache, ``$SLAB_PEER_CACHE`` or ``~/.cache/slab/peer``. Only those two are
unpacked, so the tests import the installed package, never the sdist's copy of it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SLAB_PEER_CACHE", Path.home() / ".cache" / "slab" / "peer"))


def _download(name: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{name}-{version}.tar.gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"{name}=={version}", "--dest", str(dest)]
    try:
        subprocess.run(cmd, check=True)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"could not download the {name} {version} sdist (`{' '.join(cmd)}` failed). Without "
                           f"network, put {name}-{version}.tar.gz into {dest}") from e
    found = sorted(dest.glob(f"{name}-{version}.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download of {name}=={version} left no {name}-{version}.tar.gz in {dest}")
    return found[0]


def peer_tests(name: str) -> Path:
    """Directory holding ``tests/`` and ``pyproject.toml`` of the installed ``name``'s sdist (fetched once)."""
    version = metadata.version(name)
    root = cache_root() / f"{name}-{version}"
    done = root / ".unpacked"
    if done.exists():
        return root
    sdist = _download(name, version, cache_root() / "sdists")
    prefix = f"{name}-{version}/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and (m.name.startswith(prefix + "tests/") or m.name == prefix + "pyproject.toml")]
        if not any(m.name.endswith("/tests/test_models.py") for m in members) and name == "timm":
            raise RuntimeError(f"{sdist} has no tests/test_models.py")
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(root, members=members, filter="data")
    done.touch()
    return root
