"""Compiling and loading the C kernels next to this file.

A kernel is one C file (``<name>.c``, which may include the headers beside it: args.h, its
argument struct; gemm.h; bands.h). Its first use in a process compiles it with the system C
compiler (``$CC``, default ``cc``) at ``-O3 -march=native -fopenmp`` into ``<convgap
cache>/kernels/<name>-<hash>.so`` (the hash covers the C file and every header beside it,
the flags, the compiler's version and this CPU's model and feature flags, so a changed
header, a new CPU or compiler builds anew: :func:`digest`) and loads it with ctypes; later
processes load the built file. Loaded after torch, the library shares torch's OpenMP runtime
(the same ``libgomp.so.1``), so its threads are torch's intra-op threads.

Where there is no compiler, the CPU lacks what the source needs (AVX-512), or
``CONVGAP_NATIVE=0`` is set, :func:`library` returns None (once with a
:class:`NativeKernelWarning` saying why, for a failed build) and callers keep their torch
paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch  # noqa: F401  (loaded first: the kernels then bind to torch's libgomp)

from ...cache import cache_dir

__all__ = ["library", "enabled", "avx512", "NativeKernelWarning", "FLAGS", "sources",
           "digest"]

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_LOADED: dict[str, ctypes.CDLL | None] = {}


class NativeKernelWarning(UserWarning):
    """A C kernel could not be built; convgap runs the torch path instead."""


def enabled() -> bool:
    """False where ``CONVGAP_NATIVE=0`` turns the C kernels off."""
    return os.environ.get("CONVGAP_NATIVE", "1") != "0"


@functools.lru_cache(maxsize=None)
def _cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout


def sources(name: str, where: Path | None = None) -> list[Path]:
    """The files kernel ``name`` is built from: ``<name>.c`` and every header beside it
    (all of them, whether it includes them or not: a changed header, args.h's structs
    say, rebuilds every kernel). ``where``: the kernels' folder (this file's)."""
    where = Path(__file__).parent if where is None else where
    return [where / f"{name}.c", *sorted(where.glob("*.h"))]


def digest(name: str, cc: str, where: Path | None = None,
           extra: tuple[str, ...] = ()) -> str:
    """The built file's key: a hash of :func:`sources`' contents, the flags (``extra``: a
    kernel's own, e.g. where a library it links lies), the compiler's version and this
    CPU's model and feature flags."""
    texts = [p.read_text() for p in sources(name, where)]
    return hashlib.sha256("\0".join(
        [*texts, " ".join([*FLAGS, *extra]), _compiler_version(cc), _cpu_identity()]
    ).encode()).hexdigest()[:16]


def _build(name: str, extra: tuple[str, ...] = ()) -> ctypes.CDLL:
    src = Path(__file__).with_name(f"{name}.c")
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} is not on PATH)")
    digest_ = digest(name, cc, extra=extra)
    out_dir = cache_dir() / "kernels"
    target = out_dir / f"{name}-{digest_}.so"
    if not target.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, "-o", tmp, str(src), *extra],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-600:]}")
            os.replace(tmp, target)  # atomic: a concurrent build leaves one whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))


@functools.lru_cache(maxsize=None)
def avx512() -> bool:
    """True on a CPU with AVX-512F (what the kernels are written in)."""
    return "avx512f" in _cpu_identity().split()


def library(name: str, extra: tuple[str, ...] = (), needs_avx512: bool = True
            ) -> ctypes.CDLL | None:
    """The loaded C kernel ``name`` (built on first use, with the kernel's own compiler and
    linker flags ``extra`` after the common ones), or None where it cannot be (no AVX-512
    where the kernel is written in it (``needs_avx512``), no compiler, ``CONVGAP_NATIVE=0``).
    Built once per process."""
    if not enabled() or (needs_avx512 and not avx512()):
        return None
    if name not in _LOADED:
        try:
            _LOADED[name] = _build(name, tuple(extra))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            warnings.warn(f"convgap's C kernel {name!r} is unavailable ({exc}); using torch "
                          f"ops instead", NativeKernelWarning, stacklevel=2)
            _LOADED[name] = None
    return _LOADED[name]
