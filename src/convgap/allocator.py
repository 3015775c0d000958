"""Where CPU tensors' memory comes from, and what that costs per call.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves a request above
its mmap threshold (dynamic, at most 32 MiB by default) with a fresh ``mmap`` and gives it
back to the kernel on ``free``; memory it keeps in the heap is handed back too once more than
the trim threshold lies free at its top. Either way the next call writes to fresh pages: one
minor page fault per 4 KiB page, each zero-filled by the kernel. A CNN whose activations
exceed a few MiB pays this on every forward pass (measured here: a 16->96 1x1 conv at batch
8, 112x112, 38.5 MB output, ran in 10.7 ms under glibc's defaults and 1.2 ms with freed memory
retained; whole mobilenet_v2 at batch 8 went 2.6x faster). Worse for measuring, the cost
depends on history: a request is served from the heap without faults whenever enough freed
memory happens to lie at its top, so the same layer reads 4 ms or 18 ms by what ran before.

Two policies, process-wide (``mallopt``):

* ``"default"``: glibc's steady state (mmap threshold 32 MiB, trim threshold 64 MiB, top pad
  128 KiB). glibc starts with a dynamic threshold that rises toward 32 MiB as large blocks
  are freed; once a policy was set it stays fixed, which is where a forward-pass loop
  settles anyway.
* ``"retain"``: no ``mmap`` below 2 GiB, no trimming, 64 MiB top pad: after the first call
  every buffer is reused from the heap and nothing faults. The price is that the process
  keeps its peak heap (the largest forward pass's working set) instead of returning it.

Other ways to the same end, for deployment: ``MALLOC_MMAP_THRESHOLD_=2147483647
MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment (read by glibc at start-up), or
``LD_PRELOAD`` of jemalloc or tcmalloc. Without glibc (macOS, Windows, a preloaded
allocator) the policy cannot be set here and :func:`available` is False.

Latencies are in seconds; memory sizes in bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Iterator

from . import timing
from .errors import ConvgapError

__all__ = ["POLICIES", "available", "policy", "set_policy", "use",
           "AllocationCost", "allocation_cost"]

POLICIES = ("default", "retain")

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_INT_MAX = 2**31 - 1
_SETTINGS = {
    # glibc's steady state: DEFAULT_MMAP_THRESHOLD_MAX, twice it, DEFAULT_TOP_PAD
    "default": {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20,
                _M_TOP_PAD: 128 << 10, _M_MMAP_MAX: 65536},
    "retain": {_M_MMAP_THRESHOLD: _INT_MAX, _M_TRIM_THRESHOLD: _INT_MAX,
               _M_TOP_PAD: 64 << 20, _M_MMAP_MAX: 65536},
}
_ENV = {"MALLOC_MMAP_THRESHOLD_": _M_MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": _M_TRIM_THRESHOLD,
        "MALLOC_TOP_PAD_": _M_TOP_PAD, "MALLOC_MMAP_MAX_": _M_MMAP_MAX}
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")

_libc: ctypes.CDLL | None = None
_current: str | None = None  # the policy convgap last set (None: whatever the process had)


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.gnu_get_libc_version.restype = ctypes.c_char_p
            lib.gnu_get_libc_version()
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = lib
        except (OSError, AttributeError):
            return None
    return _libc


def _preloaded() -> str | None:
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in _PRELOADED if name in preload), None)


def available() -> bool:
    """True when the policy can be set here: glibc malloc, not replaced by ``LD_PRELOAD``."""
    return _glibc() is not None and _preloaded() is None


def policy() -> str:
    """The malloc policy in force: 'default' or 'retain' (set by convgap, or the process's
    start-up state when nothing set one), 'env' (``MALLOC_*_`` variables set at start-up),
    'preloaded:<name>' (jemalloc, tcmalloc, mimalloc) or 'unavailable' (no glibc)."""
    if _preloaded():
        return f"preloaded:{_preloaded()}"
    if _glibc() is None:
        return "unavailable"
    if _current is not None:
        return _current
    if any(k in os.environ for k in _ENV) or "glibc.malloc" in os.environ.get(
            "GLIBC_TUNABLES", ""):
        return "env"
    return "default"


def _env_settings() -> dict[int, int]:
    out = {}
    for var, param in _ENV.items():
        try:
            out[param] = int(os.environ[var])
        except (KeyError, ValueError):
            pass
    return out


def set_policy(name: str) -> str:
    """Set the process's malloc policy to ``name`` ('default' or 'retain', see the module
    docstring; 'env' re-applies the ``MALLOC_*_`` start-up variables). Returns the policy
    that was in force before. Switching to 'default' also hands retained memory back to the
    kernel (``malloc_trim``). :class:`ConvgapError` for an unknown name or where the policy
    cannot be set (see :func:`available`)."""
    if name not in POLICIES and name != "env":
        raise ConvgapError(f"unknown malloc policy {name!r}: use one of {', '.join(POLICIES)}")
    if not available():
        raise ConvgapError(
            f"cannot set the malloc policy here ({policy()}): it needs glibc malloc; use the "
            "allocator's own settings instead")
    global _current
    before = policy()
    lib = _glibc()
    settings = dict(_SETTINGS["default"])
    settings.update(_env_settings() if name == "env" else _SETTINGS[name])
    if name == "retain" and not lib.mallopt(_M_MMAP_THRESHOLD, _INT_MAX):
        # glibc < 2.35 caps the threshold at 32 MiB: forbid mmap outright instead
        settings[_M_MMAP_THRESHOLD] = 32 << 20
        settings[_M_MMAP_MAX] = 0
    for param, value in settings.items():
        lib.mallopt(param, min(int(value), _INT_MAX))
    if name == "default":
        lib.malloc_trim(0)
    _current = name if name != "env" else None
    return before


@contextlib.contextmanager
def use(name: str | None) -> Iterator[str]:
    """Run the body under malloc policy ``name`` and restore the previous one after
    (``None``: leave the policy as it is). Yields the policy in force in the body. Where the
    policy cannot be set (:func:`available` is False) the body runs as is."""
    if name is None or not available() or name == policy():
        yield policy()
        return
    before = set_policy(name)
    try:
        yield name
    finally:
        set_policy(before if before in POLICIES or before == "env" else "default")


@dataclass(frozen=True)
class AllocationCost:
    """One callable timed under both malloc policies, in alternating blocks.

    default_s / retain_s: median latency (seconds) under each policy. faults_default /
    faults_retain: median minor page faults per call. ``overhead_s`` is what glibc's default
    policy costs per call; ``share`` that as a fraction of the default latency."""

    default_s: float
    retain_s: float
    faults_default: float
    faults_retain: float

    @property
    def overhead_s(self) -> float:
        return self.default_s - self.retain_s

    @property
    def share(self) -> float:
        return self.overhead_s / self.default_s if self.default_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"default_s": self.default_s, "retain_s": self.retain_s,
                "faults_default": self.faults_default, "faults_retain": self.faults_retain,
                "overhead_s": self.overhead_s, "share": self.share}


def allocation_cost(fn: Callable[[], object], config: timing.TimingConfig = timing.QUICK,
                    blocks: int = 2) -> AllocationCost | None:
    """Time ``fn`` (a CPU callable) under the 'default' and the 'retain' policy, ``blocks``
    blocks each, alternating (each block warms up first: a policy switch leaves the heap in
    the other policy's state for a call or two); restores the policy in force before.
    ``None`` where the policy cannot be set."""
    if not available():
        return None
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    samples: dict[str, list[float]] = {p: [] for p in POLICIES}
    faults: dict[str, list[int]] = {p: [] for p in POLICIES}
    for i in range(blocks):
        for name in (POLICIES if i % 2 == 0 else POLICIES[::-1]):
            with use(name):
                t = timing.measure(fn, config)
            samples[name] += t.samples
            faults[name] += t.faults
    med = {p: statistics.median(samples[p]) for p in POLICIES}
    flt = {p: statistics.median(faults[p]) if faults[p] else 0.0 for p in POLICIES}
    return AllocationCost(med["default"], med["retain"], flt["default"], flt["retain"])
