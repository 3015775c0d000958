"""Running a plan: every pairwise step on one torch op.

A step that convolves 1-3 modes is one ``conv1d/2d/3d`` call; a step that contracts an
operand holding spatial (convolved-kind) modes with one holding none (a feature map with a
weight) is one batched GEMM over positions. Both keep the (batch, channels, spatial) layout:
modes shared by both operands and kept become *groups*, shared and summed modes the *input
channels*, the signal side's other modes the *batch* (or, for modes of the expression that
are convolved elsewhere, extra spatial dimensions with kernel length 1, which saves a
transpose), the kernel side's other kept modes the *output channels*. Any other step is a
contraction by ``torch.einsum`` (a batched GEMM). Stride, padding and dilation apply in the
step where a mode's signal meets its kernel, whatever the number of operands. For long
kernels (stride 1, dilation 1) a step runs by FFT when that is estimated cheaper.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..ops.depthwise import depthwise_nhwc, depthwise_taps, tap_weights
from ..ops.fft import fft_conv
from ..ops.guard import frozen_parameters, jit_tracing
from ..ops.layouts import channels_innermost
from ..ops.measured import fastest
from ..ops.memo import reuse
from ..ops.onednn import conv as onednn_conv
from ..ops.onednn import usable as onednn_usable
from ..ops.pointwise import pointwise
from .cost import Problem
from .path import Plan

__all__ = ["run_plan", "Program", "FFT_MIN_KERNEL", "FFT_ADVANTAGE"]

FFT_MIN_KERNEL = 32  # kernel elements below which a step never runs by FFT
FFT_ADVANTAGE = 4.0  # FFT must be estimated this many times cheaper (its constants are big)
SHIFT_MAX_TAPS = 32  # per-channel filters up to this many taps run as shifted multiply-adds

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def run_plan(p: Problem, plan: Plan, operands: list[torch.Tensor], fft: str | bool = "auto",
             programs: dict | None = None) -> torch.Tensor:
    """Evaluate ``p`` on ``operands`` in the order ``plan``; the result has ``p``'s output
    modes in order.

    The first call for a (plan, fft, layout) works out every step's permutations, shapes
    and torch op from the modes and sizes and keeps them on ``p`` (a :class:`Program`);
    later calls only run the ops, so a small layer pays microseconds, not the planning
    arithmetic, per call. Intermediates are written channels innermost (the layout
    oneDNN's convolutions and the per-position GEMMs run fastest in); the result keeps the
    first operand's layout.

    ``programs``: where the compiled programs live (default: on ``p``, shared by every
    caller with the same expression and shapes). A layer passes its own dict, so the
    state its steps keep (packed weights, results of weight-only steps) is its own and
    two layers of one shape do not evict each other's."""
    dtype = operands[0].dtype
    for t in operands[1:]:
        if t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    channels_last = channels_innermost(operands[0])
    key = (tuple(tuple(s) for s in plan), fft, channels_last)
    owned = programs is not None
    if not owned:
        programs = p.__dict__.setdefault("programs", {})
    program = programs.get(key)
    if program is None:
        program = Program(p, plan, fft, channels_last, owned)
        y = program.run(operands, dtype)  # compiles its steps as it goes
        if not jit_tracing():  # (steps compiled under jit.trace hold traced sizes)
            programs[key] = program
        return y
    return program.run(operands, dtype)


class Program:
    """A plan turned into ready steps: per operand the private modes to sum, then per step
    the two live intermediates it takes and a function running it on torch ops. Steps are
    compiled from the tensors' sizes on the first run."""

    def __init__(self, p: Problem, plan: Plan, fft, channels_last: bool,
                 owned: bool = False) -> None:
        self.p, self.plan, self.fft, self.channels_last = p, [tuple(s) for s in plan], fft, \
            channels_last
        self.prep: list[tuple[int, ...]] = []
        self.modes: dict[int, str] = {}
        for i, ops in enumerate(p.expr.inputs):
            keep = p.modes(1 << i)
            self.prep.append(tuple(j for j, m in enumerate(ops) if m not in keep))
            self.modes[1 << i] = "".join(m for m in ops if m in keep)
        self.steps: list[tuple[int, int, bool, Callable]] | None = None
        self.out_perm: list[int] | None = None
        # a caller's own program (``owned``) keeps the results of its weight-only steps
        self.owned = owned
        self.memo: dict[int, tuple] = {}  # step mask -> (signature, leaves, result)

    def run(self, operands: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        live: dict[int, torch.Tensor] = {}
        for i, (t, drop) in enumerate(zip(operands, self.prep)):
            if t.dtype != dtype:
                t = t.to(dtype)
            live[1 << i] = t.sum(dim=drop) if drop else t
        if self.steps is None:
            return self._compile_and_run(live)
        fixed = frozen_parameters(operands) if self.owned else 0
        for a, b, swap, fn in self.steps:
            mask = a | b
            xa, xb = live.pop(a), live.pop(b)
            if fixed & mask == mask and mask != self.p.full:
                # nothing but parameters below this step, none needing gradients
                live[mask] = self._memoized(mask, operands, dtype, fn, swap, xa, xb)
            else:
                live[mask] = fn(xb, xa) if swap else fn(xa, xb)
        y = live[self.p.full]
        return y if self.out_perm is None else y.permute(self.out_perm)

    def _memoized(self, mask: int, operands: list[torch.Tensor], dtype: torch.dtype,
                  fn: Callable, swap: bool, xa: torch.Tensor, xb: torch.Tensor
                  ) -> torch.Tensor:
        """The step over ``mask``'s operands, reused while each of them is unchanged."""
        leaves = [t for i, t in enumerate(operands) if mask >> i & 1]
        return reuse(self.memo, mask, leaves, lambda: fn(xb, xa) if swap else fn(xa, xb),
                     (dtype,))

    def _compile_and_run(self, live: dict[int, torch.Tensor]) -> torch.Tensor:
        p, modes, steps = self.p, dict(self.modes), []
        for a, b in self.plan if p.n > 1 else []:
            (xa, ma), (xb, mb) = (live.pop(a), modes.pop(a)), (live.pop(b), modes.pop(b))
            convolved = [m for m in ma if m in mb and m in p.conv]
            keep = p.modes(a | b)
            final = (a | b) == p.full
            spatial_a = any(m in p.conv for m in ma)
            spatial_b = any(m in p.conv for m in mb)
            swap = False
            if convolved or spatial_a != spatial_b:
                # a convolution, or a contraction of a feature map with a weight: as a conv
                # with length-1 kernels it keeps the (batch, channels, spatial) layout
                swap = (not a >> p.signal[convolved[0]] & 1) if convolved else spatial_b
                if swap:
                    xa, ma, xb, mb = xb, mb, xa, ma
                fn, out = _conv_step(p, tuple(xa.shape), ma, tuple(xb.shape), mb, convolved,
                                     keep, self.fft, final, self.channels_last)
            else:
                out = p.expr.output if final else _natural(ma, mb, keep)
                fn = _einsum_step(f"{ma},{mb}->{out}")
            x = fn(xa, xb)
            live[a | b], modes[a | b] = x, out
            steps.append((a, b, swap, fn))
        out = modes[p.full]
        if out != p.expr.output:
            self.out_perm = [out.index(m) for m in p.expr.output]
        self.steps = steps
        y = live[p.full]
        return y if self.out_perm is None else y.permute(self.out_perm)


def _einsum_step(equation: str) -> Callable:
    def run(xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return torch.einsum(equation, xa, xb)
    return run


def _natural(ma: str, mb: str, keep: dict[str, int]) -> str:
    """Result order of a contraction: the left operand's kept modes, then the right's."""
    out = [m for m in ma if m in keep]
    out += [m for m in mb if m in keep and m not in out]
    return "".join(out)


def _conv_step(p: Problem, shape_s: tuple, ms: str, shape_k: tuple, mk: str,
               convolved: list[str], keep: dict[str, int], fft, final: bool = False,
               channels_last: bool = False) -> tuple[Callable, str]:
    """Compile one convolution step: the signal (sizes ``shape_s``, modes ``ms``) holds the
    signal of every mode in ``convolved``; the other operand is the kernel. ``final``: it
    produces the result; ``channels_last``: the caller's feature map came channels
    innermost, so a final GEMM step keeps that layout. Returns ``(run(xs, xk), modes of
    the result)``."""
    shared = [m for m in ms if m in mk and m not in convolved]
    groups = [m for m in shared if m in keep]
    chans = [m for m in shared if m not in keep]
    sig_only = [m for m in ms if m not in mk]
    # the signal's other modes of the expression's convolved kind ride along as spatial
    # dims with a length-1 kernel (no transpose), as long as torch has a conv that wide
    extra = [m for m in sig_only if m in p.conv]
    extra = extra[:max(0, 3 - len(convolved))]
    spatial = [m for m in ms if m in convolved or m in extra]
    batch = [m for m in sig_only if m not in extra]
    outs = [m for m in mk if m not in ms and m in keep]
    kkeep = (*shared, *convolved, *outs)
    kdrop = tuple(j for j, m in enumerate(mk) if m not in kkeep)  # the kernel's private modes
    ksize = {m: n for m, n in zip(mk, shape_k) if m in kkeep}
    mk = "".join(m for m in mk if m in kkeep)
    size = dict(zip(ms, shape_s))
    g, c = math.prod(size[m] for m in groups), math.prod(size[m] for m in chans)
    o = math.prod(ksize[m] for m in outs)
    nb = math.prod(size[m] for m in batch)
    order = batch + groups + chans + spatial
    xperm = [ms.index(m) for m in order]
    xshape = (nb, g * c, *[size[m] for m in spatial])
    kperm = [mk.index(m) for m in groups + outs + chans + [m for m in spatial if m in mk]]
    wshape = (g * o, c, *[ksize[m] if m in ksize else 1 for m in spatial])
    stride, dilation, pads = [], [], []
    for m in spatial:
        s, pad, d = p.params.of(m) if m in convolved else (1, (0, 0), 1)
        stride.append(s)
        dilation.append(d)
        pads.append(pad)
    xperm = None if xperm == list(range(len(ms))) else xperm
    kperm = None if kperm == list(range(len(mk))) else kperm
    # which reshapes change anything (each torch call costs microseconds on small layers)
    x_reshape = [size[m] for m in order] != list(xshape)
    k_order = groups + outs + chans + [m for m in spatial if m in mk]
    modes = "".join(batch + groups + outs + spatial)
    dropped = [i for i, m in enumerate(modes) if m not in keep]  # convolved, then summed
    head = [size[m] for m in batch] + [size[m] for m in groups] + [ksize[m] for m in outs]
    y_reshape = head != [nb, g * o]
    out_modes = "".join(m for m in modes if m in keep)

    def operands(wshape: tuple) -> Callable:
        """(xs, xk) -> (x in (N, G*C, *spatial), kernel reshaped to ``wshape``)."""
        w_reshape = [ksize[m] for m in k_order] != list(wshape)

        def prepare(xs: torch.Tensor, xk: torch.Tensor) -> tuple:
            if kdrop:
                xk = xk.sum(dim=kdrop)
            x = xs if xperm is None else xs.permute(xperm)
            if x_reshape:
                x = x.reshape(xshape)
            w = xk if kperm is None else xk.permute(kperm)
            if w_reshape:
                w = w.reshape(wshape)
            return x, w
        return prepare

    def finish(y: torch.Tensor) -> torch.Tensor:
        if y_reshape:
            y = y.reshape(*head, *y.shape[2:])
        return y.sum(dim=dropped) if dropped else y

    if not convolved:  # weight x feature map: a (grouped) batched GEMM over positions
        gemm_cl = not final or channels_last
        prepare = operands((g, o, c) if g > 1 else (o, c))
        packed: dict = {}  # this step's oneDNN-packed weight

        def run(xs: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
            x, w = prepare(xs, xk)
            return finish(pointwise(x, w, g, gemm_cl, packed))
        return run, out_modes
    if c == 1 and o == 1 and math.prod(wshape[2:]) <= SHIFT_MAX_TAPS:
        symmetric = len(spatial) == 2 and all(lo == hi for lo, hi in pads)
        dw_pad = [lo for lo, _ in pads]

        packed_dw: dict = {}  # this step's oneDNN-blocked filters

        def op(x, w):  # one filter per channel
            if symmetric and x.stride(1) == 1:
                # channels innermost: oneDNN's NHWC depthwise kernel, 3-10x faster than
                # the shifted multiply-adds (whose strided views are slow in this layout)
                return depthwise_nhwc(x, w, stride, dw_pad, dilation, g, packed_dw)
            return depthwise_taps(x, tap_weights(w, g), w.shape[2:], stride, pads, dilation)
    elif _use_fft(fft, xshape, wshape, stride, dilation, g):
        ones = (1,) * len(spatial)

        def op(x, w):
            return fft_conv(x, w, ones, pads, ones, g)
    else:
        conv = _CONV[len(spatial)]
        pre = [v for pad in reversed(pads) for v in pad] \
            if any(lo != hi for lo, hi in pads) else None
        cpad = [0] * len(pads) if pre else [lo for lo, _ in pads]

        packed_conv: dict = {}  # this step's oneDNN-blocked weight

        def op(x, w):
            if pre:
                x = F.pad(x, pre)
            if len(cpad) == 2 and onednn_usable(x, w):
                # torch sends small batch-1 convs to its slow reference kernel; oneDNN runs
                # them on a weight blocked once: which is faster depends on sizes
                def onednn():
                    return onednn_conv(x, w, cpad, stride, dilation, g, packed_conv)

                def native():
                    return conv(x, w, None, stride, cpad, dilation, g)
                key = (tuple(x.shape), x.stride(), tuple(w.shape), w.stride(),
                       tuple(stride), tuple(cpad), tuple(dilation), g, str(x.dtype))
                return fastest("einsum-conv", key, {"onednn": onednn, "native": native})()
            return conv(x, w, None, stride, cpad, dilation, g)

    prepare = operands(wshape)

    def run(xs: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        x, w = prepare(xs, xk)
        return finish(op(x, w))
    return run, out_modes


def _use_fft(fft, xshape, wshape, stride, dilation, groups) -> bool:
    """Whether a convolution of an input of ``xshape`` (N, C, *spatial, before padding)
    with a kernel of ``wshape`` runs by FFT under the ``fft`` option."""
    if fft is False or any(s != 1 for s in stride) or any(d != 1 for d in dilation):
        return False
    taps = math.prod(wshape[2:])
    if fft is True:
        return True
    if taps < FFT_MIN_KERNEL:
        return False
    n, cin = xshape[:2]
    o = wshape[0]
    points = math.prod(s + k - 1 for s, k in zip(xshape[2:], wshape[2:]))
    out_pts = math.prod(s - k + 1 for s, k in zip(xshape[2:], wshape[2:]))
    direct = n * o * (cin // groups) * max(out_pts, 1) * taps
    log = max(1.0, math.log2(points))
    spectral = (n * cin + o * (cin // groups)) * points * log + \
        4 * n * o * (cin // groups) * points / 2
    return spectral * FFT_ADVANTAGE < direct
