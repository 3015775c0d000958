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
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import choice, config, timing
from ..tracing import exporting, jit_tracing
from .cost import Problem
from .path import Plan

__all__ = ["run_plan", "Program", "per_channel_conv", "depthwise_nhwc", "channels_innermost",
           "FFT_MIN_KERNEL", "FFT_ADVANTAGE"]

FFT_MIN_KERNEL = 32  # kernel elements below which a step never runs by FFT
FFT_ADVANTAGE = 4.0  # FFT must be estimated this many times cheaper (its constants are big)
SHIFT_MAX_TAPS = 32  # per-channel filters up to this many taps run as shifted multiply-adds

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
PACK_MAX_MISSES = 2  # a step whose weight changed this often stops packing it
# timing of a measured kernel choice (once per shape; the layer's first call pays it)

_ONEDNN = torch.backends.mkldnn.is_available()


def _onednn_gemm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True if ``x @ w.t()`` may run on oneDNN's linear kernel: CPU, fp32, inference (no
    autograd through it), not under tracing or compilation. On this AMD CPU that runs at
    350-450 GFLOP/s where torch.mm (MKL sgemm, no AVX-512 here) reaches about 200."""
    return (_ONEDNN and torch.backends.mkldnn.enabled and x.device.type == "cpu"
            and x.dtype == torch.float32 and w.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and not exporting())


def _packed_weight(packed: dict | None, w: torch.Tensor, shape_key,
                   reorder: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """``reorder()`` (``w`` in oneDNN's layout for ``shape_key``: a row count, an input
    shape), kept in ``packed`` (one cache per compiled step) and reused while ``w`` is the
    same memory at the same version. A weight built afresh every call never hits: after
    ``PACK_MAX_MISSES`` misses the step stops packing (None)."""
    if packed is None or packed.get("misses", 0) >= PACK_MAX_MISSES:
        return None
    sig = (w.data_ptr(), w._version, w.shape, w.stride(), shape_key)
    hit = packed.get("w")
    if hit is None or hit[0] != sig:
        if hit is not None:
            packed["misses"] = packed.get("misses", 0) + 1
        # the entry holds ``w`` itself, so its memory cannot pass to a look-alike tensor
        hit = packed["w"] = (sig, w, reorder())
    return hit[2]


def _linear(x: torch.Tensor, w: torch.Tensor, packed: dict | None = None) -> torch.Tensor:
    """``x @ w.t()`` by oneDNN (x: (..., C) in any strides, w: (O, C)). With a ``packed``
    cache, the weight is reordered once for the row count and reused while unchanged (25%
    off a 6272-row GEMM here)."""
    rows = x.numel() // x.shape[-1]
    wp = _packed_weight(packed, w, rows,
                        lambda: torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows))
    return torch.ops.mkldnn._linear_pointwise(x, w if wp is None else wp, None, "none", [],
                                              "")


def _conv_onednn(x: torch.Tensor, w: torch.Tensor, pad, stride, dilation, groups: int,
                 packed: dict | None = None, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """A 2-D convolution step on oneDNN. With a ``packed`` cache, the weight is reordered
    once into oneDNN's blocked layout for this input shape and reused while unchanged; a
    plain weight is reordered inside every call (a Tucker core on a 7x7 map at batch 1:
    most of the step)."""
    pad, stride, dilation = list(pad), list(stride), list(dilation)
    wp = _packed_weight(packed, w, x.shape, lambda: torch._C._nn.mkldnn_reorder_conv2d_weight(
        w.contiguous().to_mkldnn(), pad, stride, dilation, groups, list(x.shape)))
    return torch.ops.mkldnn._convolution_pointwise(x, w if wp is None else wp, bias, pad,
                                                   stride, dilation, groups, "none", [], "")


def depthwise_nhwc(x: torch.Tensor, w: torch.Tensor, stride, pad, dilation, groups: int,
                   packed: dict | None = None, bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``F.conv2d(x, w, bias, stride, pad, dilation, groups)`` for a channels-innermost
    ``x`` and one filter per channel (symmetric zero padding ``pad``, per spatial dim).
    With a ``packed`` cache, in CPU fp32 inference, the filters may run blocked once on
    oneDNN (:func:`_conv_onednn`) instead: F.conv2d reorders them on every call, most of
    the time on a small map; a one-time paired measurement per shape picks."""
    def native():
        return F.conv2d(x, w, bias, stride, pad, dilation, groups)
    if packed is None or not _onednn_gemm(x, w):
        return native()

    def onednn():
        return _conv_onednn(x, w, pad, stride, dilation, groups, packed, bias)
    key = (tuple(x.shape), x.stride(), tuple(w.shape), w.stride(), tuple(stride), tuple(pad),
           tuple(dilation), groups, bias is not None, str(x.dtype))
    return _fastest("einsum-depthwise", key, {"onednn": onednn, "native": native})()


