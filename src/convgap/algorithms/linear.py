"""AlgoLinear: ``nn.Linear`` layers as pointwise convolutions, run by torch or prepacked oneDNN.

Many CNNs write their 1x1 convolutions as ``nn.Linear`` on channels-last maps (ConvNeXt's
inverted bottleneck: 85% of its CPU time at batch 8 goes to these ``addmm`` calls). On CPU
torch sends them to MKL's sgemm, which on AMD CPUs runs without AVX-512 (about 200 GFLOP/s
here on 2 threads) while oneDNN's linear with the weight reordered once for the row count
runs at 430-480 GFLOP/s: the same 2.4x that inductor's freezing gets. Two algorithms:

* ``torch``: ``F.linear`` as given (the reference);
* ``prepacked``: ``torch.ops.mkldnn._linear_pointwise`` with the weight packed by oneDNN for
  the input's row count (CPU, float32/bfloat16, inference; falls back to ``F.linear`` when
  gradients are needed or under jit.trace / ONNX export / torch.compile).

``"auto"`` times both on the layer's real input (interleaved, paired per-round ratios) and
keeps ``prepacked`` only if it is correct (relative error <= 1e-4 in fp32) and at least
``config.MARGIN`` faster (:mod:`convgap.choice`). Decisions share the convolution tuning cache
(``tuning.json``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConvgapError
from ..ops import onednn
from ..ops.guard import may_run_fast
from .module import AlgorithmFallbackWarning, choice_repr

__all__ = ["AlgoLinear", "LinearSpec", "LINEAR_ALGORITHMS", "tune_linear", "check_linear"]

LINEAR_ALGORITHMS = ("torch", "prepacked")
TOLERANCE = 1e-4  # fp32 relative error accepted from 'prepacked', as for the conv algorithms
KIND = "linear"  # the kind of decision (convgap.choice.forced({KIND: name}))


@dataclass(frozen=True)
class LinearSpec:
    """A linear layer applied to one input: features, bias, input shape, dtype, device and
    whether the input is contiguous."""

    in_features: int
    out_features: int
    bias: bool
    input_shape: tuple[int, ...]
    dtype: str
    device: str
    contiguous: bool

    @property
    def rows(self) -> int:
        """Rows of the GEMM: the product of the input's leading dimensions."""
        n = 1
        for d in self.input_shape[:-1]:
            n *= d
        return n

    def key(self) -> str:
        return "linear|" + "|".join(f"{k}={v}" for k, v in asdict(self).items())

    def short(self) -> str:
        """Compact label, e.g. 'linear 96->384 @8x56x56x96'."""
        shape = "x".join(str(d) for d in self.input_shape)
        return (f"linear {self.in_features}->{self.out_features} @{shape}"
                + ("" if self.contiguous else " strided"))

    @classmethod
    def from_linear(cls, lin: nn.Linear, x: torch.Tensor) -> "LinearSpec":
        return cls(lin.in_features, lin.out_features, lin.bias is not None, tuple(x.shape),
                   str(x.dtype).removeprefix("torch."), x.device.type, x.is_contiguous())


def supports_prepacked(spec: LinearSpec) -> str | None:
    """None if ``prepacked`` can run ``spec``, else why not."""
    reason = onednn.unsupported(spec.device, spec.dtype, "linear")
    if reason is None and (len(spec.input_shape) < 2 or spec.rows == 0):
        return "needs an input with at least one row and two dimensions"
    return reason


def check_linear(name: str, where: str = "linear") -> str:
    """``name`` if it is a linear algorithm or 'auto'; :class:`ConvgapError` otherwise."""
    if name != "auto" and name not in LINEAR_ALGORITHMS:
        raise ConvgapError(f"{where}: unknown linear algorithm {name!r}; available: "
                           f"{', '.join(LINEAR_ALGORITHMS)}, auto")
    return name


