"""Layouts of feature maps: their names, memory formats and the checks the kernels use."""

from __future__ import annotations

import torch

from ..errors import ConvgapError

__all__ = ["LAYOUTS", "layout_of", "memory_format", "channels_last", "channels_innermost"]

LAYOUTS = ("nchw", "channels_last")  # the layouts a user may ask for


def layout_of(x: torch.Tensor) -> str:
    """'nchw' (contiguous), 'channels_last', or 'strided' (anything else: slices, views)."""
    if x.is_contiguous():
        return "nchw"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def memory_format(layout: str) -> torch.memory_format:
    """The torch memory format of a layout name in :data:`LAYOUTS`; ConvgapError for any
    other name."""
    if layout == "nchw":
        return torch.contiguous_format
    if layout == "channels_last":
        return torch.channels_last
    raise ConvgapError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")


def channels_last(x: torch.Tensor) -> bool:
    """True if the 4-D ``x`` is in torch's channels_last memory format and not plainly
    contiguous (so an algorithm returns channels_last where this is true, contiguous
    otherwise)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def channels_innermost(x: torch.Tensor) -> bool:
    """True if ``x`` (N, C, *spatial) is stored with channels innermost (channels_last /
    channels_last_3d, or any dense equivalent) and is not plainly contiguous."""
    if x.dim() < 3 or x.shape[1] == 1:
        return False
    return x.movedim(1, -1).is_contiguous() and not x.is_contiguous()