def _fastest(kind: str, key: tuple, fns: dict[str, Callable], device: str = "cpu",
             rounds: timing.TimingConfig | None = None) -> Callable:
    """The fastest of ``fns`` (name -> zero-argument callable; the first is the incumbent)
    on this step's shapes, by the one measured-and-verified choice (:mod:`convgap.choice`:
    checked against the incumbent, timed interleaved, replaced past the margin, stored by
    name per device, threads and malloc policy). Used where the winner depends on the sizes
    (oneDNN with a layout copy against BLAS: a 128-channel 28x28 map at batch 8, BLAS 1.3x
    faster; a 512-channel 7x7 map, oneDNN 1.8x faster)."""
    rounds = rounds or config.STEP_ROUNDS
    return choice.pick(fns, kind=kind, spec_key=key, device=str(device), rounds=rounds,
                       confirm=rounds)


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
        fixed = _frozen_parameters(operands) if self.owned else 0
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


def signature(tensors: Sequence[torch.Tensor]) -> list:
    """Identity, version counter and memory of each tensor: equal while none of them was
    replaced, modified in place (through autograd-visible ops) or given new storage. (A
    list, not a tuple: fused layers check it on every call.)"""
    return [(id(t), t._version, t.data_ptr()) for t in tensors]


def reuse(store: dict, slot, tensors: Sequence[torch.Tensor],
          compute: Callable[[], torch.Tensor], extra: tuple = ()) -> torch.Tensor:
    """``compute()``, kept in ``store[slot]`` as ``(signature, tensors, result)`` and
    returned again while each of ``tensors`` is the same tensor (identity, version
    counter, storage) and ``extra`` is equal. The entry holds the tensors, so no other
    tensor can take their identity or memory meanwhile."""
    sig = (*extra, *signature(tensors))
    hit = store.get(slot)
    if hit is None or hit[0] != sig:
        hit = store[slot] = (sig, tuple(tensors), compute())
    return hit[2]


