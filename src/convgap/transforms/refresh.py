"""refresh: drop the prepared state convgap's modules keep between calls."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["refresh"]


def refresh(model: nn.Module) -> int:
    """Drop the prepared state (packed weights, compiled steps, kept weight-only results)
    of every convgap module in ``model``: ``AlgoConv2d``, ``AlgoLinear``,
    ``TensorialConv2d``, ``FlattenedConv2d``, the fused blocks and the dynamic blocks. That
    state follows every weight change
    PyTorch versions (in-place ops, ``load_state_dict``, optimizer steps, ``p.data = t``);
    writes through ``p.data.<op>_()`` bypass the version counter, so call this after them.
    Returns the number of modules refreshed."""
    from ..algorithms import AlgoConv2d, AlgoLinear
    from ..layers import FlattenedConv2d, TensorialConv2d
    from ..layers.dynamic import DynamicBlock
    from ..layers.fused_blocks import FusedBlock
    kinds = (AlgoConv2d, AlgoLinear, TensorialConv2d, FlattenedConv2d, FusedBlock,
             DynamicBlock)
    count = 0
    for m in model.modules():
        if isinstance(m, kinds):
            m.refresh()
            count += 1
    return count
