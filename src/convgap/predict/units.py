"""Modules predicted and profiled as one operation: convgap's own fast paths.

A fused block (:class:`~convgap.layers.fused_blocks.FusedBlock`), a dynamic block
(:class:`~convgap.layers.dynamic.DynamicBlock`: its sparse kernel, at the density its masks
keep) or a factorized layer with a fused kernel (:class:`~convgap.layers.TensorialConv2d`,
:class:`~convgap.layers.FlattenedConv2d`) runs one C call where eager PyTorch would
dispatch a dozen operators, and it steps aside (runs its reference operators) while a
dispatch mode watches (:func:`convgap.ops.guard.observed`). So :func:`~convgap.predict.
record.record` keeps such a module as one *unit* op (its reference operators give its work;
:func:`describe` its density and granularity), and :func:`~convgap.predict.profile.profile`
times it as one call, the dispatch mode lifted, so its fast path runs.

:data:`UNIT_TYPES` names the unit classes (a unit's type is a categorical feature of the
'unit' kind; a factorized layer's type names its factorization); a module of a subclass
counts as its nearest registered class.

Modules of :data:`PREPARED` (:class:`~convgap.algorithms.AlgoConv2d`) are no units: they
run ordinary operators, but compute what depends on their weights alone (a Winograd or FFT
transform of the weight) once and keep it; the recording leaves those operators out.
"""

from __future__ import annotations

import torch.nn as nn

from ..algorithms import AlgoConv2d
from ..kernels.cpu import pdp
from ..layers.dynamic import DynamicBlock
from ..layers.flattened import FlattenedConv2d
from ..layers.fused_blocks import FusedBlock
from ..layers.network import FusedNetwork
from ..layers.tensorial import TensorialConv2d

__all__ = ["UNIT_TYPES", "PREPARED", "TORCH_UNITS", "is_unit", "unit_type", "describe",
           "seed", "measured", "outermost"]

# the registered unit classes by name, most specific first; 'other': an unregistered
# FusedBlock subclass; a dynamic block's by its mode and kernel ('DynamicBlock': spatial in
# the tile kernel with a dense middle conv, 'DynamicBlock-depthwise' with a depthwise one,
# 'DynamicBlock-torch': spatial in torch; the three calibrated); new names go last (a
# calibration knows each by its index)
UNIT_TYPES = ("FusedConvAct", "FusedBasicBlock", "FusedBottleneck", "FusedConvFirst",
              "FusedInvertedResidual", "FusedConvChain", "FusedMBConv", "FusedConvNeXt",
              "DynamicBlock", "TensorialConv2d-cp", "TensorialConv2d-tucker",
              "TensorialConv2d-tt", "TensorialConv2d-tr", "FlattenedConv2d", "other",
              "DynamicBlock-channel", "DynamicBlock-layer", "FusedPoolLinear", "FusedStemBlock",
              "DynamicBlock-torch", "DynamicBlock-depthwise")
PREPARED = (AlgoConv2d,)
# unit types that run torch operators (recorded as the unit's body, :class:`~convgap.
# predict.record.Op`): their base is those operators as predicted, not the reference's
TORCH_UNITS = ("DynamicBlock-torch",)


def is_unit(m: nn.Module) -> bool:
    """Does ``m`` run as one call in inference: a fused block, a dynamic block whose
    execution is sparse, a factorized layer with a fused CPU kernel."""
    if isinstance(m, FusedNetwork):   # not calibrated as one call: its blocks are units
        return False
    if isinstance(m, FusedBlock):
        return True
    if isinstance(m, TensorialConv2d):
        return m.has_kernel()
    if isinstance(m, FlattenedConv2d):
        return not m.as_written and pdp.available()
    return isinstance(m, DynamicBlock) and m.execution == "sparse"


def unit_type(m: nn.Module) -> str:
    """The registered name ``m`` counts as (its class or nearest registered base; a
    factorized layer's with its factorization)."""
    if isinstance(m, TensorialConv2d):
        name = f"TensorialConv2d-{m.factorization}"
        return name if name in UNIT_TYPES else "other"
    if isinstance(m, DynamicBlock):   # by its mode; spatial by the kernel it runs (CPU fp32)
        if m.mode != "spatial":
            return f"DynamicBlock-{m.mode}"
        return {"tiles": "DynamicBlock", "tiles-depthwise": "DynamicBlock-depthwise",
                "torch": "DynamicBlock-torch"}[m.sparse_kernel()]
    for cls in type(m).__mro__:
        if cls.__name__ in UNIT_TYPES:
            return cls.__name__
    return "other"


def describe(m: nn.Module, density: float | None = None,
             shape: tuple[int, ...] | None = None) -> tuple[float, float, float]:
    """(density, granularity, work share) of a unit: a fused block (1, 0, 1); a dynamic
    block at ``density`` (the kept share of its mask cells; None: its masker's forced
    density, else 1), its granularity (0 where its mode has none) and the share of its
    dense MACs it computes there for an input of ``shape`` (N, C, H, W)
    (:meth:`~convgap.layers.dynamic.DynamicBlock.work_share` at the forced masker's seed,
    else 0: the kept tiles' halo included; the density without a shape)."""
    if not isinstance(m, DynamicBlock):
        return (1.0, 0.0, 1.0)
    forced = m.masker.forced
    if density is None:
        density = forced[0] if forced is not None else 1.0
    # a forced masker's masks are seeded: the share at the same masks
    share = float(density) if shape is None else m.work_share(
        density, int(shape[0]), (int(shape[-2]), int(shape[-1])), seed=seed(m))
    return (float(density), float(m.granularity() or 0), share)


def seed(m: DynamicBlock) -> int:
    """The seed of the masks a dynamic block is predicted at: its forced masker's, else 0."""
    forced = m.masker.forced
    return forced[1] if forced is not None else 0


def measured(m: nn.Module) -> tuple[float, float] | None:
    """(density, work share) a dynamic block's last forward kept and computed (None: not a
    dynamic block, or no forward yet)."""
    if not isinstance(m, DynamicBlock) or m.last_mask is None:
        return None
    macs, dense = m.cost_macs()
    return float(m.last_mask.float().mean()), float(macs) / max(float(dense), 1e-30)


def outermost(model: nn.Module) -> dict[nn.Module, str]:
    """The units of ``model`` not inside another unit, with their names."""
    found: dict[nn.Module, str] = {}
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if is_unit(m):
            found[m] = name
            inside.append(name)
    return found
