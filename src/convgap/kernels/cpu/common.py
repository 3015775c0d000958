"""What the fused-convolution wrappers share: loading a kernel with its ctypes signatures,
packing weights into the GEMM core's panel layout (gemm.h), the bias and scratch buffers,
the checks on their arguments, the bound call (one argument struct, :mod:`.args`, built at
bind time), and the layout rule: an input with channels innermost
(:func:`convgap.ops.layouts.channels_innermost`) is read in place as NHWC and the result written NHWC;
any other runs as NCHW (read in place where contiguous, else copied once)."""

from __future__ import annotations

import ctypes
import threading
from typing import Callable

import torch

from ...errors import ConvgapError
from ...ops.layouts import channels_innermost
from .args import Args, check_layout
from .build import library

__all__ = ["P", "I", "L", "Kernel", "pack", "padded", "round16", "scratch",
           "check_tensors", "channels_innermost", "output_strides", "bound_call",
           "kernel_choice", "BAND_PIXELS", "ACTIVATIONS", "activation_code"]

BAND_PIXELS = 96  # output pixels per band of rows (rows of the last GEMM per loop turn)
P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long

# The activations the kernels apply in their epilogues, by name: act.h's ACT_ codes (keep
# the two lists in the same order). silu is x * sigmoid(x), relu6 min(max(x, 0), 6),
# sigmoid 1 / (1 + exp(-x)).
ACTIVATIONS = {"none": 0, "relu": 1, "relu6": 2, "silu": 3, "sigmoid": 4}


def activation_code(name: str) -> int:
    """The kernels' code (act.h) for an activation of :data:`ACTIVATIONS`; ConvgapError
    for any other name."""
    code = ACTIVATIONS.get(name) if isinstance(name, str) else None
    if code is None:
        raise ConvgapError(f"unknown activation {name!r}; expected one of "
                           f"{', '.join(map(repr, ACTIVATIONS))}")
    return code


class Kernel:
    """One C kernel (``<name>.c``), the ctypes mirror of its argument struct (``args``, from
    :mod:`.args`) and the ctypes signatures of its exports: gemm.h's packing functions,
    ``scratch_floats(const Args *g)`` and ``forward(const Args *g, x, y, scratch, int
    threads)``. :meth:`lib` loads it on first use (None where it cannot be built) and checks
    that ``args`` has the C struct's layout (:func:`.args.check_layout`: ArgsLayoutError if
    not, at load rather than as a wrong result); :meth:`available` says whether it can."""

    def __init__(self, name: str, forward: str, args: type[Args]) -> None:
        self.name = name
        self.args = args
        ref = ctypes.POINTER(args)  # takes the struct itself, by reference
        self.functions = {"packed_floats": ([I, I, I], L),
                          "pack_b": ([P, I, I, I, L, L, L, P], None),
                          "scratch_floats": ([ref], L), forward: ([ref, P, P, P, I], None)}
        self._typed = None  # the library whose layout was checked and functions typed

    def lib(self) -> ctypes.CDLL | None:
        lib = library(self.name)
        if lib is not None and lib is not self._typed:
            check_layout(lib, self.args, self.name)
            for fn, (args, result) in self.functions.items():
                getattr(lib, fn).argtypes = args
                getattr(lib, fn).restype = result
            self._typed = lib
        return lib

    def available(self) -> bool:
        """True where the kernel is built and loadable (x86-64 with AVX-512, a C compiler,
        ``CONVGAP_NATIVE`` not 0)."""
        return self.lib() is not None


def round16(n: int) -> int:
    return (n + 15) // 16 * 16


def pack(lib, w: torch.Tensor) -> torch.Tensor:
    """A (K, N) or (taps, K, N) weight (any strides) in the GEMM core's panel layout."""
    w = w.detach()
    if w.dim() == 2:
        w = w[None]
    t, k, n = w.shape
    out = torch.empty(lib.packed_floats(t, k, n), dtype=torch.float32)
    lib.pack_b(w.data_ptr(), t, k, n, w.stride(0), w.stride(1), w.stride(2), out.data_ptr())
    return out


