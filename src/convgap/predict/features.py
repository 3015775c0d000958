"""What an operator's latency is predicted from: its kind, its work and its shape.

Each recorded :class:`~convgap.predict.record.Op` falls in one :data:`KINDS`:

- ``'conv'``: convolutions (any groups, either layout, transposed too), described by the
  input and weight shapes, stride, padding, dilation, groups and layout;
- ``'matmul'``: GEMMs (``addmm``, ``mm``, ``bmm``, ``linear``), by M, N, K and batch;
- ``'memory'``: every other operator that reads or writes tensors (element-wise,
  normalization, pooling, reductions, copies), by the bytes it moves, its elements, its
  layout and which operator it is;
- ``'call'``: operators that move no data (views, transposes, ``empty``): a call's cost only;
- ``'unit'``: a convgap module run as one call (:mod:`convgap.predict.units`: a fused
  block, a sparse dynamic block), by its type, its reference operators' work, its input and
  output, its density, granularity and work share;
- ``'plan_conv'``, ``'plan_matmul'``, ``'plan_memory'``: the primitives of a whole-network
  oneDNN plan (:mod:`convgap.predict.plan`: another oneDNN than torch's, no dispatch
  between them), as a convolution (and its post-ops), a GEMM, or by the bytes a pooling,
  binary, eltwise, concat or reorder moves.

:func:`work` gives an operator's FLOPs and minimum bytes (inputs + outputs once), from
which :func:`baseline` makes its roofline latency plus one call's overhead; the calibrated
models (:mod:`convgap.predict.calibration`) learn each kind's measured latency as a factor
of that baseline, from :func:`features`.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..hardware import Roofs
from .record import Op, TensorSpec
from .plan import PLAN_PREFIX
from .units import UNIT_TYPES

__all__ = ["KINDS", "kind", "work", "baseline", "context", "features", "FEATURES",
           "CONTEXT", "MEMORY_OPS", "PLAN_MEMORY_OPS"]

KINDS = ("conv", "matmul", "memory", "call", "unit", "plan_conv", "plan_matmul",
         "plan_memory")

_CONV = {"aten.convolution.default", "aten._convolution.default",
         "mkldnn._convolution_pointwise.default", "mkldnn._convolution_pointwise.binary",
         "aten.mkldnn_convolution.default"}
_MATMUL = {"aten.addmm.default", "aten.mm.default", "aten.bmm.default", "aten.linear.default",
           "aten.baddbmm.default", "mkldnn._linear_pointwise.default"}
# operators that only make views or allocate: no data moves
_CALL = {"view", "_unsafe_view", "t", "permute", "transpose", "expand", "as_strided",
         "squeeze", "unsqueeze", "detach", "alias", "slice", "select", "empty",
         "empty_strided", "empty_like", "split", "split_with_sizes", "unbind", "chunk",
         "flatten", "reshape", "lift_fresh", "_reshape_alias", "new_empty", "unfold"}
# the memory-bound operators calibration samples, each its own category (others: 'other')
MEMORY_OPS = ("native_batch_norm", "_native_batch_norm_legit_no_training",
              "native_layer_norm", "relu", "relu_", "hardtanh", "hardtanh_", "silu", "silu_",
              "gelu", "sigmoid", "hardswish", "hardsigmoid", "add", "add_", "mul", "mul_",
              "max_pool2d_with_indices", "avg_pool2d", "mean", "_adaptive_avg_pool2d",
              "clone", "_to_copy", "copy_", "cat", "clamp", "div", "sub", "other")

# a plan's memory-bound primitives (:class:`~convgap.kernels.cpu.plan.SketchStep`'s op)
PLAN_MEMORY_OPS = ("reorder", "pooling_max", "pooling_avg", "pooling_global", "binary_add",
                   "binary_mul", "eltwise", "concat", "other")

# where an op sits in its network (:func:`context`), bytes: the bytes-weighted mean and the
# largest log reuse distance of its inputs (capped at REUSE_CAP), the bytes of its inputs
# no op of the pass made (weights, the model's input: last touched a whole pass ago)
CONTEXT = ("log_reuse", "log_reuse_max", "log_cold_bytes")
# reuse distances beyond any cache read the same: past this, an input comes from memory
# (and a network's size alone would let a fit tell calibration networks apart)
REUSE_CAP = 2.0 ** 28
# a plan's convolution: its post-ops and residual add, its activations' codes (SiLU's
# exponential costs more than a ReLU: efficientnet_b0's convs read 0.7x without them), and
# where its work falls: FLOPs per byte, output pixels, FLOPs per output pixel
PLAN_CONV = ("post_ops", "add", "act", "act_after", "log_intensity", "log_pixels",
             "log_flops_per_pixel")
_CONV_SHAPE = ("n", "c", "h", "w", "o", "kh", "kw", "sh", "sw", "groups", "oh", "ow",
               "cin_group", "cout_group", "channels_last", "transposed", "log_flops",
               "log_bytes", "log_weight_bytes")
FEATURES = {
    "conv": _CONV_SHAPE + CONTEXT,
    "matmul": ("m", "n", "k", "batch", "log_flops", "log_bytes") + CONTEXT,
    "memory": ("op", "log_bytes", "log_numel", "inputs", "channels_last", "inner",
               "log_kernel") + CONTEXT,
    "call": (),
    "plan_conv": _CONV_SHAPE + CONTEXT + PLAN_CONV,
    "plan_matmul": ("m", "n", "k", "batch", "log_flops", "log_bytes") + CONTEXT + ("act",),
    "plan_memory": ("op", "log_bytes", "log_numel", "inputs", "channels_last", "inner",
                    "log_kernel") + CONTEXT + ("act",),
    "unit": ("type", "log_flops", "log_ref_bytes", "ref_ops", "density", "granularity",
             "work_share", "pointwise_share", "log_bytes", "n", "c", "h", "w", "o", "oh",
             "ow", "channels_last") + CONTEXT,
}


def _short(op: Op) -> str:
    """'aten.relu_.default' -> 'relu_'"""
    parts = op.name.split(".")
    return parts[1] if len(parts) > 1 else op.name


def kind(op: Op) -> str:
    """The op's kind, one of :data:`KINDS`."""
    if op.unit:
        return "unit"
    if op.name.startswith(PLAN_PREFIX):
        return {"plan.convolution": "plan_conv",
                "plan.inner_product": "plan_matmul"}.get(op.name, "plan_memory")
    if op.name in _CONV:
        return "conv"
    if op.name in _MATMUL:
        return "matmul"
    if _short(op) in _CALL or (not op.inputs and not op.outputs):
        return "call"
    return "memory"


