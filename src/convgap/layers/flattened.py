"""FlattenedConv2d: Jin, Dundar & Culurciello, "Flattened convolutional neural networks for
feedforward acceleration" (arXiv 1412.5474): a 3-D filter replaced by a lateral (1x1 across
channels), a vertical (kx1, per channel) and a horizontal (1xk, per channel) 1-D filter, a
bias after each, no nonlinearity inside."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..errors import ConvgapError
from ..kernels.cpu import pdp
from ..ops.depthwise import depthwise_nhwc
from ..ops.guard import frozen_parameters
from ..ops.layouts import channels_innermost
from ..ops.memo import reuse, signature
from ..ops.pointwise import pointwise
from ..ops.sizes import conv_length
from . import dispatch
from .tensorial import choose_kernel

__all__ = ["FlattenedConv2d"]


class FlattenedConv2d(nn.Module):
    """``repeats`` x (lateral 1x1 -> vertical kx1 -> horizontal 1xk), biases after each.

    The first lateral maps ``in_channels`` to ``out_channels``, later ones ``out_channels``
    to itself. Stride applies in the first repeat's vertical/horizontal filters, padding and
    dilation in every repeat's. Parameters per repeat: C_in*C_out + 3*C_out + k_h*C_out +
    k_w*C_out (vs C_in*C_out*k_h*k_w for the dense conv).

    Forward runs the lateral filter as a GEMM over positions written channels innermost
    (NHWC), and the vertical and horizontal filters as ONE depthwise k_h x k_w convolution
    with the rank-1 kernel v h^T (oneDNN's NHWC depthwise kernel: one pass over the feature
    map instead of two, 3-10x faster here than shifted multiply-adds or NCHW), and adds the
    vertical bias as the exact per-column map it becomes after the zero-padded horizontal
    filter; ``as_written=True`` runs the three convolutions as written (same result). In CPU
    float32 inference each repeat may instead run as one pass of the fused C kernel
    (:func:`convgap.kernels.cpu.pdp.bind` without its second 1x1 conv: the lateral GEMM,
    the rank-1 depthwise filter and the biases, the intermediate kept in cache); a one-time
    paired measurement per input shape and layout picks whichever is faster. The result has
    the input's memory layout.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, repeats: int = 1,
                 stride=1, padding=0, dilation=1, bias: bool = True, as_written: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(repeats, int) or repeats < 1:
            raise ConvgapError(f"repeats must be an int >= 1, got {repeats!r}")
        if isinstance(padding, str):
            raise ConvgapError("FlattenedConv2d takes int or (h, w) padding")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.repeats, self.as_written = repeats, as_written
        kw = {"device": device, "dtype": dtype}
        o, (kh, kwid) = self.out_channels, self.kernel_size
        self.lateral = nn.ParameterList()
        self.vertical = nn.ParameterList()
        self.horizontal = nn.ParameterList()
        self.biases = nn.ParameterList() if bias else None
        for r in range(repeats):
            cin = self.in_channels if r == 0 else o
            self.lateral.append(nn.Parameter(torch.empty(o, cin, **kw)))
            self.vertical.append(nn.Parameter(torch.empty(o, kh, **kw)))
            self.horizontal.append(nn.Parameter(torch.empty(o, kwid, **kw)))
            if bias:
                self.biases.append(nn.Parameter(torch.zeros(3, o, **kw)))
        # per repeat: the lateral weight packed for oneDNN, the depthwise filters blocked
        # for it, and (in inference) the rank-1 kernel v h^T while v and h are unchanged
        self._cache: list[dict] = [{} for _ in range(repeats)]
        self._choice: dict = {}  # (input shape, strides) -> 0: the C kernel, 1: the steps
        self.reset_parameters()

    def __getstate__(self) -> dict:
        """Copies and pickles start without the per-repeat cache (packed weights)."""
        state = super().__getstate__()
        state["_cache"] = [{} for _ in range(self.repeats)]
        state["_choice"] = {}
        return state

    def refresh(self) -> None:
        """Drop the packed lateral weights, blocked filters and kept v h^T (see
        :meth:`TensorialConv2d.refresh`)."""
        self._cache = [{} for _ in range(self.repeats)]
        self._choice = {}

    def _kernel(self, r: int) -> torch.Tensor:
        """(o, 1, kh, kw): the vertical and horizontal filters as one rank-1 kernel."""
        v, h = self.vertical[r], self.horizontal[r]

        def build():
            return (v[:, :, None] * h[:, None, :])[:, None]
        if frozen_parameters([v, h]) != 0b11:  # gradients, tracing: built in the graph
            return build()
        return reuse(self._cache[r], "kernel", (v, h), build)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for r in range(self.repeats):
                lat = self.lateral[r]
                nn.init.kaiming_uniform_(lat, a=5 ** 0.5)
                for f in (self.vertical[r], self.horizontal[r]):
                    f.uniform_(-(3 / f.shape[1]) ** 0.5, (3 / f.shape[1]) ** 0.5)
                    f.mul_(1 / 3 ** 0.5)  # unit-ish gain: var(v) * k = 1/3 per 1-D filter
                if self.biases is not None:
                    bound = 1 / lat.shape[1] ** 0.5
                    self.biases[r].uniform_(-bound, bound)

    @property
    def weight_params(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("biases"))

    def _geometry(self, r: int):
        stride = self.stride if r == 0 else (1, 1)
        return stride, self.padding, self.dilation

    def _bias(self, r: int, i: int):
        return None if self.biases is None else self.biases[r][i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ConvgapError(f"FlattenedConv2d expects (N, {self.in_channels}, H, W) input, "
                               f"got {tuple(x.shape)}")
        if self._kernel_applies(x):
            key = (x.shape, x.stride())
            choice = self._choice.get(key)
            if choice is None:  # once per input shape and layout, verified against the steps
                spec = (tuple(x.shape), x.stride(), str(x.dtype), self.repeats,
                        self.kernel_size, self.stride, self.padding, self.dilation,
                        self.biases is not None)
                name = choose_kernel("flattened", spec,
                                     {"steps": self._steps, "nhwc": self._one_pass}, x)
                choice = self._choice[key] = ("nhwc", "steps").index(name)
            if choice == 0:
                return self._one_pass(x)
        return self._steps(x)

    def kernel_for(self, x: torch.Tensor) -> str | None:
        """What forward runs for inputs with ``x``'s shape and strides in inference: 'nhwc'
        (the fused C kernel), 'steps' (torch ops), or None while not yet measured (CPU
        float32). Outside CPU float32 inference (other devices and dtypes, autograd) and
        with ``as_written`` it always runs the steps."""
        if self.as_written or not (x.device.type == "cpu" and x.dtype == torch.float32 and
                                   pdp.available()):
            return "steps"
        choice = self._choice.get((x.shape, x.stride()))
        return None if choice is None else ("nhwc", "steps")[choice]

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        """Not ``as_written``, CPU float32 inference, and the fused kernel built here."""
        return not self.as_written and dispatch.cpu_inference(x, list(self.parameters())) and \
            pdp.available()

    def _one_pass(self, x: torch.Tensor) -> torch.Tensor:
        """Each repeat as one pass of the fused kernel, bound to the repeat's weights for
        inputs like ``x`` and kept while those are unchanged."""
        for r in range(self.repeats):
            cache = self._cache[r]
            params = [self.lateral[r], self.vertical[r], self.horizontal[r]]
            if self.biases is not None:
                params.append(self.biases[r])
            sig = signature(params)
            key = ("kernel", x.shape, x.stride())
            hit = cache.get(key)
            if hit is None or hit[0] != sig:
                hit = cache[key] = (sig, self._bind(r, x))
            x = hit[1](x)
        return x

    def _bind(self, r: int, x: torch.Tensor):
        (sh, sw), (ph, pw), (dh, dw) = self._geometry(r)
        kernel = self._kernel(r)[:, 0]  # (o, kh, kw)
        bias1 = out_map = None
        if self.biases is not None:
            ow = conv_length(x.shape[-1], self.kernel_size[1], sw, (pw, pw), dw)
            bias1 = self.biases[r][0]
            out_map = (self._vertical_bias_map(r, x.shape[-1], ow)[0, :, 0, :]
                       + self.biases[r][2][:, None]).t()  # (ow, o)
        return pdp.bind(x, self.lateral[r].t(), kernel, None, None, (sh, sw), (ph, pw),
                        (dh, dw), self._cache[r].setdefault("kernel_store", {}), False, bias1,
                        out_map)

    def _steps(self, x: torch.Tensor) -> torch.Tensor:
        """Forward on torch ops, the steps (oneDNN's GEMM and depthwise kernels)."""
        o = self.out_channels
        restore = not channels_innermost(x)  # the result keeps the input's layout
        for r in range(self.repeats):
            (sh, sw), (ph, pw), (dh, dw) = self._geometry(r)
            # lateral 1x1: one GEMM over positions, written channels innermost (NHWC),
            # the layout oneDNN's depthwise kernels run fastest in
            cache = self._cache[r]
            x = pointwise(x, self.lateral[r], 1, channels_last=True,
                          packed=cache.setdefault("lateral", {}))
            if self.biases is not None:
                x = x.add_(self._bias(r, 0).view(1, -1, 1, 1))
            v, h = self.vertical[r], self.horizontal[r]
            if self.as_written:
                x = F.conv2d(x, v[:, None, :, None], self._bias(r, 1), (sh, 1), (ph, 0),
                             (dh, 1), o)
                x = F.conv2d(x, h[:, None, None, :], self._bias(r, 2), (1, sw), (0, pw),
                             (1, dw), o)
                continue
            y = depthwise_nhwc(x, self._kernel(r), (sh, sw), (ph, pw), (dh, dw), o,
                               cache.setdefault("dw", {}), self._bias(r, 2))
            if self.biases is not None:
                y = y.add_(self._vertical_bias_map(r, x.shape[-1], y.shape[-1]))
            x = y
        return x.contiguous() if restore else x

    def _vertical_bias_map(self, r: int, width: int, out_width: int) -> torch.Tensor:
        """The vertical bias after the horizontal filter: b_v * (sum of the taps that land
        inside the unpadded map), per output column: shape (1, C, 1, out_width)."""
        (_, sw), (_, pw), (_, dw) = self._geometry(r)
        h = self.horizontal[r]
        kw = h.shape[1]
        cols = torch.arange(out_width, device=h.device) * sw - pw  # first tap's column
        taps = cols[:, None] + torch.arange(kw, device=h.device)[None, :] * dw
        inside = ((taps >= 0) & (taps < width)).to(h.dtype)  # (out_width, kw)
        return (self.biases[r][1][:, None] * (h @ inside.T))[None, :, None, :]

    def macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-accumulates of one forward as the paper counts it (lateral + vertical +
        horizontal; biases excluded)."""
        n, _, hgt, wid = input_shape
        total = 0
        for r in range(self.repeats):
            (sh, sw), (ph, pw), (dh, dw) = self._geometry(r)
            cin = self.lateral[r].shape[1]
            total += n * self.out_channels * cin * hgt * wid
            kh, kw = self.kernel_size
            oh = conv_length(hgt, kh, sh, (ph, ph), dh)
            total += n * self.out_channels * oh * wid * kh
            ow = conv_length(wid, kw, sw, (pw, pw), dw)
            total += n * self.out_channels * oh * ow * kw
            hgt, wid = oh, ow
        return total

    def dense_weight(self) -> torch.Tensor:
        """For repeats=1: the dense (O, S, kh, kw) kernel L_os * v_oh * h_ow (biases aside)."""
        if self.repeats != 1:
            raise ConvgapError("dense_weight exists for repeats=1 only")
        lat, v, h = self.lateral[0], self.vertical[0], self.horizontal[0]
        return torch.einsum("os,oh,ow->oshw", lat, v, h)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, as_written: bool = False) -> "FlattenedConv2d":
        """Approximate a trained ``nn.Conv2d`` (groups=1, zeros padding) by one flattened
        repeat: for each output channel, the best rank-1 approximation of its (S, kh, kw)
        filter, L_o (x) v_o (x) h_o, by TensorLy parafac (rank 1, float64). Exact only for
        filters that are rank 1; the relative error is in ``approximation_error``. The bias
        goes to the last stage."""
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ConvgapError("FlattenedConv2d.from_conv needs an nn.Conv2d with groups=1 and "
                               "zeros padding")
        if isinstance(conv.padding, str):
            raise ConvgapError("FlattenedConv2d.from_conv needs numeric padding")
        from tensorly.decomposition import parafac
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, 1, conv.stride,
                    conv.padding, conv.dilation, bias=conv.bias is not None, as_written=as_written,
                    device=w.device, dtype=w.dtype)
        dense = w.detach().to("cpu", torch.float64).numpy()
        lat = np.zeros(dense.shape[:2])
        ver = np.zeros((dense.shape[0], dense.shape[2]))
        hor = np.zeros((dense.shape[0], dense.shape[3]))
        for o in range(dense.shape[0]):
            if not np.any(dense[o]):  # a dead (all-zero) filter: zero 1-D filters
                continue
            wts, (a, b, c) = parafac(dense[o], 1, n_iter_max=200, init="svd", tol=1e-12)
            lat[o], ver[o], hor[o] = a[:, 0] * wts[0], b[:, 0], c[:, 0]
        with torch.no_grad():
            layer.lateral[0].copy_(torch.as_tensor(lat, dtype=w.dtype))
            layer.vertical[0].copy_(torch.as_tensor(ver, dtype=w.dtype))
            layer.horizontal[0].copy_(torch.as_tensor(hor, dtype=w.dtype))
            if layer.biases is not None:
                layer.biases[0].zero_()
                layer.biases[0][2].copy_(conv.bias)
        rebuilt = np.einsum("os,oh,ow->oshw", lat, ver, hor)
        layer.approximation_error = float(np.linalg.norm(rebuilt - dense) /
                                          max(np.linalg.norm(dense), 1e-30))
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"repeats={self.repeats}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, bias={self.biases is not None}, "
                f"as_written={self.as_written}")
