"""A network's stem and the block after it in one pass (C kernel ``stem.c``).

``y = conv1x1(act2(dw(act1(conv(x, w1) + b1), w2) + b2), w3) + b3``: a k1 x k1 conv of
stride s1 from a few channels (an image's) to R, a depthwise k x k conv at stride 1,
optionally a squeeze-excitation (:class:`~.pdp.Squeeze`), a 1x1 conv to O; batch norms
folded. MobileNetV2's stem and first inverted residual (no expansion, no residual) are
this, and EfficientNet's stem and first MBConv: run layer by layer, the stem's output (R
channels at half
the image's side) goes to memory and back and the stem runs as a GEMM with 27-long dot
products; here each thread keeps a sliding window of the stem's rows in its cache. Float32,
CPU, inference. The output is channels_last; x is read in place through its strides."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ...errors import ConvgapError
from ...ops.memo import reuse
from ...ops.sizes import conv_length
from . import common
from .args import StemArgs
from .common import Kernel, activation_code, check_tensors, output_strides, padded, round16
from .pdp import Squeeze

__all__ = ["available", "StemBody", "supports", "stem_block", "bind", "MAX_CHANNELS"]

KERNEL = Kernel("stem", "stem_forward", StemArgs)
for _fn in ("packed_floats", "pack_b"):   # stem.c packs nothing: no GEMM core
    KERNEL.functions.pop(_fn)
_lib = KERNEL.lib
available = KERNEL.available

MAX_CHANNELS = 64   # R: the stem's channels, held in at most four vectors a pixel
MAX_SIDE = 15       # the depthwise filter's side (the window's row pointers)
TH = 8              # output rows per band (measured: 8 beat 4 and 16 at 112 x 112)


class StemBody(NamedTuple):
    """The stem and the block after it, batch norms folded. w1: (R, C, k1, k1), b1: (R,),
    w2: (R, 1, k, k) depthwise, b2: (R,), w3: (O, R) (the 1x1), b3: (O,); stride1: the
    stem's stride (paddings are k1 // 2 and k // 2, the depthwise stride 1); act1, act2:
    names of :data:`.common.ACTIVATIONS` (None: none); squeeze: a squeeze-excitation
    between the depthwise step and the 1x1, or None."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor
    stride1: int = 2
    act1: str | None = None
    act2: str | None = None
    squeeze: Squeeze | None = None

    def out_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The output's (height, width) for an input of ``hw``."""
        k1 = self.w1.shape[-1]
        return tuple(conv_length(d, k1, self.stride1, (k1 // 2, k1 // 2), 1) for d in hw)


def supports(body: StemBody) -> str | None:
    """None where the kernel runs ``body``'s shapes, else why not."""
    w1, w2, w3 = body.w1, body.w2, body.w3
    if w1.dim() != 4 or w2.dim() != 4 or w3.dim() != 2:
        return (f"expected w1 (R, C, k1, k1), w2 (R, 1, k, k), w3 (O, R); got "
                f"{tuple(w1.shape)}, {tuple(w2.shape)}, {tuple(w3.shape)}")
    r, k1, k = w1.shape[0], w1.shape[-1], w2.shape[-1]
    if w1.shape[2] != k1 or k1 % 2 == 0 or w2.shape[2] != k or k % 2 == 0 or k > MAX_SIDE:
        return (f"the filters must be square and odd-sided (depthwise at most {MAX_SIDE}); "
                f"got {tuple(w1.shape[2:])} and {tuple(w2.shape[2:])}")
    if tuple(w2.shape[:2]) != (r, 1) or w3.shape[1] != r:
        return (f"channel counts disagree: the stem makes {r}, the depthwise filter is "
                f"{tuple(w2.shape)}, the 1x1 {tuple(w3.shape)}")
    if r > MAX_CHANNELS:
        return f"the stem has {r} channels; the kernel holds at most {MAX_CHANNELS}"
    if body.stride1 < 1:
        return f"the stem's stride must be >= 1, got {body.stride1}"
    for name, t, size in (("b1", body.b1, r), ("b2", body.b2, r), ("b3", body.b3, w3.shape[0])):
        if t is None or tuple(t.shape) != (size,):
            return f"{name} must have shape ({size},)"
    sq = body.squeeze
    if sq is not None:
        s = sq.reduce.shape[0]
        if (sq.reduce.dim() != 2 or tuple(sq.reduce.shape) != (s, r)
                or tuple(sq.expand.shape) != (r, s) or tuple(sq.reduce_bias.shape) != (s,)
                or tuple(sq.expand_bias.shape) != (r,)):
            return (f"the squeeze-excitation must be reduce ({r} -> S), expand (S -> {r}) with "
                    f"their biases; got {tuple(sq.reduce.shape)}, {tuple(sq.expand.shape)}")
    acts = (body.act1, body.act2) + (() if sq is None else (sq.act, sq.gate))
    for act in acts:
        if act is not None and act not in common.ACTIVATIONS:
            return f"unknown activation {act!r}"
    return None


def _prepare(body: StemBody) -> dict:
    """The kernel's operands by StemArgs' field names, R padded to Rp (zeros) and O to Op."""
    r, c, k1 = body.w1.shape[0], body.w1.shape[1], body.w1.shape[-1]
    k, o = body.w2.shape[-1], body.w3.shape[0]
    rp, op = round16(r), round16(o)
    a = torch.zeros(c * k1 * k1, rp)
    a[:, :r] = body.w1.detach().permute(1, 2, 3, 0).reshape(c * k1 * k1, r)
    d = torch.zeros(k * k, rp)
    d[:, :r] = body.w2.detach().reshape(r, k * k).t()
    b = torch.zeros(r, op)
    b[:, :o] = body.w3.detach().t()
    se = dict.fromkeys(("wr", "br", "wu", "bu"))
    sq = body.squeeze
    if sq is not None:
        wr, wu = torch.zeros(sq.reduce.shape[0], rp), torch.zeros(sq.reduce.shape[0], rp)
        wr[:, :r] = sq.reduce.detach()
        wu[:, :r] = sq.expand.detach().t()
        se = {"wr": wr, "br": padded(sq.reduce_bias), "wu": wu, "bu": padded(sq.expand_bias)}
    return {"a": a, "bias1": padded(body.b1), "d": d, "bias2": padded(body.b2), "b": b,
            "bias": padded(body.b3), **se}


def _code(act: str | None) -> int:
    return activation_code("none" if act is None else act)


def bind(x: torch.Tensor, body: StemBody, store: dict
         ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A call running the kernel (no checks) on inputs of ``x``'s shape and strides, into a
    new channels_last output; the weights prepared now or reused from ``store`` while each
    is the same tensor at the same version."""
    lib = _lib()
    n, c, h, w = x.shape
    r, o = body.w1.shape[0], body.w3.shape[0]
    oh, ow = body.out_size((h, w))
    sq = body.squeeze
    given = [body.w1, body.b1, body.w2, body.b2, body.w3, body.b3] + (
        [] if sq is None else [sq.reduce, sq.reduce_bias, sq.expand, sq.expand_bias])
    prepared = reuse(store, "weights", given, lambda: _prepare(body), (sq is None,))
    sn, sc, sh, sw = x.stride()
    args = StemArgs(**{name: None if t is None else t.data_ptr()
                       for name, t in prepared.items()},
                    n=n, h=h, w=w, c=c, xsn=sn, xsc=sc, xsh=sh, xsw=sw, r=r,
                    k1=body.w1.shape[-1], st1=body.stride1, k=body.w2.shape[-1], o=o,
                    oh=oh, ow=ow, th=TH, act1=_code(body.act1), act2=_code(body.act2),
                    se=0 if sq is None else sq.reduce.shape[0],
                    se_act=0 if sq is None else _code(sq.act),
                    gate=0 if sq is None else _code(sq.gate))
    per = lib.scratch_floats(args)
    forward = lib.stem_forward
    shape, strides = (n, o, oh, ow), output_strides((n, o, oh, ow), True)

    def call(x: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        buf = common.scratch(store, threads * per)
        y = torch.empty_strided(shape, strides, dtype=torch.float32)
        forward(args, x.data_ptr(), y.data_ptr(), buf.data_ptr(), threads)
        return y
    call.weights = prepared
    call.args = args
    return call


def stem_block(x: torch.Tensor, body: StemBody, store: dict | None = None) -> torch.Tensor:
    """The stem and the block after it on ``x`` (N, C, H, W) float32 CPU, any strides; the
    result (N, O, OH, OW) channels_last. Raises ConvgapError on shapes the kernel does not
    run (:func:`supports`), other dtypes or devices, inputs needing gradients;
    RuntimeError where the kernel is not available (:func:`available`)."""
    sq = body.squeeze
    check_tensors("stem_block", x=x, w1=body.w1, b1=body.b1, w2=body.w2, b2=body.b2,
                  w3=body.w3, b3=body.b3, **({} if sq is None else dict(
                      reduce=sq.reduce, reduce_bias=sq.reduce_bias, expand=sq.expand,
                      expand_bias=sq.expand_bias)))
    why = supports(body)
    if why is None and (x.dim() != 4 or x.shape[1] != body.w1.shape[1]):
        why = f"x must be (N, {body.w1.shape[1]}, H, W), got {tuple(x.shape)}"
    if why is not None:
        raise ConvgapError(f"stem_block: {why}")
    if _lib() is None:
        raise RuntimeError("convgap's C kernel is not available here (see "
                           "convgap.kernels.cpu.available)")
    return bind(x, body, {} if store is None else store)(x)
