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

* ``"default"``: glibc's fixed steady state (mmap threshold 32 MiB, trim threshold 64 MiB,
  top pad 128 KiB). A process starts with dynamic thresholds instead (the mmap threshold
  follows the largest block freed, the trim threshold twice that), which trims the heap
  more often and costs more faults; ``mallopt`` cannot bring that state back once left.
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

__all__ = ["POLICIES", "available", "policy", "check_policy", "set_policy", "use",
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


def check_policy(name: str) -> str:
    """``name`` if it is a policy convgap can set ('default', 'retain'); else
    :class:`ConvgapError` naming them."""
    if name not in POLICIES:
        raise ConvgapError(f"unknown malloc policy {name!r}: use one of {', '.join(POLICIES)}")
    return name


def set_policy(name: str) -> str:
    """Set the process's malloc policy to ``name`` ('default' or 'retain', see the module
    docstring; 'env' re-applies the ``MALLOC_*_`` start-up variables). Returns the policy
    that was in force before. Switching to 'default' also hands retained memory back to the
    kernel (``malloc_trim``). :class:`ConvgapError` for an unknown name or where the policy
    cannot be set (see :func:`available`)."""
    if name != "env":
        check_policy(name)
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
    before = set_policy(name)  # 'default', 'retain' or 'env': available() holds here
    try:
        yield name
    finally:
        set_policy(before)


@dataclass(frozen=True)
class AllocationCost:
    """One callable timed as the process is and under the 'retain' policy.

    current_s / retain_s: median latency (seconds) under the policy in force before
    (``policy``) and with freed memory retained. faults_current / faults_retain: median
    minor page faults per call. ``overhead_s`` is what the process's own policy costs per
    call; ``share`` that as a fraction of ``current_s``."""

    current_s: float
    retain_s: float
    faults_current: float
    faults_retain: float
    policy: str = "default"

    @property
    def overhead_s(self) -> float:
        return self.current_s - self.retain_s

    @property
    def share(self) -> float:
        return self.overhead_s / self.current_s if self.current_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"policy": self.policy, "current_s": self.current_s, "retain_s": self.retain_s,
                "faults_current": self.faults_current, "faults_retain": self.faults_retain,
                "overhead_s": self.overhead_s, "share": self.share}


START_UP = "glibc start-up (dynamic thresholds)"


def allocation_cost(fn: Callable[[], object], config: timing.TimingConfig = timing.QUICK,
                    blocks: int = 2, current: timing.Timing | None = None
                    ) -> AllocationCost | None:
    """Time ``fn`` (a CPU callable) as the process is, then in ``blocks`` blocks under
    'retain' (each block warms up first), and restore the policy setting in force before.
    ``current``: a :class:`~convgap.timing.Timing` of ``fn`` just taken as the process
    is, used instead of timing it again.

    The two cannot alternate: after a 'retain' block the heap holds large free chunks
    that serve later requests without faults under any policy (switching back hands their
    pages to the kernel once, nothing more), so the process's own policy is timed first.
    glibc's start-up state (a dynamic mmap threshold that follows the largest block freed,
    with a trim threshold twice that; on mobilenet_v2 at batch 8 it faulted twice as much
    as the fixed 32 MiB steady state) cannot be set again once left: afterwards the
    process stays at the fixed 'default', and ``policy`` in the result says which was
    measured. ``None`` where the policy cannot be set."""
    if not available():
        return None
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    name = policy() if (_current is not None or policy() == "env") else START_UP
    cur = current if current is not None else timing.measure(fn, config)
    ret: list[float] = []
    ret_faults: list[int] = []
    with use("retain"):
        for _ in range(blocks):
            t = timing.measure(fn, config)
            ret += t.samples
            ret_faults += t.faults
    return AllocationCost(
        cur.median, statistics.median(ret), cur.faults_per_call,
        float(statistics.median(ret_faults)) if ret_faults else 0.0, name)
