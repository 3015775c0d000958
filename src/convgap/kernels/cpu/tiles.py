"""A residual block's body on kept output tiles, added into the output in place: the sparse
execution of a spatially dynamic block (:class:`convgap.layers.dynamic.DynamicBlock`) in
one C call (``tiles.c``).

The body, batch norms folded into its weights (:class:`Body`): an optional first conv (C ->
R, k1 x k1 of stride s1 and zero padding k1 // 2: a bottleneck's or inverted residual's 1x1,
a basic block's first 3x3) with ``act1``, a k x k conv (R -> R, dense or depthwise, stride 1
or more, zero padding k // 2 around the first conv's output) with ``act2``, an optional 1x1
conv (R -> O) without activation (absent in a basic block). A tile (n, ty, tx) is the S x S
output pixels from (ty S, tx S) of image n, clipped at the output's bottom and right edges.
Each thread walks its share of the kept tiles (sorted: image, tile row, column) one tile
row at a time, with a window of the first conv's output rows in its cache that slides
down the image: the first conv runs once per thread on every pixel some kept tile's
window reads, the middle and last convs on the kept tiles only, a few tiles per GEMM
call (:data:`GROUP_ROWS`)."""

from __future__ import annotations

import ctypes
from typing import Callable, NamedTuple

import torch

from ...errors import ConvgapError
from ...ops.memo import reuse
from ...ops.sizes import conv_length
from . import common
from .args import TilesArgs
from .common import I, P, Kernel, activation_code, check_tensors, pack, padded, round16

__all__ = ["available", "Body", "residual_tiles", "bind", "GROUP_ROWS"]

KERNEL = Kernel("tiles", "tiles_forward", TilesArgs)
# tiles_forward(args, x, y, mask, masker weight, masker bias, tiles, scratch, threads)
# returns the kept tiles' count
KERNEL.functions.update({"tiles_forward": ([ctypes.POINTER(TilesArgs), P, P, P, P, P, P, P,
                                            I], I)})
_lib = KERNEL.lib
available = KERNEL.available

GROUP_ROWS = 64  # output pixels per GEMM call of the middle and last convs (whole tiles)


