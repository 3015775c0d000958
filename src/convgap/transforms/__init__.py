"""Model rewrites: swap (per-layer convolution algorithms), factorize (factorized convs),
fuse (whole blocks as fused modules),
fold_batchnorm (BatchNorm folded into the conv / linear before it);
one layer selector (select), what they did (changes) and what it bought (compare)."""

from .changes import Change, changes
from .compare import Comparison, LayerComparison, compare
from .factorize import factorize
from .fold import fold_batchnorm
from .fuse import fuse
from .refresh import refresh
from .select import select
from .swap import Choice, choices, swap, unswap

__all__ = ["swap", "unswap", "choices", "Choice", "factorize", "fold_batchnorm", "fuse",
           "changes", "Change", "compare", "Comparison", "LayerComparison", "select", "refresh"]
