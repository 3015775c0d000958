"""A residual block's body on kept output tiles, added into the output in place: the sparse
execution of a spatially dynamic block (:class:`convgap.layers.dynamic.DynamicBlock`) in
one C call (``tiles.c``).

The body, batch norms folded into its weights (:class:`Body`): an optional 1x1 conv (C -> R)
with ``act1``, a k x k conv (R -> R, dense or depthwise, stride 1 or more, zero padding k //
2 around the first conv's output) with ``act2``, a 1x1 conv (R -> O) without activation. A
tile (n, ty, tx) is the S x S output pixels from (ty S, tx S) of image n, clipped at the
output's bottom and right edges. The first conv runs once on every input pixel some kept
tile's window reads; the middle and last convs on the kept tiles only, a few tiles per
GEMM call (:data:`GROUP_ROWS`)."""

from __future__ import annotations

import ctypes
from typing import Callable, NamedTuple

import torch

from ...errors import ConvgapError
from ...ops.memo import reuse
from ...ops.sizes import conv_length
from . import common
from .args import TilesArgs
from .common import I, L, P, Kernel, activation_code, check_tensors, pack, padded, round16

__all__ = ["available", "Body", "residual_tiles", "bind", "GROUP_ROWS"]

KERNEL = Kernel("tiles", "tiles_forward", TilesArgs)
# tiles_forward(args, x, y, tiles, T, scratch, threads) also takes the tile rows; the
# scratch all threads share (shared_floats) comes before their own shares
KERNEL.functions.update({"tiles_forward": ([ctypes.POINTER(TilesArgs), P, P, P, I, P, I],
                                           None),
                         "shared_floats": ([ctypes.POINTER(TilesArgs)], L)})
_lib = KERNEL.lib
available = KERNEL.available

GROUP_ROWS = 64  # output pixels per GEMM call of the middle and last convs (whole tiles)


class Body(NamedTuple):
    """A residual block's body, batch norms folded. w1: (R, C) or None (no first conv: the
    middle conv reads x, C = R); b1: (R,) or None; w2: (R, R, k, k) dense or (R, 1, k, k)
    depthwise; b2: (R,) or None; w3: (O, R); b3: (O,) or None; stride: the middle conv's;
    act1, act2: names of :data:`.common.ACTIVATIONS` or None (none)."""

    w1: torch.Tensor | None
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None
    w3: torch.Tensor
    b3: torch.Tensor | None
    stride: int = 1
    act1: str | None = None
    act2: str | None = None

    def depthwise(self) -> bool:
        return self.w2.shape[1] == 1 and self.w2.shape[0] > 1


def _code(act: str | None) -> int:
    return activation_code("none" if act is None else act)


