"""TensorialConv2d: a convolution whose kernel is stored factorized and whose forward is a
conv_einsum expression evaluated on its cheapest path (never the rebuilt dense kernel)."""

from __future__ import annotations

import functools
import math
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from ..einsum import OBJECTIVES, PathInfo, run_plan
from ..einsum import plan as einsum_plan
from .. import choice, config
from ..errors import ConvgapError
from ..ops.guard import jit_tracing, may_run_fast, observed, untraced
from ..ops.memo import signature
from . import dispatch
from .factorizations import Family, family, rebuild

__all__ = ["TensorialConv2d", "AUTO_MAC_SLACK", "choose_kernel"]

RankArg = Union[int, Sequence[int], None]
AUTO_MAC_SLACK = 0.05  # objective='auto': extra MACs the combo path may cost over the fewest


def _padding(padding, kernel: tuple[int, int], dilation: tuple[int, int]):
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ConvgapError(f"padding must be an int, a pair, 'same' or 'valid'; got "
                               f"{padding!r}")
        return padding
    ph, pw = _pair(padding)
    return (int(ph), int(pw))


def choose_kernel(kind: str, key: tuple, fns: dict, x: torch.Tensor) -> str:
    """Which of ``fns`` (name -> a call on ``x``; the torch ops first: the reference) runs
    a factorized layer on inputs like ``x``: the one measured-and-verified
    choice (:mod:`convgap.choice`), each fused kernel checked against the steps."""
    cands = [choice.Candidate(n, functools.partial(f, x)) for n, f in fns.items()]
    return choice.choose(cands, kind=kind, spec_key=key, device=x.device.type,
                         rounds=config.KERNEL_ROUNDS, confirm=config.KERNEL_ROUNDS).choice


