"""What the Triton kernels' TMA (tensor-memory) loads need of a tensor: (N, C, H, W) maps as
(pixels, channels) matrices of evenly strided rows with unit-stride channels, rows starting
16-byte aligned and whole multiples of 16 bytes wide. Imports without triton."""

from __future__ import annotations

import torch

__all__ = ["pixel_rows", "tma_ready", "width_reason"]


def pixel_rows(t: torch.Tensor) -> torch.Tensor | None:
    """The (pixels, channels) matrix view of (N, C, H, W) ``t`` when its pixels are evenly
    strided rows of unit-stride channels (channels_last, or a channel slice of it), else
    None."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if (c == 1 or sc == 1) and (h == 1 or sh == w * sw) and (n == 1 or sn == h * w * sw):
        return t.as_strided((n * h * w, c), (sw, 1))
    return None


def tma_ready(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) ``t`` itself where TMA can read its pixels' rows in place (16-byte
    aligned start, unit channel stride, evenly strided rows), else a channels_last copy."""
    rows = pixel_rows(t)
    if rows is None or rows.data_ptr() % 16 or (rows.stride(0) * t.element_size()) % 16:
        return t.clone(memory_format=torch.channels_last)
    return t


def width_reason(dtype: torch.dtype, **widths: int) -> str | None:
    """Why TMA cannot move rows of these widths (each a multiple of 16 bytes), or None."""
    size = dtype.itemsize
    for name, n in widths.items():
        if (n * size) % 16:
            return (f"the kernel moves rows of channels by TMA: {name} = {n} must be a "
                    f"multiple of {16 // size} in {str(dtype).removeprefix('torch.')}")
    return None
