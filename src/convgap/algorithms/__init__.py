"""Convolution algorithms: the registry, AlgoConv2d, measured auto-selection.

Built-ins: ``torch``, ``channels_last``, ``prepacked`` (oneDNN, CPU), ``cudnn`` (CUDA),
``im2col``, ``winograd_f2``, ``winograd_f4``, ``fft``, ``depthwise`` and ``implicit_gemm``
(Triton; CUDA, or CPU under ``TRITON_INTERPRET=1``). ``nn.Linear`` layers (pointwise
convolutions on channels-last maps) run as :class:`AlgoLinear`: ``torch`` or ``prepacked``
(oneDNN). Add your own convolution algorithm::

    @convgap.algorithms.register("mine")
    class Mine(convgap.algorithms.Algorithm):
        def supports(self, spec): return None if spec.groups == 1 else "groups=1 only"
        def prepare(self, weight, bias, spec): return weight, bias
        def run(self, x, state, spec): ...
"""

from . import builtin  # noqa: F401  (registration order: reference first)
from .linear import LINEAR_ALGORITHMS, AlgoLinear, LinearSpec
from .module import AlgoConv2d, AlgorithmFallbackWarning
from .registry import Algorithm, get, names, register, unregister
from .spec import ConvSpec, layout_of

for _optional in ("im2col", "winograd", "fft", "depthwise", "implicit_gemm"):
    try:
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as _exc:  # a module still being written, or no triton
        if _exc.name != f"{__name__}.{_optional}":
            raise

__all__ = ["Algorithm", "AlgoConv2d", "AlgoLinear", "LinearSpec", "LINEAR_ALGORITHMS", "AlgorithmFallbackWarning", "ConvSpec", "get", "names",
           "register", "unregister", "layout_of"]
