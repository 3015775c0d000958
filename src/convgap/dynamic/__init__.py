"""Dynamic networks (LAUDNet): residual blocks that decide per input where to compute
(spatial tiles, channel groups, or the whole block), trained under a latency or FLOPs
budget and run truly sparse.

- :func:`make_dynamic` wraps a model's residual blocks with maskers (:class:`DynamicBlock`);
- :func:`force_density`, :func:`set_execution`, :func:`dynamic_blocks` are its switches;
- :class:`Budget` (FLOPs or measured latency, the Gumbel temperature schedule) is the
  ``extra_loss`` of :func:`convgap.train.fit`; :func:`train_dynamic` runs the whole
  recipe (make dynamic, train with the budget and distillation from the static model,
  evaluate sparse);
- :func:`densities` and :func:`report`: density per block over a data set, and per block
  MACs, latency against the static block and efficiency.
"""

from ..layers.dynamic import DynamicBlock
from .budget import Budget, LatencyTable, measure_latency, temperature
from .report import BlockReport, densities, report
from .training import DYNAMIC_LR, DynamicTraining, train_dynamic
from .transform import (DynamicWarning, dynamic_blocks, force_density, make_dynamic,
                        set_execution)

__all__ = ["make_dynamic", "force_density", "set_execution", "dynamic_blocks",
           "DynamicBlock", "DynamicWarning", "Budget", "LatencyTable", "measure_latency",
           "temperature", "train_dynamic", "DynamicTraining", "DYNAMIC_LR", "densities",
           "report", "BlockReport"]