def _check(x: torch.Tensor, out: torch.Tensor, tiles: torch.Tensor, granularity: int,
           body: Body) -> None:
    check_tensors("residual_tiles", x=x, out=out, w1=body.w1, b1=body.b1, w2=body.w2,
                  b2=body.b2, w3=body.w3, b3=body.b3)
    w1, w2, w3 = body.w1, body.w2, body.w3
    if x.dim() != 4 or out.dim() != 4 or w2.dim() != 4 or w3.dim() != 2 or (
            w1 is not None and w1.dim() != 2):
        raise ConvgapError(f"expected x (N, C, H, W), out (N, O, OH, OW), w1 (R, C) or None, "
                           f"w2 (R, R or 1, k, k), w3 (O, R); got {tuple(x.shape)}, "
                           f"{tuple(out.shape)}, {None if w1 is None else tuple(w1.shape)}, "
                           f"{tuple(w2.shape)}, {tuple(w3.shape)}")
    r, k = w2.shape[0], w2.shape[2]
    c = r if w1 is None else w1.shape[1]
    if (x.shape[1] != c or (w1 is not None and w1.shape[0] != r) or w2.shape[3] != k
            or w2.shape[1] not in (1, r) or w3.shape[1] != r):
        raise ConvgapError(f"channel counts disagree: x has {x.shape[1]}, w1 is "
                           f"{None if w1 is None else tuple(w1.shape)}, w2 {tuple(w2.shape)}"
                           f" (square, dense or depthwise), w3 {tuple(w3.shape)}")
    for name, t, size in (("b1", body.b1, r), ("b2", body.b2, r), ("b3", body.b3, w3.shape[0])):
        if t is not None and tuple(t.shape) != (size,):
            raise ConvgapError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    if w1 is None and (body.b1 is not None or body.act1 is not None):
        raise ConvgapError("without a first conv (w1 None) there is no b1 nor act1")
    if granularity < 1 or body.stride < 1:
        raise ConvgapError(f"granularity and stride must be >= 1, got {granularity}, "
                           f"{body.stride}")
    n, _, h, w = x.shape
    oh = conv_length(h, k, body.stride, (k // 2, k // 2), 1)
    ow = conv_length(w, k, body.stride, (k // 2, k // 2), 1)
    if tuple(out.shape) != (n, w3.shape[0], oh, ow):
        raise ConvgapError(f"out must have shape {(n, w3.shape[0], oh, ow)} (the block's "
                           f"output), got {tuple(out.shape)}")
    if not (out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)):
        raise ConvgapError("out is written in place: it must be contiguous or channels_last")
    if tiles.dim() != 2 or tiles.shape[1] != 3 or tiles.dtype.is_floating_point:
        raise ConvgapError(f"tiles must be (T, 3) integers (n, ty, tx), got "
                           f"{tuple(tiles.shape)} {tiles.dtype}")
    if len(tiles):
        grid = torch.tensor([n, -(-oh // granularity), -(-ow // granularity)])
        if bool((tiles < 0).any()) or bool((tiles.cpu() >= grid).any()):
            raise ConvgapError(f"tiles must lie in the (N, rows, columns) = "
                               f"{tuple(grid.tolist())} grid of {granularity} x "
                               f"{granularity} tiles")


def residual_tiles(x: torch.Tensor, out: torch.Tensor, tiles: torch.Tensor,
                   granularity: int, body: Body, store: dict | None = None) -> torch.Tensor:
    """``out[n, :, ty S:(ty + 1) S, tx S:(tx + 1) S] += body(x)[same]`` for each row (n, ty,
    tx) of ``tiles`` (S = ``granularity``), in place; returns ``out``.

    x: (N, C, H, W) float32 on CPU, NCHW or channels_last (without a first conv it is read
    as channels_last: copied if NCHW); out: (N, O, OH, OW), the body's output size, NCHW or
    channels_last (modified in place); tiles: (T, 3) integers; body: a :class:`Body`.
    ``store``: a dict kept by the caller where the packed weights live (rebuilt when a weight
    is a different tensor or was modified in place). Raises ConvgapError on bad shapes,
    dtypes, devices, tiles outside the grid, unknown activations or inputs needing
    gradients; RuntimeError where the kernel is not available (see :func:`available`)."""
    _check(x, out, tiles, granularity, body)
    if _lib() is None:
        raise RuntimeError("convgap's C kernel is not available here (see "
                           "convgap.kernels.cpu.available)")
    bind(x, out, granularity, body, {} if store is None else store)(
        x, out, tiles.to("cpu", torch.int64).contiguous())
    return out


def _prepare(lib, body: Body) -> dict:
    """The kernel's operands by TilesArgs' field names: packed weights (the dense middle
    conv's rows in window order: ky, kx, input channel), depthwise taps (k k x Rp), padded
    biases; None where absent."""
    r, k = body.w2.shape[0], body.w2.shape[2]
    if body.depthwise():
        mid = torch.zeros(k * k, round16(r), dtype=torch.float32)
        mid[:, :r] = body.w2.detach().reshape(r, k * k).t()
    else:
        mid = pack(lib, body.w2.detach().permute(2, 3, 1, 0).reshape(k * k * r, r))
    return {"a": None if body.w1 is None else pack(lib, body.w1.detach().t()),
            "bias1": padded(body.b1), "k": mid, "bias2": padded(body.b2),
            "b": pack(lib, body.w3.detach().t()), "bias": padded(body.b3)}


def bind(x: torch.Tensor, out: torch.Tensor, granularity: int, body: Body, store: dict
         ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """A function ``call(x, out, tiles)`` running the kernel (no checks) on inputs of ``x``'s
    shape and layout (NCHW where ``x`` is contiguous, else channels_last: copied if it is
    not) and outputs of ``out``'s (NCHW where contiguous, else channels_last), the weights
    packed now or reused from ``store`` while each is the same tensor at the same version.
    ``tiles``: (T, 3) int64, contiguous, inside the grid (:func:`residual_tiles` checks)."""
    lib = _lib()
    w2 = body.w2
    r, k = w2.shape[0], w2.shape[2]
    n, c, h, w = x.shape
    o = body.w3.shape[0]
    oh = conv_length(h, k, body.stride, (k // 2, k // 2), 1)
    ow = conv_length(w, k, body.stride, (k // 2, k // 2), 1)
    xnchw = body.w1 is not None and x.is_contiguous()
    ynchw = out.is_contiguous()
    given = tuple(body[:6])
    prepared = reuse(store, "weights", [t for t in given if t is not None],
                     lambda: _prepare(lib, body), tuple(t is not None for t in given))
    args = TilesArgs(**{name: None if t is None else t.data_ptr()
                        for name, t in prepared.items()},
                     n=n, h=h, w=w, c=c, r=r, ks=k, st=body.stride,
                     depthwise=int(body.depthwise()), o=o, oh=oh, ow=ow, s=granularity,
                     group=max(1, round(GROUP_ROWS / granularity ** 2)),
                     act1=_code(body.act1), act2=_code(body.act2), xnchw=int(xnchw),
                     ynchw=int(ynchw))
    shared, per = lib.shared_floats(args), lib.scratch_floats(args)
    forward = lib.tiles_forward
    cl = torch.channels_last

    def call(x: torch.Tensor, out: torch.Tensor, tiles: torch.Tensor) -> None:
        threads = torch.get_num_threads()
        buf = common.scratch(store, shared + threads * per)
        xc = x if xnchw else x.contiguous(memory_format=cl)  # held: a copy outlives the call
        forward(args, xc.data_ptr(), out.data_ptr(), tiles.data_ptr(), len(tiles),
                buf.data_ptr(), threads)
    call.weights = prepared
    call.args = args
    return call