class TensorialConv2d(nn.Module):
    """A 2-D convolution with a factorized kernel (CP, Tucker-2, tensor train, tensor ring,
    reshaped CP; see :mod:`convgap.layers.factorizations`).

    Give either ``rank`` (an int, or one int per bond of the family) or ``compression``
    (dense weight parameters / factor parameters; the largest ranks that meet it are used,
    then, for CP, Tucker and TT, whose ranks are channel counts of intermediate feature maps,
    each rank of at least 2 x ``rank_multiple`` is rounded down to a multiple of it: the
    layer stays within the budget and runs on full vector blocks; 1 turns that off).
    Forward evaluates the family's conv_einsum expression pairwise in the order that is
    optimal for ``objective`` (:func:`convgap.einsum_path`'s 'flops' = fewest MACs,
    'memory' or 'combo' = MACs + 64 x elements written). The default 'auto' takes the combo
    path when it costs at most ``AUTO_MAC_SLACK`` (5%) more MACs than the fewest, else the
    flops path: for CP and TR the combo path first multiplies the two 1-D filters into one
    k_h x k_w kernel, one pass over the feature map instead of two, 1.02-1.35x faster here
    for 0.6% more MACs. (Reshaped CP's path can cost more MACs than the dense conv.)
    Forward honours stride, padding (int, pair, 'same', 'valid'; zeros) and dilation;
    ``bias`` is added after. In CPU float32 inference a CP, Tucker, TT or TR layer may
    instead run as one fused pass (:mod:`convgap.layers.dispatch`: its 1x1 convolutions and
    the filters between them in one C kernel, the intermediates kept in cache), and in
    CUDA inference (float32, float16, bfloat16) as two launches, a matrix product and one
    Triton kernel; a one-time paired measurement per input shape, layout, device and dtype
    picks whichever is faster than the steps. Attributes:
    ``factorization``, ``ranks``, ``expression``, ``factors`` (a ParameterList in
    expression order).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, factorization: str =
                 "cp", rank: RankArg = None, compression: float | None = None, stride=1,
                 padding=0, dilation=1, bias: bool = True, rank_multiple: int = 8,
                 objective: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        fam = family(factorization)
        if objective != "auto" and objective not in OBJECTIVES:
            raise ConvgapError(f"objective must be one of auto, {', '.join(OBJECTIVES)}; "
                               f"got {objective!r}")
        self.objective = objective
        if (rank is None) == (compression is None):
            raise ConvgapError("TensorialConv2d needs exactly one of rank= or compression=")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = _padding(padding, self.kernel_size, self.dilation)
        if self.padding == "same" and self.stride != (1, 1):
            raise ConvgapError("padding='same' needs stride 1")
        o, s, (h, w) = self.out_channels, self.in_channels, self.kernel_size
        self.factorization = fam.name
        self.ranks = (fam.ranks(rank, o, s, h, w) if rank is not None
                      else fam.rank_for(compression, o, s, h, w, rank_multiple))
        self.expression = fam.expression
        kw = {"device": device, "dtype": dtype}
        shapes = fam.shapes(self.ranks, o, s, h, w)
        self.factors = nn.ParameterList([nn.Parameter(torch.empty(sh, **kw)) for sh in shapes])
        self.bias = nn.Parameter(torch.empty(o, **kw)) if bias else None
        self._split = None if fam.input_split is None else tuple(fam.input_split(o, s))
        # input shape -> (Problem, PathInfo, this layer's compiled programs)
        self._plans: dict = {}
        # (input shape, strides) -> (device, dtype, parameters' signature, call): what
        # inference on such inputs last ran (a bound fused kernel, or the steps)
        self._fast: dict = {}
        self.reset_parameters()

    def __getstate__(self) -> dict:
        """Cached plans hold compiled steps (closures, packed weights, results of
        weight-only steps): copies and pickles drop them."""
        state = super().__getstate__()
        state["_plans"], state["_fast"] = {}, {}
        return state

    def refresh(self) -> None:
        """Drop the compiled steps and what they keep in inference (packed weights, results
        of weight-only steps). They follow every change PyTorch versions, but not writes
        through ``factor.data.<op>_()``, which bypass the version counter: call this (or
        :func:`convgap.transforms.refresh`) after those."""
        self._plans.clear()
        self._fast.clear()

    @property
    def family(self) -> Family:
        return family(self.factorization)

    def reset_parameters(self) -> None:
        """Factors drawn so the rebuilt kernel has about the variance of nn.Conv2d's
        default init (kaiming-uniform with a=sqrt(5): var = 1 / (3 fan_in))."""
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        target = 1.0 / (3 * fan_in)
        # each output element of the rebuilt kernel sums prod(bond ranks) products of one
        # entry per factor: per-factor variance v gives target = (prod ranks) * v^n
        n = len(self.factors)
        bonds = math.prod(self.ranks) if self.factorization != "tucker" else \
            self.ranks[0] * self.ranks[1]
        v = (target / bonds) ** (1.0 / n)
        with torch.no_grad():
            for f in self.factors:
                f.normal_(0.0, math.sqrt(v))
            if self.bias is not None:
                bound = 1 / math.sqrt(fan_in)
                self.bias.uniform_(-bound, bound)

    @property
    def weight_params(self) -> int:
        """Parameters in the factors (bias excluded)."""
        return sum(f.numel() for f in self.factors)

    @property
    def compression(self) -> float:
        """Dense kernel parameters / factor parameters."""
        o, s, (h, w) = self.out_channels, self.in_channels, self.kernel_size
        return o * s * h * w / self.weight_params

    def _conv_args(self) -> dict:
        pad = self.padding
        if not isinstance(pad, str):
            pad = {"h": pad[0], "w": pad[1]}
        return {"stride": {"h": self.stride[0], "w": self.stride[1]}, "padding": pad,
                "dilation": {"h": self.dilation[0], "w": self.dilation[1]}}

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ConvgapError(f"TensorialConv2d expects (N, {self.in_channels}, H, W) input, "
                               f"got {tuple(x.shape)}")
        split = self.family.input_split
        if split is None:
            return x
        s1, s2 = split(self.out_channels, self.in_channels)
        return x.reshape(x.shape[0], s1, s2, *x.shape[2:])

    def _planned(self, input_shape: Sequence[int]) -> tuple:
        """(Problem, PathInfo) of the path forward runs for ``input_shape`` (validated)."""
        x = torch.empty(tuple(input_shape), device="meta")
        shapes = [tuple(self._input(x).shape)] + [tuple(f.shape) for f in self.factors]
        args = self._conv_args()

        def plan(objective: str) -> tuple:
            return einsum_plan(self.expression, shapes, args["stride"], args["padding"],
                               args["dilation"], objective, "auto")
        if self.objective != "auto":
            return plan(self.objective)
        fewest, combo = plan("flops"), plan("combo")
        return combo if combo[1].macs <= (1 + AUTO_MAC_SLACK) * fewest[1].macs else fewest

    def path(self, input_shape: Sequence[int]) -> PathInfo:
        """The contraction path (and its MACs) forward runs for an input of
        ``input_shape``."""
        return self._planned(input_shape)[1]

    def macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-accumulates of one forward on ``input_shape`` (bias excluded)."""
        return self.path(input_shape).macs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inference on inputs like earlier ones, parameters unchanged: the call chosen then
        # (a bound fused kernel, or the steps), without re-deciding; one lookup and the
        # parameters' signature (at batch 1 a fused layer runs 40-50 us, and each us of
        # Python here is 2% of it)
        fast = self._fast.get((x.shape, x.stride()))
        if fast is not None and x.dtype is fast[1] and x.device == fast[0]:
            params = self._params()
            if may_run_fast(x, params) and fast[2] == signature(params) and not observed():
                return fast[3](x)
        # the plan for this input shape is looked up once; a call then only runs the steps
        # (parsing, validation and the plan-cache key cost more than a small layer's ops)
        plan = self._plans.get(x.shape)
        if plan is None:  # (validates the input shape)
            plan = self._plan_for(x)
        if self._kernel_applies(x):
            return self._kernel_or_steps(x, plan)
        return self._steps(x, plan)

    def _plan_for(self, x: torch.Tensor) -> tuple:
        """The plan entry (Problem, PathInfo, compiled programs) for ``x``'s shape, made
        and kept on the first call with that shape.

        Under ``torch.jit.trace`` (the TorchScript ONNX exporter) sizes are traced 0-dim
        tensors, a key no call matches: the entry is found by their int values (planned
        untraced), and the steps are compiled afresh for this call from the traced sizes
        and kept nowhere. The trace records the shape arithmetic (an export with
        ``dynamic_axes`` runs other batch sizes), and no later call runs steps holding a
        finished trace's values."""
        if not jit_tracing():
            plan = self._plans[x.shape] = (*self._planned(x.shape), {})
            return plan
        with untraced():
            shape = x.shape
            plan = self._plans.get(shape)
            if plan is None:
                plan = self._plans[shape] = (*self._planned(shape), {})
        return (plan[0], plan[1], {})

    def _params(self) -> list[torch.Tensor]:
        # the dicts behind self.factors and self.bias, read directly: this runs on every
        # call, and Module.__getattr__ costs more than the rest of the check
        factors = self._modules["factors"]._parameters.values()
        bias = self._parameters.get("bias")
        return list(factors) if bias is None else [*factors, bias]

    def _sig(self) -> list:
        """The parameters' signature: the bound fused kernels hold their prepared forms,
        valid while it is unchanged."""
        return signature(self._params())

    def _steps(self, x: torch.Tensor, plan: tuple) -> torch.Tensor:
        """Forward as the plan's pairwise steps."""
        problem, info, programs = plan
        split = self._split
        xi = x if split is None else x.reshape(x.shape[0], *split, *x.shape[2:])
        # the layer's own programs: its packed weights and weight-only results (in
        # inference, e.g. CP's k_h x k_w filter from its two 1-D factors) are kept per layer
        y = run_plan(problem, info.plan, [xi, *self.factors._parameters.values()],
                     programs=programs)
        if split is not None:
            y = y.reshape(y.shape[0], self.out_channels, *y.shape[-2:])
        # like nn.Conv2d, the layer returns its input's layout (TT's and TR's last step
        # convolves a channels-innermost intermediate, reshaped CP's splits the channels)
        fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last \
            if x.is_contiguous(memory_format=torch.channels_last) else None
        if fmt is not None and not y.is_contiguous(memory_format=fmt):
            y = y.contiguous(memory_format=fmt)
        if self.bias is not None:
            # in place: y is this call's own fresh result (no step's backward needs it),
            # and a second full-size allocation costs as much as the add here
            y = y.add_(self.bias.view(1, -1, 1, 1))
        return y

    def _pads(self) -> tuple[int, int] | None:
        """Symmetric zero padding per spatial dim, or None ('same' with an even span)."""
        if self.padding == "valid":
            return (0, 0)
        if self.padding != "same":
            return self.padding
        spans = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
        return None if any(t % 2 for t in spans) else (spans[0] // 2, spans[1] // 2)

    def has_kernel(self, device: str = "cpu") -> bool:
        """A family and geometry with a fused kernel on ``device`` ('cpu' or 'cuda')."""
        return self.factorization in dispatch.KERNEL_FAMILIES and self._pads() is not None and \
            dispatch.available(self.factorization, self.stride, device)

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        """A fused kernel for this layer on ``x``: CPU float32 or CUDA inference."""
        if x.device.type == "cuda":
            return self.has_kernel("cuda") and dispatch.gpu_inference(x, self._params())
        return self.has_kernel() and dispatch.cpu_inference(x, self._params())

    def _candidates(self, x: torch.Tensor) -> list[str]:
        """The fused kernels to try on ``x``, in order (see :func:`dispatch.kernel_call`): on a
        GPU the Triton one; on CPU the channel-major one first for NCHW inputs, then the
        channels-innermost one."""
        if x.device.type == "cuda":
            return ["triton"]
        return ["planar", "nhwc"] if dispatch.planar_applies(x, self.stride) else ["nhwc"]

    def _kernel_or_steps(self, x: torch.Tensor, plan: tuple) -> torch.Tensor:
        """The fused kernel or the steps, whichever a paired measurement on this input
        shape and layout found faster (measured on the first call, then remembered). The
        chosen kernel's bound call is kept while the parameters are the same tensors at
        the same versions, so a call costs the kernel and a few microseconds."""
        slot = (x.stride(), x.device, x.dtype)
        store = plan[2].setdefault(("kernel", *slot), {})
        factors = list(self.factors._parameters.values())
        args = (self.factorization, x, factors, self.bias, self.stride, self._pads(),
                self.dilation, store)
        kernels = self._candidates(x)
        steps = functools.partial(self._steps, plan=plan)
        choice = store.get("choice")
        if choice is None:  # the fastest of the fused kernels and the steps, verified
            key = (self.factorization, tuple(x.shape), x.stride(), x.device.type,
                   str(x.dtype), tuple(tuple(f.shape) for f in factors), self.stride,
                   self.padding, self.dilation, self.bias is not None)
            fns = {"steps": steps, **{k: dispatch.kernel_call(*args, kernel=k) for k in kernels}}
            name = choose_kernel("tensorial", key, fns, x)
            choice = store["choice"] = (kernels + ["steps"]).index(name)
            call = fns[name]
        else:  # (re)bind only the chosen kernel
            call = dispatch.kernel_call(*args, kernel=kernels[choice]) \
                if choice < len(kernels) else steps
        self._fast[(x.shape, slot[0])] = (x.device, x.dtype, self._sig(), call)
        return call(x)

    def kernel_for(self, x: torch.Tensor) -> str | None:
        """What forward runs in inference for inputs with ``x``'s shape, strides, device
        and dtype: 'planar' or 'nhwc' (the fused C kernels, channel-major or
        channels-innermost), 'triton' (the fused GPU kernel; see
        :mod:`convgap.layers.dispatch`), 'steps' (the contraction path on torch ops), or None
        while that is not yet decided (a fusable layer measures on its first inference
        call). Outside CPU float32 and CUDA inference (autograd, tracing, other dtypes or
        devices), forward always runs the steps."""
        plan = self._plans.get(x.shape)
        slot = ("kernel", x.stride(), x.device, x.dtype)
        choice = None if plan is None else plan[2].get(slot, {}).get("choice")
        if choice is None:
            device = "cuda" if x.device.type == "cuda" else "cpu"
            return None if self.has_kernel(device) else "steps"
        names = self._candidates(x)
        return names[choice] if choice < len(names) else "steps"

    def dense_weight(self) -> torch.Tensor:
        """The (O, S, kh, kw) kernel the factors stand for (for checks; forward never
        builds it)."""
        return rebuild(self.family, list(self.factors), self.out_channels, self.in_channels)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, factorization: str = "cp", rank: RankArg = None,
                  compression: float | None = None, rank_multiple: int = 8
                  ) -> "TensorialConv2d":
        """Factorize a trained ``nn.Conv2d`` (groups=1, zeros padding) with convgap's own
        decompositions (:mod:`convgap.layers.factorizations`): alternating least squares
        (cp, rcp), HOOI (tucker), TT-SVD (tt) and TR-SVD (tr), leading singular vectors
        from Gram matrices, finished in float64; seconds for a ResNet-26. At full rank
        (``family.full_rank``) the result reproduces the conv to rounding."""
        if not isinstance(conv, nn.Conv2d):
            raise ConvgapError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ConvgapError(f"from_conv factorizes dense convolutions; this one has "
                               f"groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ConvgapError(f"from_conv supports zeros padding; this conv pads with "
                               f"{conv.padding_mode!r}")
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, factorization,
                    rank=rank, compression=compression, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation,
                    bias=conv.bias is not None, rank_multiple=rank_multiple,
                    device=w.device, dtype=w.dtype)
        dense = w.detach().to("cpu", torch.float64).numpy()
        factors = layer.family.decompose(dense, layer.ranks)
        with torch.no_grad():
            for p, f in zip(layer.factors, factors):
                p.copy_(torch.as_tensor(np.ascontiguousarray(f), dtype=w.dtype))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"factorization={self.factorization}, ranks={self.ranks}, "
                f"compression={self.compression:.3g}x, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}")