def _conv_parts(op: Op) -> dict:
    """The convolution's input, weight and geometry from its arguments (aten.convolution:
    input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)."""
    (args, kwargs) = op.args()
    x, w = args[0], args[1]
    if op.name.startswith("mkldnn._convolution_pointwise"):
        # (x, [other,] weight, bias, padding, stride, dilation, groups, ...)
        w = args[2] if op.name.endswith("binary") else args[1]
        rest = args[4:] if op.name.endswith("binary") else args[3:]
        padding, stride, dilation, groups = rest[0], rest[1], rest[2], rest[3]
        transposed = False
    else:
        stride, padding, dilation = args[3], args[4], args[5]
        transposed, groups = bool(args[6]), args[8]
    return {"x": x, "w": w, "stride": list(stride), "padding": list(padding),
            "dilation": list(dilation), "transposed": transposed, "groups": int(groups)}


def _matmul_mnk(op: Op) -> tuple[int, int, int, int]:
    """(batch, M, N, K) of a GEMM operator."""
    t = op.inputs
    name = _short(op)
    if name == "inner_product":        # a plan's: (N, C[, H, W]) by (O, C*H*W)
        return 1, t[0].shape[0], t[1].shape[0], math.prod(t[0].shape[1:])
    if name in ("addmm", "baddbmm"):   # (bias, a, b)
        a, b = t[1], t[2]
    elif name in ("linear", "_linear_pointwise"):
        a, w = t[0], t[1]
        m = math.prod(a.shape[:-1])
        # oneDNN's packed weight is not (N, K): N comes from the output
        n = op.outputs[0].shape[-1] if op.outputs else w.shape[0]
        return 1, m, n, a.shape[-1]
    else:
        a, b = t[0], t[1]
    batch = a.shape[0] if len(a.shape) == 3 else 1
    return batch, a.shape[-2], b.shape[-1], a.shape[-1]


