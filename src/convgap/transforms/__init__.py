"""Model rewrites: swap (per-layer convolution algorithms)."""

from .swap import Choice, choices, swap, unswap

__all__ = ["swap", "unswap", "choices", "Choice"]