def _frozen_parameters(operands: list[torch.Tensor]) -> int:
    """Bit mask of the operands that are ``nn.Parameter`` s not needing gradients now (no
    autograd, or requires_grad off); 0 under tracing, export or compilation."""
    if exporting():
        return 0
    grad = torch.is_grad_enabled()
    mask = 0
    for i, t in enumerate(operands):
        if isinstance(t, nn.Parameter) and not (grad and t.requires_grad):
            mask |= 1 << i
    return mask


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
            return finish(_gemm_step(x, w, g, gemm_cl, packed))
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
            return per_channel_conv(x, w, stride, pads, dilation)
    elif _use_fft(fft, xshape, wshape, stride, dilation, g):
        def op(x, w):
            return _fft_conv(x, w, pads, g)
    else:
        conv = _CONV[len(spatial)]
        pre = [v for pad in reversed(pads) for v in pad] \
            if any(lo != hi for lo, hi in pads) else None
        cpad = [0] * len(pads) if pre else [lo for lo, _ in pads]

        packed_conv: dict = {}  # this step's oneDNN-blocked weight

        def op(x, w):
            if pre:
                x = F.pad(x, pre)
            if len(cpad) == 2 and _onednn_gemm(x, w):
                # torch sends small batch-1 convs to its slow reference kernel; oneDNN runs
                # them on a weight blocked once: which is faster depends on sizes
                def onednn():
                    return _conv_onednn(x, w, cpad, stride, dilation, g, packed_conv)

                def native():
                    return conv(x, w, None, stride, cpad, dilation, g)
                key = (tuple(x.shape), x.stride(), tuple(w.shape), w.stride(),
                       tuple(stride), tuple(cpad), tuple(dilation), g, str(x.dtype))
                return _fastest("einsum-conv", key, {"onednn": onednn, "native": native})()
            return conv(x, w, None, stride, cpad, dilation, g)

    prepare = operands(wshape)

    def run(xs: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        x, w = prepare(xs, xk)
        return finish(op(x, w))
    return run, out_modes


def channels_innermost(x: torch.Tensor) -> bool:
    """True if ``x`` (N, C, *spatial) is stored with channels innermost (channels_last /
    channels_last_3d, or any dense equivalent) and is not plainly contiguous."""
    if x.dim() < 3 or x.shape[1] == 1:
        return False
    return x.movedim(1, -1).is_contiguous() and not x.is_contiguous()


def _gemm_step(x: torch.Tensor, w: torch.Tensor, g: int, channels_last: bool,
               packed: dict | None = None) -> torch.Tensor:
    """``w`` ((G, O, C), or (O, C) when G = 1) applied to ``x`` (N, G*C, *spatial) at every
    position: (N, G*O, *spatial). Without groups this is one GEMM whose operands are read
    in the layout they have (a transposed operand costs BLAS nothing; torch.matmul would
    fold a transposed batch into rows by copying it, so bmm is explicit) and whose result
    is written channels innermost when ``channels_last`` (the layout the next convolution
    step runs fastest in) or channels-major otherwise. With groups, a batched GEMM over
    (N, G)."""
    nb, spatial = x.shape[0], x.shape[2:]
    if g > 1:
        o, c = w.shape[1], w.shape[2]
        y = torch.matmul(w, x.reshape(nb, g, c, -1))
        return y.reshape(nb, g * o, *spatial)
    o, c = w.shape
    # channels go back to dim 1 from ``last``, not -1: the TorchScript ONNX exporter's
    # movedim writes a negative source dim into Transpose's perm, which ONNX rejects
    if x.stride(1) == 1 and c > 1:  # channels innermost
        last = x.dim() - 1
        xp = x.movedim(1, -1)
        if channels_last:
            x2 = xp.reshape(-1, c)
            # (N*P, O): one large GEMM
            y = _linear(x2, w, packed) if _onednn_gemm(x2, w) else torch.mm(x2, w.t())
            return y.view(nb, *spatial, o).movedim(last, 1)
        def blas():
            y = torch.bmm(w.expand(nb, o, c), xp.reshape(nb, -1, c).transpose(1, 2))
            return y.view(nb, o, *spatial)
        if not _onednn_gemm(xp, w):
            return blas()

        def onednn():  # channels innermost, then one transposing copy to NCHW
            y = _linear(xp.reshape(-1, c), w, packed).view(nb, *spatial, o).movedim(last, 1)
            return y.contiguous()

        def swapped():
            # the map as oneDNN's weight operand: (O, N*P) comes out channels-major per
            # image, and one copy of whole P-long rows makes it (N, O, P); a 128-channel
            # 28x28 map at batch 8 here: 0.30 ms against 0.55 with the transposing copy
            y = _linear(w.contiguous(), xp.reshape(-1, c))
            return y.view(o, nb, *spatial).transpose(0, 1).contiguous()
        key = (tuple(x.shape), x.stride(), tuple(w.shape), str(x.dtype))
        return _fastest("einsum-gemm-to-nchw", key,
                        {"swapped": swapped, "onednn": onednn, "blas": blas})()
    xc = x.reshape(nb, c, -1)  # (N, C, P)
    if channels_last:
        last = x.dim() - 1
        xt = xc.transpose(1, 2)  # (N, P, C)

        def onednn():  # oneDNN copies the transposed input first
            return _linear(xt, w, packed).view(nb, *spatial, o).movedim(last, 1)

        def blas():
            y = torch.bmm(xt, w.t().expand(nb, c, o))  # (N, P, O)
            return y.view(nb, *spatial, o).movedim(last, 1)
        if not _onednn_gemm(xt, w):
            return blas()
        key = (tuple(x.shape), x.stride(), tuple(w.shape), str(x.dtype))
        return _fastest("einsum-gemm-to-cl", key, {"onednn": onednn, "blas": blas})()
    return torch.bmm(w.expand(nb, o, c), xc).view(nb, o, *spatial)


def per_channel_conv(x: torch.Tensor, w: torch.Tensor, stride, pads, dilation) -> torch.Tensor:
    """A per-channel (depthwise, one filter per channel) convolution as one multiply-add of
    a strided view per tap. ``x``: (N, C, *spatial); ``w``: (C, 1, *kernel); ``pads``: a
    (left, right) pair per spatial dim. oneDNN's NCHW depthwise kernels for 1-D (kx1)
    filters measured 3-16x slower than this here."""
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
