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

import itertools
import math

import torch
import torch.nn.functional as F

from .cost import Problem
from .path import Plan

__all__ = ["run_plan", "per_channel_conv", "FFT_MIN_KERNEL", "FFT_ADVANTAGE"]

FFT_MIN_KERNEL = 32  # kernel elements below which a step never runs by FFT
FFT_ADVANTAGE = 4.0  # FFT must be estimated this many times cheaper (its constants are big)
SHIFT_MAX_TAPS = 32  # per-channel filters up to this many taps run as shifted multiply-adds

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _sum_private(x: torch.Tensor, modes: str, keep: dict[str, int]) -> tuple[torch.Tensor, str]:
    drop = [i for i, m in enumerate(modes) if m not in keep]
    if not drop:
        return x, modes
    return x.sum(dim=drop), "".join(m for m in modes if m in keep)


def run_plan(p: Problem, plan: Plan, operands: list[torch.Tensor], fft: str | bool = "auto"
             ) -> torch.Tensor:
    """Evaluate ``p`` on ``operands`` in the order ``plan``; the result has ``p``'s output
    modes in order."""
    dtype = operands[0].dtype
    for t in operands[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    live: dict[int, tuple[torch.Tensor, str]] = {}
    for i, (t, ops) in enumerate(zip(operands, p.expr.inputs)):
        live[1 << i] = _sum_private(t.to(dtype), ops, p.modes(1 << i))
    if p.n == 1:
        x, modes = live[1]
        return _to_output(x, modes, p.expr.output)
    for a, b in plan:
        (xa, ma), (xb, mb) = live.pop(a), live.pop(b)
        convolved = [m for m in ma if m in mb and m in p.conv]
        keep = p.modes(a | b)
        final = (a | b) == p.full
        spatial_a = any(m in p.conv for m in ma)
        spatial_b = any(m in p.conv for m in mb)
        if convolved or spatial_a != spatial_b:
            # a convolution, or a contraction of a feature map with a weight: as a conv
            # with length-1 kernels it keeps the (batch, channels, spatial) layout
            if (not a >> p.signal[convolved[0]] & 1) if convolved else spatial_b:
                xa, ma, xb, mb = xb, mb, xa, ma
            x, modes = _conv_step(p, xa, ma, xb, mb, convolved, keep, fft)
        else:
            out = p.expr.output if final else _natural(ma, mb, keep)
            x, modes = torch.einsum(f"{ma},{mb}->{out}", xa, xb), out
        live[a | b] = (x, modes)
    x, modes = live[p.full]
    return _to_output(x, modes, p.expr.output)


def _natural(ma: str, mb: str, keep: dict[str, int]) -> str:
    """Result order of a contraction: the left operand's kept modes, then the right's."""
    out = [m for m in ma if m in keep]
    out += [m for m in mb if m in keep and m not in out]
    return "".join(out)


def _to_output(x: torch.Tensor, modes: str, output: str) -> torch.Tensor:
    if modes == output:
        return x
    return x.permute([modes.index(m) for m in output])


def _conv_step(p: Problem, xs: torch.Tensor, ms: str, xk: torch.Tensor, mk: str,
               convolved: list[str], keep: dict[str, int], fft) -> tuple[torch.Tensor, str]:
    """One convolution step: ``xs`` holds the signal of every mode in ``convolved``."""
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
    xk, mk = _sum_private(xk, mk, {m: 0 for m in (*shared, *convolved, *outs)})
    size = dict(zip(ms, xs.shape))
    ksize = dict(zip(mk, xk.shape))
    g, c = math.prod(size[m] for m in groups), math.prod(size[m] for m in chans)
    o = math.prod(ksize[m] for m in outs)
    nb = math.prod(size[m] for m in batch)
    order = batch + groups + chans + spatial
    x = xs.permute([ms.index(m) for m in order]).reshape(nb, g * c, *[size[m] for m in spatial])
    kperm = [mk.index(m) for m in groups + outs + chans + [m for m in spatial if m in mk]]
    w = xk.permute(kperm).reshape(g * o, c, *[ksize[m] if m in ksize else 1 for m in spatial])
    stride, dilation, pads = [], [], []
    for m in spatial:
        if m in convolved:
            s, pad, d = p.params.of(m)
        else:
            s, pad, d = 1, (0, 0), 1
        stride.append(s)
        dilation.append(d)
        pads.append(pad)
    if not convolved:  # weight x feature map: a (grouped) batched GEMM over positions
        y = torch.matmul(w.reshape(g, o, c), x.reshape(nb, g, c, -1))
        y = y.reshape(nb, g * o, *x.shape[2:])
    elif c == 1 and o == 1 and math.prod(w.shape[2:]) <= SHIFT_MAX_TAPS:
        y = per_channel_conv(x, w, stride, pads, dilation)  # one filter per channel
    elif _use_fft(fft, x, w, stride, dilation, g):
        y = _fft_conv(x, w, pads, g)
    else:
        if any(lo != hi for lo, hi in pads):
            x = F.pad(x, [v for pad in reversed(pads) for v in pad])
            pads = [(0, 0)] * len(pads)
        y = _CONV[len(spatial)](x, w, None, stride, [lo for lo, _ in pads], dilation, g)
    sizes_out = [size[m] for m in batch] + [size[m] for m in groups] + \
                [ksize[m] for m in outs] + list(y.shape[2:])
    modes = "".join(batch + groups + outs + spatial)
    y = y.reshape(sizes_out)
    dropped = [i for i, m in enumerate(modes) if m not in keep]  # convolved, then summed
    if dropped:
        y = y.sum(dim=dropped)
        modes = "".join(m for m in modes if m in keep)
    return y, modes


def per_channel_conv(x: torch.Tensor, w: torch.Tensor, stride, pads, dilation) -> torch.Tensor:
    """A per-channel (depthwise, one filter per channel) convolution as one multiply-add of
    a strided view per tap. ``x``: (N, C, *spatial); ``w``: (C, 1, *kernel); ``pads``: a
    (left, right) pair per spatial dim. oneDNN's NCHW depthwise kernels for 1-D (kx1) filters measured
    3-16x slower than this here."""
    if any(lo or hi for lo, hi in pads):
        x = F.pad(x, [v for pad in reversed(pads) for v in pad])
    ksize = w.shape[2:]
    spatial = x.shape[2:]
    outs = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(spatial, ksize, stride, dilation)]
    taps = w.reshape(w.shape[0], -1)
    view = (1, -1) + (1,) * len(spatial)
    y = None
    for t, idx in enumerate(itertools.product(*[range(k) for k in ksize])):
        sl = tuple(slice(i * d, i * d + (m - 1) * s + 1, s)
                   for i, d, m, s in zip(idx, dilation, outs, stride))
        xs = x[(slice(None), slice(None)) + sl]
        if y is None:
            y = xs * taps[:, t].view(view)
        else:
            y.addcmul_(xs, taps[:, t].view(view))
    return y