class AlgoLinear(nn.Linear):
    """A drop-in ``nn.Linear`` whose forward runs ``algorithm`` ('torch', 'prepacked' or
    'auto': measure on the first input and keep the faster correct one).

    Holds the *same* Parameter objects as the layer it replaces (``state_dict`` unchanged).
    The packed weight is built once per (row count, dtype, weight version) and rebuilt when
    the weight changes. Attributes as :class:`~convgap.algorithms.AlgoConv2d`:
    ``algorithm``, ``requested``, ``fallback``, ``tuning``.
    """

    def __init__(self, lin: nn.Linear, algorithm: str = "torch") -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight, self.bias = lin.weight, lin.bias
        self.training = lin.training
        self.requested = check_linear(algorithm)
        self.algorithm = algorithm
        self.fallback: str | None = None
        self.tuning: dict[str, Any] | None = None
        self._packed: dict[tuple, tuple[tuple, torch.Tensor]] = {}
        self._support: dict[tuple, str | None] = {}

    def __getstate__(self) -> dict:
        """Packed oneDNN tensors cannot be copied: copies and pickles drop them."""
        state = self.__dict__.copy()
        state["_packed"] = {}
        return state

    def spec_for(self, x: torch.Tensor) -> LinearSpec:
        return LinearSpec.from_linear(self, x)

    def set_algorithm(self, name: str, reason: str | None = None) -> None:
        """Run ``name`` from now on (``reason``: why it differs from the request)."""
        if name not in LINEAR_ALGORITHMS:
            check_linear(name)
            raise ConvgapError(f"set_algorithm needs a concrete algorithm, got {name!r}")
        self.algorithm = name
        self.fallback = reason
        self.refresh()

    def refresh(self) -> None:
        """Drop the packed weights (see :meth:`AlgoConv2d.refresh`)."""
        self._packed.clear()

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _prepacked(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        w, b = self.weight, self.bias
        version = (w._version, w.data_ptr(), None if b is None else (b._version, b.data_ptr()))
        key = (rows, x.dtype)
        hit = self._packed.get(key)
        if hit is None or hit[0] != version:
            hit = self._packed[key] = (version, onednn.pack_linear(w, rows, x.dtype))
        bias = None if b is None else b.detach().to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, hit[1], bias, "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.algorithm == "auto":
            tune_linear(self, x)
        if self.algorithm == "torch" or not may_run_fast(x, self._parameters.values()):
            return self._torch(x)
        skey = (x.shape, x.dtype, x.device, x.is_contiguous())
        reason = self._support.get(skey, False)
        if reason is False:
            reason = self._support[skey] = supports_prepacked(self.spec_for(x))
        if reason is not None:
            warnings.warn(f"'prepacked' cannot run {self.spec_for(x).short()}: {reason}; "
                          "using torch for this call", AlgorithmFallbackWarning, stacklevel=2)
            return self._torch(x)
        return self._prepacked(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + choice_repr(self)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's parameters (undo the swap)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        lin.train(self.training)
        return lin


@torch.no_grad()
def tune_linear(layer: AlgoLinear, x: torch.Tensor) -> None:
    """Choose ``layer``'s algorithm for input ``x`` by the one measured choice
    (:mod:`convgap.choice`, shared with the convolutions' cache): ``torch`` the incumbent,
    ``prepacked`` kept if correct and at least ``config.MARGIN`` faster."""
    from .. import choice
    from . import tuner
    spec = layer.spec_for(x)
    cands = [choice.Candidate("torch", lambda: layer._torch(x))]
    rejected = {}
    reason = supports_prepacked(spec)
    if reason is None:
        cands.append(choice.Candidate("prepacked", lambda: layer._prepacked(x), TOLERANCE))
    else:
        rejected["prepacked"] = f"unsupported: {reason}"
    decision = choice.choose(cands, kind=KIND, spec_key=spec.key(), device=spec.device,
                             rejected=rejected)
    layer.set_algorithm(decision.choice)
    layer.tuning = dict(decision.to_dict(), cached=decision.cached, spec=spec.short(),
                        layout="contiguous" if spec.contiguous else "strided",
                        spec_key=spec.key())
    tuner.advance_progress()
