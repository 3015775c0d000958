"""What a dynamic model's blocks do: density over a data set or at a forced density, MACs
at that density, measured latency against the static block, efficiency.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .. import config, timing
from ..errors import ConvgapError
from ..transforms.eligible import first_inputs
from .transform import dynamic_blocks, evaluating, force_density

__all__ = ["densities", "BlockReport", "report"]


def densities(model: nn.Module, data: Dataset, batch_size: int = 64
              ) -> dict[str, tuple[float, float]]:
    """Per dynamic block, the mean and standard deviation over the images of ``data`` of
    the fraction of its output computed (the model in eval, the maskers deciding)."""
    blocks = dynamic_blocks(model)
    if not blocks:
        raise ConvgapError("the model has no dynamic blocks (convgap.make_dynamic)")
    device = next(model.parameters()).device
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in blocks}
    with evaluating(model), torch.no_grad():
        for x, _ in DataLoader(data, batch_size=batch_size):
            model(x.to(device))
            for n, b in blocks.items():
                seen[n].append(b.density().cpu())
    out = {}
    for n, parts in seen.items():
        d = torch.cat(parts).double()
        out[n] = (float(d.mean()), float(d.std()) if len(d) > 1 else 0.0)
    return out


@dataclass
class BlockReport:
    """One dynamic block on one input: ``mode``, ``granularity`` (spatial), ``density``
    (fraction of its output computed on this input), ``macs`` (per image at that density,
    halo included) and ``dense_macs``; ``static_s`` (the original block) and
    ``dynamic_s`` (as it runs now, sparse by default), medians in seconds, and their
    paired ``ratio``; ``ideal_s`` (the MACs done at the device's peak) and
    ``efficiency`` = ideal_s / dynamic_s."""

    name: str
    mode: str
    granularity: int | None
    density: float
    macs: float
    dense_macs: float
    static_s: float
    dynamic_s: float
    ratio: float
    ideal_s: float

    @property
    def efficiency(self) -> float:
        return self.ideal_s / self.dynamic_s if self.dynamic_s else math.nan

    def to_dict(self) -> dict:
        return dict(asdict(self), efficiency=self.efficiency)


def report(model: nn.Module, example_input: torch.Tensor, *, density: float | None = None,
           roofs=None, seed: int = 0) -> list[BlockReport]:
    """Each dynamic block of ``model`` on its input from ``example_input``: its masks as
    the maskers decide (or at a forced ``density``), MACs at those masks, and its time
    against the original block's (interleaved, paired; ``config.LAYER_COMPARE``). ``roofs``
    (:func:`convgap.hardware.roofs`; measured if None) gives the ideal latency."""
    blocks = dynamic_blocks(model)
    if not blocks:
        raise ConvgapError("the model has no dynamic blocks (convgap.make_dynamic)")
    if roofs is None:
        from ..hardware import roofs as measure_roofs
        roofs = measure_roofs(example_input.device.type, example_input.dtype)
    rows = []
    with evaluating(model), torch.no_grad():
        if density is not None:
            force_density(model, density, seed)
        inputs, _ = first_inputs({b: n for n, b in blocks.items()},
                                 lambda: model(example_input))
        for name, b in blocks.items():
            x = inputs[name][0]
            b(x)
            macs, dense = b.cost_macs()
            static = b.original()
            a, d = timing.compare([lambda: static(x), lambda: b(x)], config.LAYER_COMPARE)
            rows.append(BlockReport(
                name, b.mode, b.granularity(), float(b.density().mean()), float(macs),
                float(dense), a.median, d.median, timing.paired_ratio(d, a),
                roofs.ideal_latency(2 * float(macs) * x.shape[0])))
    return rows