def _use_fft(fft, x, w, stride, dilation, groups) -> bool:
    if fft is False or any(s != 1 for s in stride) or any(d != 1 for d in dilation):
        return False
    taps = math.prod(w.shape[2:])
    if fft is True:
        return True
    if taps < FFT_MIN_KERNEL:
        return False
    n, cin = x.shape[:2]
    o = w.shape[0]
    points = math.prod(s + k - 1 for s, k in zip(x.shape[2:], w.shape[2:]))
    out_pts = math.prod(s - k + 1 for s, k in zip(x.shape[2:], w.shape[2:]))
    direct = n * o * (cin // groups) * max(out_pts, 1) * taps
    log = max(1.0, math.log2(points))
    spectral = (n * cin + o * (cin // groups)) * points * log + \
        4 * n * o * (cin // groups) * points / 2
    return spectral * FFT_ADVANTAGE < direct


def _fft_conv(x: torch.Tensor, w: torch.Tensor, pads, groups: int) -> torch.Tensor:
    """Grouped N-d cross-correlation by FFT (stride 1, dilation 1)."""
    nd = x.dim() - 2
    x = F.pad(x, [v for pad in reversed(pads) for v in pad])
    dims = list(range(2, 2 + nd))
    spatial = x.shape[2:]
    size = [s + k - 1 for s, k in zip(spatial, w.shape[2:])]
    real = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = torch.fft.rfftn(x.to(real), s=size, dim=dims)
    wf = torch.fft.rfftn(w.flip(dims).to(real), s=size, dim=dims)
    n, cin = x.shape[:2]
    o = w.shape[0]
    cg, og = cin // groups, o // groups
    xf = xf.reshape(n, groups, cg, *xf.shape[2:])
    wf = wf.reshape(groups, og, cg, *wf.shape[2:])
    yf = torch.einsum("ngc...,goc...->ngo...", xf, wf).reshape(n, o, *xf.shape[3:])
    y = torch.fft.irfftn(yf, s=size, dim=dims)
    idx = [slice(None), slice(None)] + [slice(k - 1, s) for s, k in zip(spatial, w.shape[2:])]
    return y[tuple(idx)].to(x.dtype)
