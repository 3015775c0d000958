"""Dynamic networks (LAUDNet): residual blocks that decide per input where to compute
(spatial tiles, channel groups, or the whole block), trained under a latency or FLOPs
budget and run truly sparse.

- :func:`make_dynamic` wraps a model's residual blocks with maskers;
- :func:`force_density`, :func:`set_execution`, :func:`dynamic_blocks` are its switches;
- :mod:`.budget`: the training losses (``Budget``: FLOPs or measured latency, Gumbel
  temperature schedule) to pass as ``convgap.train.fit(..., extra_loss=...)``.
"""

from ..layers.dynamic import DynamicBlock
from .transform import (DynamicWarning, dynamic_blocks, force_density, make_dynamic,
                        set_execution)

__all__ = ["make_dynamic", "force_density", "set_execution", "dynamic_blocks",
           "DynamicBlock", "DynamicWarning"]
