"""convgap: where a CNN's real latency departs from what its arithmetic says it should cost.

Public API (units: latencies in seconds, MACs as counts, bytes in bytes, FLOP/s, bytes/s):

- :func:`analyze` -- per layer / block / model: MACs, bytes, measured, ideal and roofline
  latency, computational efficiency; returns a :class:`Report` (table, JSON, HTML).
- :func:`count` -- per-layer MACs, params, bytes and arithmetic intensity, no timing.
- :mod:`models` -- the model zoo: ``models.create(name)``, ``models.names()``.
- :mod:`hardware` -- measured roofs: ``hardware.roofs(device, dtype)``.
- :mod:`timing` -- the timing discipline used for every number convgap reports.
"""

__version__ = "0.1.0"

from . import hardware, models, timing
from .analysis import Report, analyze
from .count import Counts, count
from .errors import ConvgapError

__all__ = ["analyze", "count", "Counts", "Report", "ConvgapError", "hardware", "models",
           "timing", "__version__"]
