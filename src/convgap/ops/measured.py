"""The fastest of a step's implementations, chosen at run time for its sizes."""

from __future__ import annotations

from typing import Callable

from .. import choice, config, timing

__all__ = ["fastest"]


def fastest(kind: str, key: tuple, fns: dict[str, Callable], device: str = "cpu",
            rounds: timing.TimingConfig | None = None) -> Callable:
    """The fastest of ``fns`` (name -> zero-argument callable; the first is the incumbent)
    on a step's shapes (``key``), by the one measured-and-verified choice
    (:mod:`convgap.choice`: checked against the incumbent, timed interleaved, replaced past
    the margin, stored by name per device, threads and malloc policy; ``rounds``: default
    ``config.STEP_ROUNDS``). For steps where the winner depends on the sizes (oneDNN with a
    layout copy against BLAS: a 128-channel 28x28 map at batch 8, BLAS 1.3x faster; a
    512-channel 7x7 map, oneDNN 1.8x faster)."""
    rounds = rounds or config.STEP_ROUNDS
    return choice.pick(fns, kind=kind, spec_key=key, device=str(device), rounds=rounds,
                       confirm=rounds)