class Body(NamedTuple):
    """A residual block's body, batch norms folded. w1: (R, C) (1x1), (R, C, k1, k1) or None
    (no first conv: the middle conv reads x, C = R); b1: (R,) or None; w2: (R, R, k, k)
    dense or (R, 1, k, k) depthwise; b2: (R,) or None; w3: (O, R) or None (no last conv: O =
    R); b3: (O,) or None; stride: the middle conv's; act1, act2: names of
    :data:`.common.ACTIVATIONS` or None (none); stride1: the first conv's."""

    w1: torch.Tensor | None
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None
    w3: torch.Tensor
    b3: torch.Tensor | None
    stride: int = 1
    act1: str | None = None
    act2: str | None = None
    stride1: int = 1

    def depthwise(self) -> bool:
        return self.w2.shape[1] == 1 and self.w2.shape[0] > 1

    def k1(self) -> int:
        """The first conv's side (1 without one)."""
        return 1 if self.w1 is None or self.w1.dim() == 2 else self.w1.shape[2]

    def windowed(self) -> bool:
        """Whether the first conv reads windows of x (k x k or strided): x read NHWC."""
        return self.w1 is not None and (self.k1() > 1 or self.stride1 > 1)

    def out_channels(self) -> int:
        return self.w2.shape[0] if self.w3 is None else self.w3.shape[0]

    def sizes(self, hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(the middle conv's input's, the output's) (height, width) for an input of ``hw``."""
        k1, k = self.k1(), self.w2.shape[2]
        mid = tuple(conv_length(d, k1, self.stride1, (k1 // 2, k1 // 2), 1) for d in hw)
        return mid, tuple(conv_length(d, k, self.stride, (k // 2, k // 2), 1) for d in mid)


def _code(act: str | None) -> int:
    return activation_code("none" if act is None else act)


def _check(x: torch.Tensor, out: torch.Tensor, tiles: torch.Tensor, granularity: int,
           body: Body) -> None:
    check_tensors("residual_tiles", x=x, out=out, w1=body.w1, b1=body.b1, w2=body.w2,
                  b2=body.b2, w3=body.w3, b3=body.b3)
    w1, w2, w3 = body.w1, body.w2, body.w3
    shape = (lambda t: None if t is None else tuple(t.shape))
    if x.dim() != 4 or out.dim() != 4 or w2.dim() != 4 or (w3 is not None and w3.dim() != 2) or (
            w1 is not None and (w1.dim() not in (2, 4) or (w1.dim() == 4 and (
                w1.shape[2] != w1.shape[3] or w1.shape[2] % 2 == 0)))):
        raise ConvgapError(f"expected x (N, C, H, W), out (N, O, OH, OW), w1 (R, C), (R, C, "
                           f"k1, k1) with k1 odd or None, w2 (R, R or 1, k, k), w3 (O, R) or "
                           f"None; got {tuple(x.shape)}, {tuple(out.shape)}, {shape(w1)}, "
                           f"{tuple(w2.shape)}, {shape(w3)}")
    r, k = w2.shape[0], w2.shape[2]
    c = r if w1 is None else w1.shape[1]
    if (x.shape[1] != c or (w1 is not None and w1.shape[0] != r) or w2.shape[3] != k
            or w2.shape[1] not in (1, r) or (w3 is not None and w3.shape[1] != r)):
        raise ConvgapError(f"channel counts disagree: x has {x.shape[1]}, w1 is {shape(w1)}, "
                           f"w2 {tuple(w2.shape)} (square, dense or depthwise), w3 "
                           f"{shape(w3)}")
    if w3 is None and body.b3 is not None:
        raise ConvgapError("without a last conv (w3 None) there is no b3")
    o = body.out_channels()
    for name, t, size in (("b1", body.b1, r), ("b2", body.b2, r), ("b3", body.b3, o)):
        if t is not None and tuple(t.shape) != (size,):
            raise ConvgapError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    if w1 is None and (body.b1 is not None or body.act1 is not None):
        raise ConvgapError("without a first conv (w1 None) there is no b1 nor act1")
    if granularity < 1 or body.stride < 1 or body.stride1 < 1:
        raise ConvgapError(f"granularity and strides must be >= 1, got {granularity}, "
                           f"{body.stride}, {body.stride1}")
    n = x.shape[0]
    _, (oh, ow) = body.sizes(tuple(x.shape[-2:]))
    if tuple(out.shape) != (n, o, oh, ow):
        raise ConvgapError(f"out must have shape {(n, o, oh, ow)} (the block's output), got "
                           f"{tuple(out.shape)}")
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
    """``out[n, :, ty S:(ty + 1) S, tx S:(tx + 1) S] += body(x)[same]`` for each tile (n, ty,
    tx) among the rows of ``tiles`` (S = ``granularity``; a tile listed twice is added
    once), in place; returns ``out``.

    x: (N, C, H, W) float32 on CPU, NCHW or channels_last (read as channels_last, copied if
    NCHW, without a first conv or with a k x k or strided one); out: (N, O, OH, OW), the
    body's output size, NCHW or channels_last (modified in place); tiles: (T, 3) integers,
    in any order; body: a :class:`Body`.
    ``store``: a dict kept by the caller where the packed weights live (rebuilt when a weight
    is a different tensor or was modified in place). Raises ConvgapError on bad shapes,
    dtypes, devices, tiles outside the grid, unknown activations or inputs needing
    gradients; RuntimeError where the kernel is not available (see :func:`available`)."""
    _check(x, out, tiles, granularity, body)
    if _lib() is None:
        raise RuntimeError("convgap's C kernel is not available here (see "
                           "convgap.kernels.cpu.available)")
    n = x.shape[0]
    _, (oh, ow) = body.sizes(tuple(x.shape[-2:]))
    mask = torch.zeros(n, -(-oh // granularity), -(-ow // granularity))
    if len(tiles):
        mask[tuple(tiles.to("cpu", torch.int64).t())] = 1.0
    bind(x, out, granularity, body, {} if store is None else store)(x, out, mask)
    return out


def _prepare(lib, body: Body) -> dict:
    """The kernel's operands by TilesArgs' field names: packed weights (the dense middle
    conv's rows in window order: ky, kx, input channel), depthwise taps (k k x Rp), padded
    biases; None where absent."""
    r, k = body.w2.shape[0], body.w2.shape[2]
    w1 = body.w1
    if w1 is not None:   # rows in window order (ky, kx, input channel), like the middle's
        w1 = w1.detach()
        w1 = w1.t() if w1.dim() == 2 else w1.permute(2, 3, 1, 0).reshape(-1, r)
    if body.depthwise():
        mid = torch.zeros(k * k, round16(r), dtype=torch.float32)
        mid[:, :r] = body.w2.detach().reshape(r, k * k).t()
    else:
        mid = pack(lib, body.w2.detach().permute(2, 3, 1, 0).reshape(k * k * r, r))
    return {"a": None if w1 is None else pack(lib, w1),
            "bias1": padded(body.b1), "k": mid, "bias2": padded(body.b2),
            "b": None if body.w3 is None else pack(lib, body.w3.detach().t()),
            "bias": padded(body.b3)}


def bind(x: torch.Tensor, out: torch.Tensor, granularity: int, body: Body, store: dict
         ) -> Callable[..., int]:
    """A function ``call(x, out, mask, masker=None)`` running the kernel (no checks) on
    inputs of ``x``'s shape and layout (NCHW where ``x`` is contiguous, else channels_last:
    copied if it is not) and outputs of ``out``'s (NCHW where contiguous, else
    channels_last), the weights packed now or reused from ``store`` while each is the same
    tensor at the same version; it returns the kept tiles' count. ``mask``: (N, gh, gw)
    float32, contiguous (gh, gw: the output's rows and columns of tiles), > 0 where a tile
    is kept; with ``masker`` = (weight, bias), a spatial masker's 1x1 conv ((1, C, 1, 1)
    and (1,), contiguous), its eval decisions on ``x`` are written into ``mask`` first (1
    where the keep logit from x average-pooled to the grid is > 0, else 0)."""
    lib = _lib()
    w2 = body.w2
    r, k = w2.shape[0], w2.shape[2]
    n, c, xh, xw = x.shape
    o = body.out_channels()
    (h, w), (oh, ow) = body.sizes((xh, xw))
    xnchw = body.w1 is not None and not body.windowed() and x.is_contiguous()
    ynchw = out.is_contiguous()
    given = tuple(body[:6])
    prepared = reuse(store, "weights", [t for t in given if t is not None],
                     lambda: _prepare(lib, body), tuple(t is not None for t in given))
    args = TilesArgs(**{name: None if t is None else t.data_ptr()
                        for name, t in prepared.items()},
                     n=n, h=h, w=w, c=c, xh=xh, xw=xw, k1=body.k1(), st1=body.stride1,
                     r=r, ks=k, st=body.stride,
                     depthwise=int(body.depthwise()), o=o, oh=oh, ow=ow, s=granularity,
                     group=max(1, round(GROUP_ROWS / granularity ** 2)),
                     act1=_code(body.act1), act2=_code(body.act2), xnchw=int(xnchw),
                     ynchw=int(ynchw))
    per = lib.scratch_floats(args)
    forward = lib.tiles_forward
    cl = torch.channels_last
    tiles = torch.empty(3 * n * -(-oh // granularity) * -(-ow // granularity),
                        dtype=torch.int64)   # the kept tiles, for the kernel

    def call(x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor,
             masker: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
        threads = torch.get_num_threads()
        buf = common.scratch(store, threads * per)
        xc = x if xnchw else x.contiguous(memory_format=cl)  # held: a copy outlives the call
        return forward(args, xc.data_ptr(), out.data_ptr(), mask.data_ptr(),
                       None if masker is None else masker[0].data_ptr(),
                       None if masker is None else masker[1].data_ptr(), tiles.data_ptr(),
                       buf.data_ptr(), threads)
    call.weights = prepared
    call.args = args
    return call
