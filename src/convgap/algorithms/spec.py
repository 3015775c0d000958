"""ConvSpec: everything that decides which convolution algorithm can run and which is fastest.

A spec is the convolution's parameters plus the input it sees (shape, dtype, device,
layout). Padding in a spec is always *symmetric zero padding* ``(ph, pw)``: ``AlgoConv2d``
first applies any other padding itself (``padding_mode`` reflect / replicate / circular,
or the asymmetric split of ``padding='same'`` with an even kernel), exactly as
``nn.Conv2d._conv_forward`` does, so algorithms only ever implement zero padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from ..ops.layouts import layout_of
from ..ops.sizes import conv_length

__all__ = ["ConvSpec", "layout_of", "explicit_padding"]


def explicit_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Padding of ``conv`` as (left, right, top, bottom), F.pad's order; resolves 'same'
    and 'valid' the way torch does (for 'same' the extra pixel goes right/bottom)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


FLOATING_DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass(frozen=True)
class ConvSpec:
    """A 2-D convolution on a given input. ``padding`` is symmetric zero padding (ph, pw).

    input_shape: (N, C, H, W) as seen by the algorithm (after any pre-padding).
    dtype: 'float32', 'bfloat16', ... device: 'cpu' or 'cuda'. layout: see
    :func:`~convgap.ops.layouts.layout_of` (re-exported here).
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    bias: bool
    input_shape: tuple[int, int, int, int]
    dtype: str = "float32"
    device: str = "cpu"
    layout: str = "nchw"

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        n, _, h, w = self.input_shape
        (ph, pw), (dh, dw) = self.padding, self.dilation
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        oh, ow = conv_length(h, kh, sh, (ph, ph), dh), conv_length(w, kw, sw, (pw, pw), dw)
        return (n, self.out_channels, oh, ow)

    @property
    def macs(self) -> int:
        n, c, oh, ow = self.output_shape
        return n * c * oh * ow * (self.in_channels // self.groups) * \
            self.kernel_size[0] * self.kernel_size[1]

    @property
    def depthwise(self) -> bool:
        """One input channel per group (out_channels a multiple of in_channels)."""
        return self.groups == self.in_channels and self.groups > 1

    def empty_output(self) -> str | None:
        """Why no algorithm can run this spec (its output would be empty), else None."""
        _, _, oh, ow = self.output_shape
        if oh < 1 or ow < 1:
            return "the output would be empty (input smaller than the kernel)"
        return None

    def not_floating(self, what: str) -> str | None:
        """Why ``what`` (e.g. 'FFT convolution') cannot run a non-floating dtype, else None."""
        if self.dtype not in FLOATING_DTYPES:
            return f"{what} needs a floating-point input, got {self.dtype}"
        return None

    def is_3x3_s1(self) -> bool:
        """A 3x3, stride-1, dilation-1 convolution (Winograd's territory)."""
        return (self.kernel_size == (3, 3) and self.stride == (1, 1)
                and self.dilation == (1, 1))

    def key(self) -> str:
        """A stable string for caches: every field, in order."""
        return "|".join(f"{k}={v}" for k, v in asdict(self).items())

    def short(self) -> str:
        """Compact human label, e.g. '64->64 k3x3 s1 g1 @1x64x56x56'."""
        n, c, h, w = self.input_shape
        g = f" g{self.groups}" if self.groups > 1 else ""
        return (f"{self.in_channels}->{self.out_channels} k{self.kernel_size[0]}x"
                f"{self.kernel_size[1]} s{self.stride[0]}{g} @{n}x{c}x{h}x{w}")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, x: torch.Tensor) -> "ConvSpec":
        """The spec of ``conv`` applied to input ``x`` (before ``conv``'s own padding)."""
        left, right, top, bottom = explicit_padding(conv)
        symmetric = conv.padding_mode == "zeros" and left == right and top == bottom
        n, c, h, w = x.shape
        if symmetric:
            padding, shape = (top, left), (n, c, h, w)
        else:  # pre-padded by AlgoConv2d
            padding, shape = (0, 0), (n, c, h + top + bottom, w + left + right)
        return cls(
            in_channels=conv.in_channels, out_channels=conv.out_channels,
            kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride), padding=padding,
            dilation=tuple(conv.dilation), groups=conv.groups, bias=conv.bias is not None,
            input_shape=tuple(shape), dtype=str(x.dtype).removeprefix("torch."),
            device=x.device.type, layout=layout_of(x))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConvSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