def work(op: Op) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of the op: FLOPs = 2 x MACs of a conv or GEMM (a unit: its
    reference ops' times its work share), 0 otherwise; bytes = its tensor inputs and outputs,
    each once."""
    nbytes = float(sum(t.nbytes for t in op.inputs) + sum(t.nbytes for t in op.outputs))
    k = kind(op)
    if k == "unit":
        return op.detail[0] * op.detail[5], nbytes
    if k in ("conv", "plan_conv"):
        p = _conv_parts(op)
        w: TensorSpec = p["w"]
        # an output element meets C_in/groups x k x k weights; transposed (weight (C_in,
        # C_out/groups, k, k)), an input element meets C_out/groups x k x k
        macs = (p["x"] if p["transposed"] else op.outputs[0]).numel * math.prod(w.shape[1:])
        return 2.0 * macs, nbytes
    if k in ("matmul", "plan_matmul"):
        b, m, n, kk = _matmul_mnk(op)
        return 2.0 * b * m * n * kk, nbytes
    if k == "call":
        return 0.0, 0.0
    return 0.0, nbytes


def baseline(op: Op, roofs: Roofs, overhead_s: float) -> float:
    """The op's roofline latency (seconds) plus one call's overhead: what the calibrated
    model scales."""
    flops, nbytes = work(op)
    return overhead_s + max(flops / roofs.peak_flops, nbytes / roofs.bandwidth)


def _log(v: float) -> float:
    return math.log(max(v, 1.0))


def context(ops: Sequence[Op]) -> list[tuple[float, ...]]:
    """Each op's place in the pass (:data:`CONTEXT`), from the tensors it reads
    (:attr:`Op.reads`): an input's reuse distance is the bytes (:func:`work`) the ops
    between its last touch and this op moved, at most :data:`REUSE_CAP`; an input no op of
    the pass wrote (a weight, the model's input) was last touched one pass ago (the bytes
    the whole pass moves), as in a model served call after call."""
    moved = [work(op)[1] for op in ops]
    pass_bytes = sum(moved)
    last: dict[int, float] = {}
    done = 0.0
    out = []
    for op, nbytes in zip(ops, moved):
        weighted = size = cold = 0.0
        far = 1.0
        for t, tid in zip(op.inputs, op.reads):
            seen = last.get(tid)
            dist = min(REUSE_CAP, pass_bytes if seen is None else done - seen)
            if seen is None:
                cold += t.nbytes
            weighted += t.nbytes * _log(dist)
            size += t.nbytes
            far = max(far, dist)
        out.append((weighted / size if size else 0.0, _log(far), _log(cold)))
        done += nbytes
        for tid in op.reads + op.writes:
            last[tid] = done
    return out


def pointwise_share(op: Op) -> float:
    """The share of a unit's reference convolution FLOPs in 1x1 convolutions: a kernel
    path runs a 1x1 as a GEMM on rows and a kxk conv another way (the spatial torch path
    gathers kxk windows: ConvFirst's blocks, nearly all 1x1 work, ran at a third of what a
    bottleneck's rate predicted for them)."""
    total = pointwise = 0.0
    for r in op.inner:
        if kind(r) == "conv":
            f = work(r)[0]
            total += f
            if tuple(_conv_parts(r)["w"].shape[2:]) == (1, 1):
                pointwise += f
    return pointwise / total if total else 0.0


def _plan_conv(op: Op, flops: float, nbytes: float) -> tuple[float, ...]:
    """:data:`PLAN_CONV` of a plan's convolution op."""
    out = op.outputs[0]
    pixels = out.shape[0] * out.shape[2] * out.shape[3]
    return (op.detail[0], op.detail[1], op.detail[3], op.detail[4],
            math.log(max(flops, 1.0) / max(nbytes, 1.0)), _log(pixels),
            _log(flops / max(pixels, 1)))


def features(op: Op, where: tuple[float, ...]) -> tuple[float, ...]:
    """The op's feature vector, in the order of :data:`FEATURES` for its kind; ``where``:
    its :func:`context` entry."""
    k = kind(op)
    flops, nbytes = work(op)
    if k in ("conv", "plan_conv"):
        p = _conv_parts(op)
        x, w, out = p["x"], p["w"], op.outputs[0]
        g = p["groups"]
        return (x.shape[0], x.shape[1], x.shape[2], x.shape[3], out.shape[1], w.shape[2],
                w.shape[3], p["stride"][0], p["stride"][1], g, out.shape[2], out.shape[3],
                x.shape[1] // g, out.shape[1] // g, float(x.channels_last),
                float(p["transposed"]), _log(flops), _log(nbytes), _log(w.nbytes)) + where \
            + (_plan_conv(op, flops, nbytes) if k == "plan_conv" else ())
    if k in ("matmul", "plan_matmul"):
        b, m, n, kk = _matmul_mnk(op)
        return (m, n, kk, b, _log(flops), _log(nbytes)) + where \
            + ((op.detail[3],) if k == "plan_matmul" else ())
    if k == "unit":
        ref_flops, ref_bytes, ref_ops, density, granularity, share = op.detail
        x, out = op.inputs[0], op.outputs[0]
        x4 = tuple(x.shape) + (1,) * (4 - len(x.shape))
        o4 = tuple(out.shape) + (1,) * (4 - len(out.shape))
        return (UNIT_TYPES.index(_short(op)), _log(ref_flops), _log(ref_bytes), ref_ops,
                density, granularity, share, pointwise_share(op), _log(nbytes), x4[0],
                x4[1], x4[2], x4[3], o4[1], o4[2], o4[3], float(x.channels_last)) + where
    if k == "plan_memory":
        name = op.name.removeprefix(PLAN_PREFIX)
        code = PLAN_MEMORY_OPS.index(name if name in PLAN_MEMORY_OPS else "other")
        big = max(op.inputs + list(op.outputs), key=lambda t: t.numel)
        return (code, _log(nbytes), _log(big.numel), len(op.inputs), float(big.channels_last),
                big.shape[-1], _log(op.detail[2])) + where + (op.detail[3],)
    if k == "memory":
        name = _short(op)
        code = MEMORY_OPS.index(name) if name in MEMORY_OPS else MEMORY_OPS.index("other")
        big = max(op.inputs + list(op.outputs), key=lambda t: t.numel, default=None)
        numel = big.numel if big is not None else 0
        inner = big.shape[-1] if big is not None and big.shape else 1
        kernel = 1
        if name in ("max_pool2d_with_indices", "avg_pool2d"):
            args, _ = op.args()
            kernel = math.prod(args[1]) if isinstance(args[1], (list, tuple)) else args[1] ** 2
        return (code, _log(nbytes), _log(numel), len(op.inputs),
                float(big is not None and big.channels_last), inner, _log(kernel)) + where
    return ()
