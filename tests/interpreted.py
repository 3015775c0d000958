"""Helpers of the Triton tests that run under triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported, and other tests of the
session may already have imported it, so those checks run in a subprocess (with ``src/``
and this folder on its path) that prints one ``JSON:`` line the tests assert on. The
subprocess scripts import :func:`make_input` and :func:`rel` from here too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")
HERE = str(Path(__file__).resolve().parent)


def make_input(n: int, c: int, h: int, w: int, layout: str) -> torch.Tensor:
    """A random (n, c, h, w) float32 map: 'nchw' contiguous, 'cl' channels_last, 'slice'
    (every other column of a wider tensor, channels sliced too: arbitrary strides) or
    'shifted' (channels_last rows of c + 4 values starting one value in: evenly strided
    pixels whose first one is not 16-byte aligned)."""
    if layout == "slice":
        return torch.randn(n, c + 3, h, 2 * w)[:, 1:c + 1, :, ::2]
    if layout == "shifted":
        return torch.randn(n, h, w, c + 4)[..., 1:c + 1].permute(0, 3, 1, 2)
    x = torch.randn(n, c, h, w)
    return x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the reference's largest magnitude (float64)."""
    return float((y.double() - ref.double()).abs().max() / ref.double().abs().max())


def run_py(code: str, *args: str, interpret: bool, timeout: float = 300) -> str:
    """stdout of ``python -c code *args`` with or without ``TRITON_INTERPRET=1``; fails
    the test if it exits non-zero."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, HERE, env.get("PYTHONPATH", "")])
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def run_interpreted(code: str, *args: str, timeout: float = 600) -> dict:
    """The JSON a script printed (``print("JSON:" + json.dumps(...))``), run interpreted."""
    return printed_json(run_py(code, *args, interpret=True, timeout=timeout))


def printed_json(stdout: str) -> dict:
    """The object of the ``JSON:`` line a script printed."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("JSON:"))
    return json.loads(line[len("JSON:"):])


def compile_for_hopper(fn, constexprs: dict, dtype: str, descriptors: dict, warps: int,
                       stages: int, pointers: dict | None = None):
    """Triton kernel ``fn`` (a plain function) compiled here for sm_90 down to its cubin,
    with ``constexprs``, pointers of ``dtype`` ('bf16', 'fp32'; ``pointers``: argument name
    -> another element type, e.g. 'i32'), the tensor descriptors ``descriptors`` (argument
    name -> tile shape) and 32-bit ints elsewhere: what the
    interpreter would let through and a GPU reject. Skips the test in a process that
    interprets triton, or without the nvidia backend's ptxas."""
    import pytest
    import triton
    from convgap.kernels.triton import interpreting
    if interpreting():
        pytest.skip("this process interprets triton")
    nvidia = pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    try:
        nvidia.get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001 - a triton without its bundled ptxas
        pytest.skip(f"no ptxas: {exc}")
    jit = triton.runtime.JITFunction(fn)
    signature = {name: "constexpr" if name in constexprs else
                 f"tensordesc<{dtype}[{','.join(map(str, descriptors[name]))}]>"
                 if name in descriptors else
                 f"*{(pointers or {}).get(name, dtype)}" if name.endswith("_ptr") else "i32"
                 for name in jit.arg_names}
    return triton.compile(ASTSource(jit, signature, constexprs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def ptxas_spills(kernel) -> int:
    """Bytes of registers a kernel compiled by :func:`compile_for_hopper` spills (its PTX
    assembled again with ``ptxas -v`` for sm_90a)."""
    import subprocess
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        out = subprocess.run([get_ptxas(90).path, "-v", "-arch=sm_90a", f.name, "-o",
                              "/dev/null"], capture_output=True, text=True, check=True)
    line = next(l for l in out.stderr.splitlines() if "spill stores" in l)
    return int(line.split("bytes spill stores")[0].split(",")[-1])
