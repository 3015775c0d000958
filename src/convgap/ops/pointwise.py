"""A weight applied at every position of a feature map (a 1x1 convolution) as GEMMs."""

from __future__ import annotations

import torch

from .measured import fastest
from .onednn import linear, usable

__all__ = ["pointwise"]


def pointwise(x: torch.Tensor, w: torch.Tensor, g: int, channels_last: bool,
              packed: dict | None = None) -> torch.Tensor:
    """``w`` ((G, O, C), or (O, C) when G = 1) applied to ``x`` (N, G*C, *spatial) at every
    position: (N, G*O, *spatial). Without groups this is one GEMM whose operands are read
    in the layout they have (a transposed operand costs BLAS nothing; torch.matmul would
    fold a transposed batch into rows by copying it, so bmm is explicit) and whose result
    is written channels innermost when ``channels_last`` (the layout the next convolution
    step runs fastest in) or channels-major otherwise; on oneDNN where
    :func:`~.onednn.usable` (``packed``: the caller's store for the packed weight), a
    measured choice where a layout copy is involved. With groups, a batched GEMM over
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
            y = linear(x2, w, packed) if usable(x2, w) else torch.mm(x2, w.t())
            return y.view(nb, *spatial, o).movedim(last, 1)
        def blas():
            y = torch.bmm(w.expand(nb, o, c), xp.reshape(nb, -1, c).transpose(1, 2))
            return y.view(nb, o, *spatial)
        if not usable(xp, w):
            return blas()

        def onednn():  # channels innermost, then one transposing copy to NCHW
            y = linear(xp.reshape(-1, c), w, packed).view(nb, *spatial, o).movedim(last, 1)
            return y.contiguous()

        def swapped():
            # the map as oneDNN's weight operand: (O, N*P) comes out channels-major per
            # image, and one copy of whole P-long rows makes it (N, O, P); a 128-channel
            # 28x28 map at batch 8 here: 0.30 ms against 0.55 with the transposing copy
            y = linear(w.contiguous(), xp.reshape(-1, c))
            return y.view(o, nb, *spatial).transpose(0, 1).contiguous()
        key = (tuple(x.shape), x.stride(), tuple(w.shape), str(x.dtype))
        return fastest("einsum-gemm-to-nchw", key,
                       {"swapped": swapped, "onednn": onednn, "blas": blas})()
    xc = x.reshape(nb, c, -1)  # (N, C, P)
    if channels_last:
        last = x.dim() - 1
        xt = xc.transpose(1, 2)  # (N, P, C)

        def onednn():  # oneDNN copies the transposed input first
            return linear(xt, w, packed).view(nb, *spatial, o).movedim(last, 1)

        def blas():
            y = torch.bmm(xt, w.t().expand(nb, c, o))  # (N, P, O)
            return y.view(nb, *spatial, o).movedim(last, 1)
        if not usable(xt, w):
            return blas()
        key = (tuple(x.shape), x.stride(), tuple(w.shape), str(x.dtype))
        return fastest("einsum-gemm-to-cl", key, {"onednn": onednn, "blas": blas})()
    return torch.bmm(w.expand(nb, o, c), xc).view(nb, o, *spatial)