def padded(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A bias zero-padded to a multiple of 16 floats (the kernels read whole vectors)."""
    if bias is None:
        return None
    out = torch.zeros(round16(bias.shape[0]), dtype=torch.float32)
    out[:bias.shape[0]] = bias.detach()
    return out


_ARENA = threading.local()  # each thread's one scratch buffer, shared by every kernel call


def scratch(store: dict, floats: int, owner=None) -> torch.Tensor:
    """A float buffer of at least ``floats`` for one kernel call. Without an ``owner``: the
    calling thread's one buffer, shared by every kernel that thread runs (a thread runs one
    call at a time, and no kernel keeps anything in it between calls), grown when a call
    needs more; ``store`` is not used. One buffer stays in cache where one per layer evicts
    the weights: a fused mobilenet_v2 at batch 1 touched 18 buffers (12 MiB) and ran 9%
    slower for it. With an ``owner`` (a hashable naming one kernel and geometry) the
    buffer is that owner's alone, kept in ``store`` per calling thread and zero-filled when
    new, so zeros the kernel never overwrites stay zero across calls (the planar kernel's
    window padding)."""
    if owner is None:
        buf = getattr(_ARENA, "buf", None)
        if buf is None or buf.numel() < floats:
            buf = _ARENA.buf = torch.empty(floats, dtype=torch.float32)
        return buf
    key = ("scratch", owner, threading.get_ident())
    buf = store.get(key)
    if buf is None or buf.numel() < floats:
        buf = store[key] = torch.zeros(floats, dtype=torch.float32)
    return buf


def check_tensors(fn: str, **tensors: torch.Tensor | None) -> None:
    """Float32 CPU tensors, none needing gradients."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise ConvgapError(f"{fn} runs float32 CPU tensors; {name} is {t.dtype} on "
                               f"{t.device}")
        if torch.is_grad_enabled() and t.requires_grad:
            raise ConvgapError(f"{fn} has no backward: call it under torch.no_grad() (or "
                               f"use the layer's torch path)")


def output_strides(shape: tuple, nhwc: bool) -> tuple:
    """The strides of a dense (N, C, H, W) tensor of ``shape``: channels_last if ``nhwc``,
    else contiguous."""
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c) if nhwc else (c * h * w, h * w, w, 1)


def kernel_choice(kernel: str, planar_ok: bool, nchw: bool) -> bool:
    """True to run the planar kernel: ``kernel`` 'planar' (ConvgapError where it does not
    apply), 'nhwc', or 'auto' (planar for NCHW inputs, ``nchw``, where it applies; the NHWC
    kernel for channels_last ones)."""
    if kernel not in ("auto", "nhwc", "planar"):
        raise ConvgapError(f"kernel must be 'auto', 'nhwc' or 'planar', got {kernel!r}")
    if kernel == "planar" and not planar_ok:
        raise ConvgapError("the planar kernel needs a dense NCHW or channels_last input, "
                           "width strides of 1 and, with a second filter, a first one along "
                           "columns only")
    return planar_ok and nchw if kernel == "auto" else kernel == "planar"


def bound_call(forward, args: Args, per: int, in_shape: tuple, out_shape: tuple, nhwc: bool,
               store: dict, holds, owner=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function a kernel's ``bind`` returns: ``forward(args, x, y, scratch, threads)``
    (``args``: the kernel's struct, weights and geometry, built once here at bind time and
    passed by reference on every call) on an input ``x`` of ``in_shape`` (read in place:
    NHWC memory if ``nhwc``, else NCHW, contiguous or copied once), into a new result of
    ``out_shape`` in the same layout, with ``per`` floats of scratch per thread (the
    ``owner``'s: see :func:`scratch`). It keeps ``holds`` (what ``args``' weights point
    into) alive, and ``args`` (as ``call.args``)."""
    strides = output_strides(out_shape, nhwc)
    # a result of the input's shape is allocated like it (its layout, dense): 0.3 us less a
    # call than empty_strided, whose shape and strides are parsed from Python
    like = tuple(in_shape) == tuple(out_shape)
    # an owner's buffer: (thread ident, threads, buffer) of the last call, read and
    # replaced as one object: most calls come from the thread of the last one with the same
    # thread count, and skip scratch's key and lookup (0.25 us of a 50 us call at batch 1).
    # The thread's shared buffer is looked up on every call (another kernel may have grown
    # it since)
    last = [(None, 0, None)]

    def call(x: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        if owner is None:
            buf = scratch(store, threads * per)
        else:
            ident = threading.get_ident()
            memo = last[0]
            if memo[0] == ident and memo[1] == threads:
                buf = memo[2]
            else:
                buf = scratch(store, threads * per, owner)
                last[0] = (ident, threads, buf)
        xc = x if nhwc else x.contiguous()  # held here: a copy must outlive the call
        # (empty_strided: 0.5 us less per call than empty with a memory_format)
        y = torch.empty_like(xc) if like else \
            torch.empty_strided(out_shape, strides, dtype=torch.float32)
        forward(args, xc.data_ptr(), y.data_ptr(), buf.data_ptr(), threads)
        return y
    call.weights = holds
    call.args = args
    return call
