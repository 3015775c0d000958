"""The convolution output-length formula (the one copy in the package)."""

from __future__ import annotations

__all__ = ["conv_length"]


def conv_length(n: int, k: int, stride: int, pad: tuple[int, int], dilation: int) -> int:
    """Output length (elements) along one dimension of a convolution over ``n`` input
    elements with ``k`` taps, zero padding ``pad`` = (before, after), ``stride`` and
    ``dilation``: ``(n + pad[0] + pad[1] - dilation * (k - 1) - 1) // stride + 1``, as
    ``F.conv2d`` (below 1: the kernel does not fit)."""
    return (n + pad[0] + pad[1] - dilation * (k - 1) - 1) // stride + 1
