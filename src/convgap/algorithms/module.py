"""AlgoConv2d: an ``nn.Conv2d`` that runs a chosen algorithm from the registry."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.guard import exporting, may_run_fast
from ..ops.layouts import layout_of
from ..ops.memo import reuse
from . import registry
from .spec import ConvSpec, explicit_padding

__all__ = ["AlgoConv2d", "AlgorithmFallbackWarning"]


class AlgorithmFallbackWarning(UserWarning):
    """A requested algorithm cannot run a layer; that layer runs ``torch`` instead."""


def choice_repr(layer: Any) -> str:
    """', algorithm=NAME' plus why it differs from the request, for ``extra_repr``."""
    s = f", algorithm={layer.algorithm}"
    if layer.fallback:
        s += f" (requested {layer.requested}: {layer.fallback})"
    return s


class AlgoConv2d(nn.Conv2d):
    """A drop-in ``nn.Conv2d`` whose forward runs ``algorithm`` (a registry name, or
    ``"auto"``: measure on the first input and keep the fastest correct one).

    It is an ``nn.Conv2d`` subclass holding the *same* Parameter objects as the convolution it
    replaces, so ``state_dict`` keys and values are unchanged. Prepared weights (Winograd
    filters, packed weights) are computed once per (input spec, weight version) and rebuilt
    when the weight changes. When gradients are needed and the algorithm is not
    differentiable, or under jit.trace / ONNX export / torch.compile for an algorithm whose
    ``exports`` is 'fallback', the call runs ``F.conv2d`` instead (same result).

    Attributes: ``algorithm`` (current choice), ``requested`` (what the user asked for),
    ``fallback`` (why the request could not be honoured, or None), ``tuning`` (for 'auto':
    the measured candidates).
    """

    def __init__(self, conv: nn.Conv2d, algorithm: str = "torch") -> None:
        nn.Module.__init__(self)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "transposed", "output_padding", "groups", "padding_mode",
                     "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(conv, attr))
        self.weight = conv.weight
        self.bias = conv.bias
        self.training = conv.training
        if algorithm != "auto":
            registry.get(algorithm)  # unknown names fail here, before anything runs
        self.requested = algorithm
        self.algorithm = algorithm
        self.fallback: str | None = None
        self.tuning: dict[str, Any] | None = None
        self._states: dict = {}  # (algorithm, spec) -> prepared weights (ops.memo.reuse)
        self._specs: dict[tuple, ConvSpec] = {}
        self._support: dict[tuple, str | None] = {}
        self._fast: tuple | None = None  # (input signature, bound call) of the last call
        left, right, top, bottom = explicit_padding(self)
        symmetric = self.padding_mode == "zeros" and left == right and top == bottom
        self._pads = None if symmetric else (left, right, top, bottom)
        self._pad_mode = "constant" if self.padding_mode == "zeros" else self.padding_mode

    def __getstate__(self) -> dict:
        """Prepared states are a cache (and packed oneDNN tensors cannot be copied):
        copies and pickles drop them; they are rebuilt on the next call."""
        state = self.__dict__.copy()
        state["_states"], state["_fast"] = {}, None
        return state

    # -- helpers -----------------------------------------------------------------------
    def _pre_pad(self, x: torch.Tensor) -> torch.Tensor:
        """Apply padding that is not symmetric zero padding, as nn.Conv2d does."""
        if self._pads is None:
            return x
        return F.pad(x, self._pads, mode=self._pad_mode)

    def spec_for(self, x: torch.Tensor) -> ConvSpec:
        """The :class:`ConvSpec` of this layer on input ``x`` (before padding)."""
        key = (tuple(x.shape), x.dtype, x.device.type, layout_of(x))
        spec = self._specs.get(key)
        if spec is None:
            spec = self._specs[key] = ConvSpec.from_conv(self, x)
        return spec

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    def _supported(self, alg: registry.Algorithm, spec: ConvSpec) -> str | None:
        key = (alg.name, spec)
        if key not in self._support:
            self._support[key] = alg.supports(spec)
        return self._support[key]

    def _state(self, alg: registry.Algorithm, spec: ConvSpec) -> Any:
        """``alg``'s prepared weights for ``spec``, kept while the parameters are
        unchanged (:func:`convgap.ops.memo.reuse`)."""
        def prepare():
            with torch.no_grad():
                return alg.prepare(self.weight, self.bias, spec)
        params = [p for p in self._parameters.values() if p is not None]
        return reuse(self._states, (alg.name, spec), params, prepare)

    def set_algorithm(self, name: str, reason: str | None = None) -> None:
        """Run ``name`` from now on (``reason``: why it differs from the request)."""
        registry.get(name)
        self.algorithm = name
        self.fallback = reason
        self.refresh()

    def refresh(self) -> None:
        """Drop the prepared state (packed weights). It follows every change PyTorch
        versions (in-place ops, ``load_state_dict``, optimizers, ``weight.data = t``), but
        not writes through ``weight.data.<op>_()``, which bypass the version counter: call
        this (or :func:`convgap.transforms.refresh`) after those."""
        self._states.clear()
        self._fast = None

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast
        if fast is not None:  # hot path: as the last call
            w, b = self._parameters["weight"], self._parameters.get("bias")
            if may_run_fast(x, (w, b)):
                key, call = fast
                if (key[0] == x.shape and key[1] == x.stride() and key[2] == x.dtype
                        and key[3] == x.device and key[4] is w and key[5] == w._version
                        and key[6] is b and (b is None or key[7] == b._version)):
                    return call(x)
        if self.algorithm == "auto":
            from .tuner import tune_layer
            tune_layer(self, x)
        if self.algorithm == "torch":
            return self._torch(x)
        alg = registry.get(self.algorithm)
        if exporting():
            if alg.exports != "native":
                return self._torch(x)
            spec = ConvSpec.from_conv(self, x)
            if alg.supports(spec) is not None:  # as in eager: this layer runs torch
                return self._torch(x)
            return alg.run(self._pre_pad(x), alg.prepare(self.weight, self.bias, spec), spec)
        grad = not may_run_fast(x, self._parameters.values())  # (not exporting: autograd)
        if grad and not alg.differentiable:
            return self._torch(x)
        spec = self.spec_for(x)
        reason = self._supported(alg, spec)
        if reason is not None:  # a new input the algorithm cannot take (e.g. another device)
            warnings.warn(f"{self.algorithm!r} cannot run {spec.short()}: {reason}; using "
                          "torch for this call", AlgorithmFallbackWarning, stacklevel=2)
            return self._torch(x)
        if grad:  # prepare inside the graph, so gradients reach the weight
            return alg.run(self._pre_pad(x), alg.prepare(self.weight, self.bias, spec), spec)
        state = self._state(alg, spec)
        run = alg.run
        if self._pads is None:
            def call(x: torch.Tensor) -> torch.Tensor:
                return run(x, state, spec)
        else:
            pads, mode = self._pads, self._pad_mode

            def call(x: torch.Tensor) -> torch.Tensor:
                return run(F.pad(x, pads, mode=mode), state, spec)
        w, b = self.weight, self.bias
        self._fast = ((x.shape, x.stride(), x.dtype, x.device, w, w._version, b,
                       None if b is None else b._version), call)
        return call(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + choice_repr(self)

    def to_conv2d(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` sharing this layer's parameters (undo the swap)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, self.bias is not None,
                         self.padding_mode, device="meta")
        conv.weight, conv.bias = self.weight, self.bias
        conv.train(self.training)
        return conv
