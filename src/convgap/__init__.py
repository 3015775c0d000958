"""convgap: where a CNN's real latency departs from what its arithmetic says it should cost.

Public API (units: latencies in seconds, MACs as counts, bytes in bytes, FLOP/s, bytes/s):

- :func:`analyze` -- per layer / block / model: MACs, bytes, measured, ideal and roofline
  latency, computational efficiency; returns a :class:`Report` (table, JSON, HTML).
- :func:`count` -- per-layer MACs, params, bytes and arithmetic intensity, no timing.
- :func:`swap` -- run each convolution with a chosen algorithm, or ``"auto"``: measured
  per layer, cached; :mod:`algorithms` holds the registry (add your own with ``register``).
- :func:`einsum` / :func:`einsum_path` -- einsum with convolved modes (``"bshw,oshw->bohw|hw"``),
  exact MAC counts per pairwise step, the optimal contraction order.
- :class:`TensorialConv2d` (CP, Tucker, TT, TR, reshaped CP) and :class:`FlattenedConv2d`;
  :func:`factorize` -- replace a trained model's convolutions by them.
- :func:`fold_batchnorm` -- batch-norm folded into the preceding convs / linears, exact;
  :func:`fuse` -- whole residual blocks (inverted residual, MBConv, ResNet, ConvFirst,
  ConvNeXt) run as fused kernels where exact and faster.
- :func:`make_dynamic` -- residual blocks that decide per input where to compute (spatial
  tiles, channel groups, whole blocks), run truly sparse; :mod:`dynamic` holds their
  switches, the training budget (``dynamic.Budget``, ``dynamic.train_dynamic``) and the
  per-block report.
- :func:`predict_latency` -- a model's latency per layer, block and whole on this device,
  predicted from its operators' shapes without running it; :mod:`predict` holds the
  calibration (``predict.calibrate``: micro-benchmarks of random networks, cached).
- :func:`changes` -- what every transform did to a model, read from its modules;
  :func:`compare` -- a transformed model against the original, per replaced layer and whole
  (timed interleaved), as one :class:`~convgap.transforms.Comparison`.
- :mod:`models` -- the model zoo: ``models.create(name)``, ``models.names()``.
- :mod:`data` -- datasets for training: ``data.shapes()`` (generated, seeded),
  ``data.image_folder(path, image_size)`` (the user's images), ``augment``, ``normalize``.
- :mod:`hardware` -- measured roofs: ``hardware.roofs(device, dtype)``.
- :mod:`timing` -- the timing discipline used for every number convgap reports.
- :mod:`train` -- ``train.fit`` (training with distillation, exact resume, torchrun) and
  ``train.evaluate`` (loss, top-1, top-5; accuracies as fractions in [0, 1]).
- :mod:`allocator` -- the CPU malloc policy (``allocator.set_policy("retain")`` stops large
  activations from page-faulting on every call) and what the default one costs.
"""

__version__ = "0.1.0"

from . import (algorithms, allocator, data, dynamic, hardware, layers, models, predict, timing,
               train, transforms)
from .analysis import Report, analyze
from .count import Counts, count
from .einsum import einsum, einsum_path
from .errors import ConvgapError
from .dynamic import make_dynamic
from .layers import FlattenedConv2d, TensorialConv2d
from .predict import predict_latency
from .transforms import changes, compare, factorize, fold_batchnorm, fuse, swap

__all__ = ["analyze", "count", "swap", "einsum", "einsum_path", "factorize", "fold_batchnorm",
           "fuse", "make_dynamic", "predict_latency", "changes", "compare", "TensorialConv2d", "FlattenedConv2d",
           "Counts", "Report", "ConvgapError",
           "algorithms", "allocator", "data", "dynamic", "hardware", "layers", "models",
           "predict", "timing", "train", "transforms", "__version__"]
