"""A whole network as one plan of oneDNN primitives (``plan.c``), run by one C call.

torch reaches oneDNN only operator by operator, and each ``_convolution_pointwise`` call
spends 22-56 us on the host outside the primitive (measured here: a tiny conv 22.7 us
against 7.7 for ``F.conv2d``); oneDNN's symbols inside libtorch are not exported. The plan
links oneDNN itself, from the ``onednn-cpu-gomp`` wheel (``pip install
'convgap[onednn]'``: the library and its headers, built on the same GNU OpenMP runtime
torch loads, so its threads are torch's intra-op threads). Where the library or its
headers are missing, :func:`unavailable` says so and callers keep their torch paths.

:class:`Plan` is the builder: each method adds one step on tensor ids (the input's, or a
step's result) and returns its result's id; :meth:`Plan.finalize` lays out the buffers;
:meth:`Plan.run` runs every step on a float32 input into a float32 output.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ...errors import ConvgapError
from .build import enabled, library

__all__ = ["Plan", "PlanSketch", "SketchStep", "unavailable", "root", "ACT", "act_code"]

P, I, F, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64
_L6 = ctypes.c_int64 * 16

# oneDNN eltwise post-ops by convgap's activation names (ops.activations), plan.c's codes
# and the (alpha, beta) they take.
ACT = {None: (0, 0.0, 0.0), "relu": (1, 0.0, 0.0), "relu6": (2, 0.0, 6.0),
       "silu": (3, 1.0, 0.0), "gelu": (4, 0.0, 0.0), "gelu_tanh": (5, 0.0, 0.0),
       "sigmoid": (6, 0.0, 0.0), "hardswish": (7, 0.0, 0.0), "tanh": (8, 0.0, 0.0),
       "hardsigmoid": (9, 0.0, 0.0)}


def act_code(name: str | None) -> tuple[int, float, float]:
    """plan.c's (code, alpha, beta) for activation ``name`` (None: none;
    'leaky_relu:<slope>': a leaky ReLU of that negative slope)."""
    if isinstance(name, str) and name.startswith("leaky_relu:"):
        return (10, float(name.partition(":")[2]), 0.0)
    if name not in ACT:
        raise ConvgapError(f"the plan has no post-op for activation {name!r}")
    return ACT[name]


def root() -> Path | None:
    """The prefix holding oneDNN's library and headers (``$CONVGAP_ONEDNN`` or the Python
    environment's prefix, where the wheels install them), or None."""
    for base in (os.environ.get("CONVGAP_ONEDNN"), sys.prefix, sys.base_prefix):
        if base and (Path(base) / "include/oneapi/dnnl/dnnl.h").exists() and (
                Path(base) / "lib/libdnnl.so").exists():
            return Path(base)
    return None


def unavailable() -> str | None:
    """Why the plan cannot run here (no oneDNN wheel, C kernels off, no compiler), or None
    if it can (the library is then built and loaded)."""
    if not enabled():
        return "C kernels are off (CONVGAP_NATIVE=0)"
    if root() is None:
        return ("oneDNN's library and headers are not installed (pip install "
                "'convgap[onednn]')")
    if _lib() is None:
        return "the plan's C file did not build (see the NativeKernelWarning)"
    return None


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL | None:
    base = root()
    if base is None:
        return None
    lib = library("plan", (f"-I{base / 'include'}", f"-L{base / 'lib'}", "-ldnnl",
                           f"-Wl,-rpath,{base / 'lib'}"), needs_avx512=False)
    if lib is None:
        return None
    sig = {"plan_new": ([I], P), "plan_free": ([P], None), "plan_error": ([P], ctypes.c_char_p),
           "plan_version": ([], I),
           "plan_input": ([P, I, _L6, _L6], I),
           "plan_conv": ([P, I, I, I, _L6, P, P, I, F, F, I, I, I, F, F], I),
           "plan_pool": ([P, I, I, _L6], I),
           "plan_binary": ([P, I, I, I, I, F, F, I], I),
           "plan_eltwise": ([P, I, I, F, F, I], I),
           "plan_linear": ([P, I, I, P, P, I, F, F], I),
           "plan_output": ([P, I, I, _L6, _L6], I),
           "plan_copy": ([P, I], I), "plan_concat": ([P, I, ctypes.POINTER(I)], I),
           "plan_steps": ([P], I), "plan_dims": ([P, I, _L6], I),
           "plan_impl": ([P, I], ctypes.c_char_p), "plan_kind": ([P, I], ctypes.c_char_p),
           "plan_finalize": ([P], I),
           "plan_bytes": ([P], L),
           "plan_run": ([P, P, P], I),
           "plan_run_timed": ([P, P, P, ctypes.POINTER(ctypes.c_double)], I)}
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def _ints(values: Sequence[int]) -> ctypes.Array:
    return _L6(*[int(v) for v in values])


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


