"""Model rewrites: swap (per-layer convolution algorithms), factorize (factorized convs)."""

from .factorize import FactorizedLayer, compare, factorize
from .refresh import refresh
from .swap import Choice, choices, swap, unswap

__all__ = ["swap", "unswap", "choices", "Choice", "factorize", "compare", "FactorizedLayer",
           "refresh"]
