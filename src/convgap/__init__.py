"""convgap: where a CNN's real latency departs from what its arithmetic says it should cost.

Public API (units: latencies in seconds, MACs as counts, bytes in bytes, FLOP/s, bytes/s):

- :func:`analyze` -- per layer / block / model: MACs, bytes, measured, ideal and roofline
  latency, computational efficiency; returns a :class:`Report` (table, JSON, HTML).
- :func:`count` -- per-layer MACs, params, bytes and arithmetic intensity, no timing.
- :func:`swap` -- run each convolution with a chosen algorithm, or ``"auto"``: measured
  per layer, cached; :mod:`algorithms` holds the registry (add your own with ``register``).
- :mod:`models` -- the model zoo: ``models.create(name)``, ``models.names()``.
- :mod:`hardware` -- measured roofs: ``hardware.roofs(device, dtype)``.
- :mod:`timing` -- the timing discipline used for every number convgap reports.
"""

__version__ = "0.1.0"

from . import algorithms, hardware, models, timing, transforms
from .analysis import Report, analyze
from .count import Counts, count
from .errors import ConvgapError
from .transforms import swap

__all__ = ["analyze", "count", "swap", "Counts", "Report", "ConvgapError", "algorithms",
           "hardware", "models", "timing", "transforms", "__version__"]
