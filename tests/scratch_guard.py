"""Runs kernel calls with their scratch ending right at an unmapped page (PROT_NONE), in a
child process: a read or write past a thread's share of the scratch (the last thread's)
ends it with SIGSEGV, and each call's result must equal the one with the usual buffers.

A test passes :func:`run_guarded` the body of a script in which ``run(fn)`` checks one call
(``fn(store)`` returning a tensor, called once with the usual scratch and once guarded),
with torch, ``build``, ``common``, ``pcp``, ``pdp``, ``planar`` and ``stem`` imported and the
libraries the tests loaded reused (no rebuild)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from convgap.kernels.cpu import pcp, pdp, planar, stem

_HARNESS = r"""
import ctypes, mmap, sys
import torch
from convgap.kernels.cpu import build, common, pcp, pdp, planar, stem
for name, path in zip(["pdp", "pcp", "planar", "stem"], sys.argv[1:5]):
    build._LOADED[name] = ctypes.CDLL(path)  # the libraries the tests loaded: no rebuild
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep, usual, checked = [], common.scratch, []

def guarded(store, floats, owner=None):
    page = mmap.PAGESIZE
    used = -(-floats * 4 // page)  # pages holding the buffer
    m = mmap.mmap(-1, (used + 1) * page)  # zeros, as a new owned buffer must be
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(base + used * page, page, 0) == 0  # PROT_NONE
    buf = torch.frombuffer(m, dtype=torch.float32, count=floats, offset=used * page - floats * 4)
    assert buf.data_ptr() % 64 == 0  # whole cache lines per thread
    keep.append(m)
    checked.append(floats)
    return buf

def run(fn):
    common.scratch = usual
    want = fn({})
    common.scratch = guarded
    got = fn({})
    assert torch.equal(got, want), (got - want).abs().max()

torch.manual_seed(0)
"""


def run_guarded(tmp_path: Path, body: str) -> None:
    """Run ``body`` (see the top) after the harness in a child process; fail the calling
    test if it crashed (-11: a kernel touched the page past its scratch) or a result
    differed."""
    paths = [mod.KERNEL.lib()._name for mod in (pdp, pcp, planar, stem)]
    script = tmp_path / "guarded.py"
    script.write_text(_HARNESS + body + '\nprint("ok", len(checked))\n')
    done = subprocess.run([sys.executable, str(script), *paths], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert done.stdout.startswith("ok")
