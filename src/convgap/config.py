"""Process-wide timing budgets and switches, in one place.

Every module reads its budget from here *at call time* (``config.CHOICE_ROUNDS``, not a
copy taken at import), so :func:`override` changes it everywhere for a block of code::

    with convgap.config.override(CHOICE_ROUNDS=timing.QUICK, CONFIRM_ROUNDS=timing.QUICK):
        fast = convgap.swap(model, "auto", x)

Budgets (:class:`~convgap.timing.TimingConfig`: warm-up calls, sample counts, seconds):

- ``CHOICE_ROUNDS``: the round robin of a measured choice's candidates (:mod:`convgap.choice`);
- ``CONFIRM_ROUNDS``: the head-to-head confirmation of a round-robin winner;
- ``KERNEL_ROUNDS``: a fused kernel against its torch steps (factorized layers), both stages
  (longer than an einsum step's: candidates can be within 10% of each other; 3 candidates
  of 0.5 ms cost about 30 ms once);
- ``STEP_ROUNDS``: oneDNN against BLAS for one einsum step, both stages;
- ``MODEL_CHECK``: swap('auto')'s whole-model check of tuned models and eager layouts;
- ``LAYER_COMPARE`` / ``MODEL_COMPARE``: a transformed layer / model timed against the
  original (factorize with keep="faster", :func:`convgap.compare`);
- ``ANALYZE_MODEL`` / ``ANALYZE_CALL`` / ``ALLOCATION``: :func:`convgap.analyze`'s whole
  model, each isolated layer or block call, and the malloc-cost measurement;
- ``ROOFS``: the roof micro-benchmarks.

``ROOF_GEMM_CALL_S``: the largest predicted time (seconds) of one roof GEMM call: larger
sizes are skipped (a dtype without a fast GEMM must not take minutes).

``MARGIN``: how much faster (fraction) a challenger must be to replace an incumbent.

``SPARSE_CUDA``: how a spatially dynamic block's sparse execution runs on a CUDA device:
'gather' (the kept pixels' rows gathered and run through cuBLAS, the same torch code as on
other devices), 'triton' (the Triton tile kernels over an index list of the kept tiles,
:mod:`convgap.kernels.triton.tiles`; fp32 only), or 'auto' (the default: 'triton' for
bodies with a depthwise middle conv, 'gather' for dense ones, the faster of the two at
every measured batch and density on an H200, docs/2026-12-04-gpu-h200.md).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

from .errors import ConvgapError
from .timing import TimingConfig

__all__ = ["override", "CHOICE_ROUNDS", "CONFIRM_ROUNDS", "KERNEL_ROUNDS", "STEP_ROUNDS",
           "MODEL_CHECK", "LAYER_COMPARE", "MODEL_COMPARE", "ANALYZE_MODEL", "ANALYZE_CALL",
           "ALLOCATION", "ROOFS", "ROOF_GEMM_CALL_S", "MARGIN", "SPARSE_CUDA"]

CHOICE_ROUNDS = TimingConfig(warmup=2, min_repeats=5, max_repeats=25, min_time=0.05)
CONFIRM_ROUNDS = TimingConfig(warmup=3, min_repeats=15, max_repeats=200, min_time=0.2)
KERNEL_ROUNDS = TimingConfig(warmup=3, min_repeats=15, max_repeats=60, min_time=0.03)
STEP_ROUNDS = TimingConfig(warmup=2, min_repeats=7, max_repeats=15, min_time=0.005)
MODEL_CHECK = TimingConfig(warmup=2, min_repeats=11, max_repeats=40, min_time=1.0)
LAYER_COMPARE = TimingConfig(warmup=2, min_repeats=7, max_repeats=30, min_time=0.2)
MODEL_COMPARE = TimingConfig(warmup=2, min_repeats=7, max_repeats=30, min_time=0.5)
ANALYZE_MODEL = TimingConfig(warmup=2, min_repeats=5, max_repeats=30, min_time=0.25)
ANALYZE_CALL = TimingConfig(warmup=1, min_repeats=5, max_repeats=30, min_time=0.02)
ALLOCATION = TimingConfig(warmup=1, min_repeats=3, max_repeats=5, min_time=0.0)
ROOFS = TimingConfig(warmup=2, min_repeats=5, max_repeats=20, min_time=0.3)
ROOF_GEMM_CALL_S = 0.5
MARGIN = 0.03
SPARSE_CUDA = "auto"
SPARSE_CUDA_CHOICES = ("auto", "gather", "triton")

_NAMES = tuple(n for n in __all__ if n != "override")


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Set budgets or switches of this module for the block, restoring them after. An
    unknown name, or a value of the wrong type, is an error."""
    here = sys.modules[__name__]
    old = {}
    for name, value in values.items():
        if name not in _NAMES:
            raise ConvgapError(f"config has no setting {name!r}; settings: "
                               f"{', '.join(_NAMES)}")
        if not isinstance(value, type(getattr(here, name))):
            raise ConvgapError(f"config.{name} takes a {type(getattr(here, name)).__name__}, "
                               f"got {type(value).__name__}")
        old[name] = getattr(here, name)
    try:
        for name, value in values.items():
            setattr(here, name, value)
        yield
    finally:
        for name, value in old.items():
            setattr(here, name, value)