class Plan:
    """A plan being built, then run. Every step method returns the id of its result."""

    def __init__(self, layout: str = "nhwc") -> None:
        """``layout``: activations all 'nhwc' (the default: 0.97-1.00 of 'any' on the
        zoo here, b1 and b8) or in the layout each primitive picks ('any': blocked
        nChw16c for most convs)."""
        if layout not in ("any", "nhwc"):
            raise ConvgapError(f"plan layout must be 'any' or 'nhwc', not {layout!r}")
        why = unavailable()
        if why is not None:
            raise ConvgapError(f"the oneDNN plan is unavailable: {why}")
        self._lib = _lib()
        self._h = self._lib.plan_new(1 if layout == "nhwc" else 0)
        if not self._h:
            raise ConvgapError("oneDNN could not create a CPU engine")
        self._finalized = False
        self._marks: list[tuple[int, str | None]] = []

    def mark(self, name: str | None) -> None:
        """The steps added from now on belong to module ``name`` (None: to none)."""
        self._marks.append((self.steps, name))

    def modules(self) -> list[str | None]:
        """Each step's module (:meth:`mark`), in order."""
        return _marked(self._marks, self.steps)

    def __del__(self) -> None:
        h, self._h = getattr(self, "_h", None), None
        if h and getattr(self, "_lib", None) is not None:
            self._lib.plan_free(h)

    def _ok(self, rc: int, what: str) -> int:
        if rc < 0:
            raise ConvgapError(f"plan {what}: {self._lib.plan_error(self._h).decode()}")
        return rc

    def input(self, shape: Sequence[int], strides: Sequence[int]) -> int:
        """The input tensor: float32 of ``shape`` and ``strides`` (elements)."""
        return self._ok(self._lib.plan_input(self._h, len(shape), _ints(shape),
                                             _ints(strides)), "input")

    def conv(self, src: int, weight: torch.Tensor, bias: torch.Tensor | None, *,
             stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
             groups: int, act: str | None = None, add_into: int | None = None,
             add_from: int | None = None, act_after: str | None = None) -> int:
        """A 2-D convolution (``weight`` (O, C/groups, kh, kw); ``padding`` (top, left,
        bottom, right)), then ``act``; then a tensor added: ``add_into`` in place (its
        buffer holds the sum, and its id is returned) or ``add_from`` (read, left as it
        is); then ``act_after``."""
        if add_into is not None and add_from is not None:
            raise ConvgapError("plan convolution: add_into or add_from, not both")
        w, b = _f32(weight), _f32(bias)
        o, c, kh, kw = w.shape
        dims = self.dims(src)
        if len(dims) != 4 or dims[1] != c * groups or o % groups or (
                b is not None and b.shape != (o,)):
            raise ConvgapError(f"plan convolution: a weight {tuple(w.shape)} in {groups} "
                               f"groups does not take an input of dims {dims}")
        geom = [kh, kw, *stride, *padding, *dilation]
        a1, a2 = act_code(act), act_code(act_after)
        return self._ok(self._lib.plan_conv(
            self._h, src, o, groups, _ints(geom), w.data_ptr(),
            None if b is None else b.data_ptr(), a1[0], a1[1], a1[2],
            0 if add_into is None and add_from is None else 1 if add_from is None else 2,
            -1 if add_into is None and add_from is None else (
                add_into if add_from is None else add_from),
            a2[0], a2[1], a2[2]), "convolution")

    def pool(self, src: int, kind: str, kernel: Sequence[int], stride: Sequence[int],
             padding: Sequence[int]) -> int:
        """Pooling, ``kind`` 'max', 'avg' (padding excluded) or 'avg_pad' (included);
        ``padding`` (top, left, bottom, right)."""
        code = {"max": 0, "avg": 1, "avg_pad": 2}[kind]
        return self._ok(self._lib.plan_pool(self._h, src, code,
                                            _ints([*kernel, *stride, *padding])), "pooling")

    def binary(self, a: int, b: int, op: str, *, act: str | None = None,
               inplace: bool = False) -> int:
        """``a + b`` or ``a * b`` (``op`` 'add' / 'mul'; ``b`` broadcast where its dims are
        1), then ``act``; into ``a``'s buffer when ``inplace``."""
        code = act_code(act)
        return self._ok(self._lib.plan_binary(self._h, a, b, {"add": 0, "mul": 1}[op],
                                              *code, int(inplace)), op)

    def eltwise(self, src: int, act: str, *, inplace: bool = False) -> int:
        """``act(src)``, into ``src``'s buffer when ``inplace``."""
        return self._ok(self._lib.plan_eltwise(self._h, src, *act_code(act), int(inplace)),
                        act)

    def linear(self, src: int, weight: torch.Tensor, bias: torch.Tensor | None, *,
               act: str | None = None) -> int:
        """An inner product: ``src`` (N, C[, H, W]) flattened times ``weight`` (O, C*H*W)
        transposed, then ``act``."""
        w, b = _f32(weight), _f32(bias)
        dims = self.dims(src)
        if w.dim() != 2 or w.shape[1] != math.prod(dims[1:]) or (
                b is not None and b.shape != (w.shape[0],)):
            raise ConvgapError(f"plan linear: a weight {tuple(w.shape)} does not take an "
                               f"input of dims {dims}")
        return self._ok(self._lib.plan_linear(self._h, src, w.shape[0], w.data_ptr(),
                                              None if b is None else b.data_ptr(),
                                              *act_code(act)), "linear")

    def concat(self, srcs: Sequence[int]) -> int:
        """The tensors ``srcs`` joined along their channels."""
        dims = [self.dims(t) for t in srcs]
        if any(len(d) != 4 or d[:1] + d[2:] != dims[0][:1] + dims[0][2:] for d in dims):
            raise ConvgapError(f"plan concat: dims {dims} do not join along channels")
        return self._ok(self._lib.plan_concat(self._h, len(srcs), (I * len(srcs))(*srcs)),
                        "concat")

    def copy(self, src: int) -> int:
        """A copy of ``src`` in its own buffer."""
        return self._ok(self._lib.plan_copy(self._h, src), "copy")

    def output(self, src: int, shape: Sequence[int], strides: Sequence[int]) -> int:
        """The output: ``src`` written as float32 of ``shape`` and ``strides``."""
        return self._ok(self._lib.plan_output(self._h, src, len(shape), _ints(shape),
                                              _ints(strides)), "output")

    def dims(self, tid: int) -> tuple[int, ...]:
        """The dims of tensor ``tid``."""
        out = _L6()
        n = self._ok(self._lib.plan_dims(self._h, tid, out), "dims")
        return tuple(out[:n])

    @property
    def steps(self) -> int:
        """Primitives in the plan (reorders included)."""
        return self._lib.plan_steps(self._h)

    def implementations(self) -> list[str]:
        """oneDNN's implementation of each step, in order (e.g. 'brg_conv_fwd:avx512_core');
        a step oneDNN has only reference code for is refused when added."""
        return [self._lib.plan_impl(self._h, i).decode() for i in range(self.steps)]

    def kinds(self) -> list[str]:
        """Each step's primitive kind, in order (oneDNN's names: 'convolution', 'reorder',
        'pooling', 'binary', 'eltwise', 'inner_product', 'concat')."""
        return [self._lib.plan_kind(self._h, i).decode() for i in range(self.steps)]

    def finalize(self) -> int:
        """Lays out the buffers (reused by liveness); returns their bytes."""
        self._ok(self._lib.plan_finalize(self._h), "finalize")
        self._finalized = True
        return int(self._lib.plan_bytes(self._h))

    def run(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Runs every step on ``x`` into ``out`` (both float32 CPU, the shapes and strides
        given to :meth:`input` and :meth:`output`)."""
        self._ok(self._lib.plan_run(self._h, x.data_ptr(), out.data_ptr()), "run")
        return out

    def run_timed(self, x: torch.Tensor, out: torch.Tensor, repeats: int = 1
                  ) -> list[list[float]]:
        """:meth:`run` ``repeats`` times; each run's wall time of every step (seconds, in
        step order: each primitive waited for before the next starts)."""
        times = []
        for _ in range(repeats):
            buf = (ctypes.c_double * max(self.steps, 1))()
            self._ok(self._lib.plan_run_timed(self._h, x.data_ptr(), out.data_ptr(), buf),
                     "run")
            times.append(list(buf[:self.steps]))
        return times


def _marked(marks: Sequence[tuple[int, str | None]], steps: int) -> list[str | None]:
    out: list[str | None] = [None] * steps
    for (start, name), (end, _) in zip(marks, [*marks[1:], (steps, None)]):
        out[start:end] = [name] * (end - start)
    return out


@dataclass
class SketchStep:
    """One primitive a :class:`Plan` would run: ``kind`` (oneDNN's primitive kind, as
    :meth:`Plan.kinds`), ``op`` (finer: 'convolution', 'reorder', 'pooling_max',
    'pooling_avg', 'pooling_global', 'binary_add', 'binary_mul', 'eltwise', 'concat',
    'inner_product'), the tensor ids it reads (its source first) and writes, ``weight``
    dims (a convolution's (O, C/groups, kh, kw), an inner product's (O, K)), ``geometry``
    (a convolution's stride, padding (top, left, bottom, right), dilation, groups; a
    pooling's kernel), ``post_ops`` (activations and a residual add fused into it) and
    ``add`` (0 none, 1 a sum into the buffer it writes, 2 a binary post-op reading another
    tensor), ``acts`` the codes (:func:`act_code`, 0: none) of the activation it applies
    (a convolution's: before and after its add)."""

    kind: str
    op: str
    inputs: tuple[int, ...]
    output: int
    weight: tuple[int, ...] | None = None
    geometry: dict = field(default_factory=dict)
    post_ops: int = 0
    add: int = 0
    acts: tuple[int, int] = (0, 0)


class PlanSketch:
    """The steps a :class:`Plan` (layout 'nhwc') would run, without oneDNN or weights: the
    same builder methods, each step's primitive, its tensors' dims and layouts, the
    reorders ``plan.c`` inserts (an input not in NHWC before each convolution reading it,
    the output always). What latency prediction reads; a test holds it to the real plan's
    :meth:`Plan.kinds` on the zoo."""

    def __init__(self, layout: str = "nhwc") -> None:
        if layout != "nhwc":
            raise ConvgapError("a plan sketch follows layout 'nhwc' only")
        self.tensors: list[tuple[tuple[int, ...], bool]] = []   # (dims, NHWC)
        self.steps_: list[SketchStep] = []
        self._marks: list[tuple[int, str | None]] = []

    mark = Plan.mark

    def modules(self) -> list[str | None]:
        return _marked(self._marks, self.steps)

    @property
    def steps(self) -> int:
        return len(self.steps_)

    def kinds(self) -> list[str]:
        return [s.kind for s in self.steps_]

    def dims(self, tid: int) -> tuple[int, ...]:
        return self.tensors[tid][0]

    def nhwc(self, tid: int) -> bool:
        """Is tensor ``tid`` laid out NHWC (else: plain, as the input or output given)?"""
        return self.tensors[tid][1]

    def _new(self, dims: Sequence[int], nhwc: bool) -> int:
        self.tensors.append((tuple(int(d) for d in dims), nhwc))
        return len(self.tensors) - 1

    def _step(self, kind: str, op: str, inputs: Sequence[int], output: int, **kw) -> int:
        self.steps_.append(SketchStep(kind, op, tuple(inputs), output, **kw))
        return output

    def _as_nhwc(self, tid: int) -> int:
        if self.nhwc(tid):
            return tid
        return self._step("reorder", "reorder", (tid,), self._new(self.dims(tid), True))

    def input(self, shape: Sequence[int], strides: Sequence[int]) -> int:
        dims = tuple(shape)
        dense = len(dims) == 4 and tuple(strides) == (
            dims[1] * dims[2] * dims[3], 1, dims[3] * dims[1], dims[1])
        return self._new(dims, dense)

    def conv(self, src: int, weight: torch.Tensor, bias: torch.Tensor | None, *,
             stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
             groups: int, act: str | None = None, add_into: int | None = None,
             add_from: int | None = None, act_after: str | None = None) -> int:
        if add_from is not None:
            add_from = self._as_nhwc(add_from)
        x = self._as_nhwc(src)
        n, _, h, w = self.dims(x)
        o, _, kh, kw = weight.shape
        oh = (h + padding[0] + padding[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (w + padding[1] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        y = add_into if add_into is not None else self._new((n, o, oh, ow), True)
        other = () if add_from is None else (add_from,)
        return self._step("convolution", "convolution", (x, *other), y,
                          weight=tuple(weight.shape),
                          geometry={"stride": tuple(stride), "padding": tuple(padding),
                                    "dilation": tuple(dilation), "groups": int(groups)},
                          post_ops=(act is not None) + (add_into is not None or
                                                        add_from is not None)
                          + (act_after is not None),
                          add=1 if add_into is not None else 2 if add_from is not None else 0,
                          acts=(act_code(act)[0], act_code(act_after)[0]))

    def pool(self, src: int, kind: str, kernel: Sequence[int], stride: Sequence[int],
             padding: Sequence[int]) -> int:
        n, c, h, w = self.dims(src)
        if tuple(kernel) == (0, 0):
            kernel, stride, padding, op = (h, w), (1, 1), (0, 0, 0, 0), "pooling_global"
        else:
            op = "pooling_max" if kind == "max" else "pooling_avg"
        oh = (h + padding[0] + padding[2] - kernel[0]) // stride[0] + 1
        ow = (w + padding[1] + padding[3] - kernel[1]) // stride[1] + 1
        return self._step("pooling", op, (src,), self._new((n, c, oh, ow), self.nhwc(src)),
                          geometry={"kernel": tuple(kernel)})

    def binary(self, a: int, b: int, op: str, *, act: str | None = None,
               inplace: bool = False) -> int:
        if self.dims(a) == self.dims(b) and self.nhwc(a) != self.nhwc(b):
            b = self._step("reorder", "reorder", (b,), self._new(self.dims(b),
                                                                  self.nhwc(a)))
        y = a if inplace else self._new(self.dims(a), self.nhwc(a))
        return self._step("binary", f"binary_{op}", (a, b), y, post_ops=act is not None,
                          acts=(act_code(act)[0], 0))

    def eltwise(self, src: int, act: str, *, inplace: bool = False) -> int:
        y = src if inplace else self._new(self.dims(src), self.nhwc(src))
        return self._step("eltwise", "eltwise", (src,), y, acts=(act_code(act)[0], 0))

    def linear(self, src: int, weight: torch.Tensor, bias: torch.Tensor | None, *,
               act: str | None = None) -> int:
        return self._step("inner_product", "inner_product", (src,),
                          self._new((self.dims(src)[0], weight.shape[0]), False),
                          weight=tuple(weight.shape), post_ops=act is not None,
                          acts=(act_code(act)[0], 0))

    def concat(self, srcs: Sequence[int]) -> int:
        n, _, h, w = self.dims(srcs[0])
        c = sum(self.dims(t)[1] for t in srcs)
        return self._step("concat", "concat", tuple(srcs), self._new((n, c, h, w), True))

    def copy(self, src: int) -> int:
        return self._step("reorder", "reorder", (src,),
                          self._new(self.dims(src), self.nhwc(src)))

    def output(self, src: int, shape: Sequence[int], strides: Sequence[int]) -> int:
        return self._step("reorder", "reorder", (src,), self._new(shape, False))

    def finalize(self) -> int:
        return 0
