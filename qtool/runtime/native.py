"""Loader of qtool's native CPU kernels (`kernels/cpu/<name>.cpp`: the repository's, or the copy a wheel
installs under ``<prefix>/share/qtool/kernels/cpu``), with a torch twin behind each.

A kernel is compiled on first use with the system C++ compiler ($CXX, else c++/g++/clang++) into the cache
(`<cache>/kernels/<name>-<digest>.so`, the digest covering the source, the flags and the compiler's version;
written to a temporary name and renamed, so concurrent runs never load half a file) and opened with ctypes.
The flags forbid FMA contraction and fast-math: a kernel computes exactly its twin's float32 operations, so
results are bit-identical whichever path runs (the tests compare both). `load` returns None when the kernel
cannot be had (sources not installed, no compiler, a failed build, or ``QTOOL_NATIVE=0``); `why(name)` then
says why, and the caller runs the torch twin.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from qtool.cache import cache_root

def _sources() -> Path:
    """The repository's kernels/cpu (editable install), else the copy a wheel puts under <prefix>/share/qtool."""
    repo = Path(__file__).resolve().parents[2] / "kernels" / "cpu"
    return repo if repo.is_dir() else Path(sys.prefix) / "share" / "qtool" / "kernels" / "cpu"


SOURCES = _sources()
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-fast-math")

_why: dict[str, str] = {}


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    return None


def _version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build(name: str, sources: Path = SOURCES, cache: Path | None = None) -> Path:
    """Path of the compiled `name` kernel, building it when the cache lacks it. Raises RuntimeError."""
    src = sources / f"{name}.cpp"
    if not src.is_file():
        raise RuntimeError(f"kernel source {src} is not installed")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
    text = src.read_bytes()
    digest = hashlib.sha256(text + " ".join(FLAGS).encode() + _version(cxx).encode()).hexdigest()[:16]
    out_dir = (cache or cache_root()) / "kernels"
    lib = out_dir / f"{name}-{digest}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        r = subprocess.run([cxx, *FLAGS, str(src), "-o", tmp], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"building {src.name} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@lru_cache(maxsize=None)
def load(name: str) -> ctypes.CDLL | None:
    """The `name` kernel library, or None (then `why(name)` says why and the caller uses the torch twin)."""
    if os.environ.get("QTOOL_NATIVE", "1") == "0":
        _why[name] = "native kernels disabled by QTOOL_NATIVE=0"
        return None
    try:
        return ctypes.CDLL(str(build(name)))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        _why[name] = str(e)
        return None


def why(name: str) -> str:
    """Why `load(name)` returned None ('' when it did not)."""
    return _why.get(name, "")
