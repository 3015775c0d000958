"""Fused residual blocks: a whole block (batch-norm folded) run as few calls as it can be.

Each module holds the block's folded parameters as its own ``nn.Parameter`` s (so
``state_dict`` saves and loads them) and computes the block two ways:

- :meth:`reference`: the block's torch ops (``F.conv2d``, the activations, the add), used
  where a fast path must step aside (autograd, ``torch.jit.trace``, ONNX export,
  ``torch.compile``, another device or dtype): the same result, and training works;
- on a CUDA GPU (inference), the block's Triton kernels where it has them (inverted
  residual, ConvFirst; :mod:`convgap.kernels.triton.blocks`), fp32 / fp16 / bf16;
- the fast path (CPU, fp32, inference): one bound plan per input shape, built once and kept
  while the parameters are unchanged (:func:`convgap.ops.memo.reuse`), calling oneDNN with
  packed weights (:func:`convgap.ops.onednn.pack_conv`) in channels_last, every activation,
  bias and residual add done as the convolution's post-op; or, for an inverted residual,
  convgap's C kernel that keeps the expanded intermediate in cache (chosen by measurement,
  :mod:`convgap.choice`). A block is then one Python call and 1-4 native calls instead of
  10-15 modules.

Inputs in either memory format; outputs in channels_last on the fast path (values equal).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import choice, config
from ..algorithms.spec import explicit_padding
from ..kernels.cpu import pdp
from ..kernels.cpu import stem as stem_kernel
from ..kernels.cpu.common import ACTIVATIONS as KERNEL_ACTIVATIONS
from ..errors import ConvgapError
from ..kernels.triton import blocks as gpu_blocks
from ..kernels.triton import grouped as gpu_grouped
from ..ops import activations, onednn
from ..ops.layouts import layout_of
from ..ops.guard import may_run_fast, observed
from ..ops.memo import reuse
from ..ops.sizes import conv_length

__all__ = ["ConvWeights", "bind_conv", "bind_conv_add", "FusedBlock", "FusedConvChain", "FusedConvAct", "FusedInvertedResidual",
           "FusedBasicBlock", "FusedBottleneck", "FusedConvFirst", "FusedMBConv",
           "FusedConvNeXt", "FusedPoolLinear", "FusedStemBlock", "FUSED_BLOCKS"]

_conv_pw = torch.ops.mkldnn._convolution_pointwise.default
_conv_bin = torch.ops.mkldnn._convolution_pointwise.binary
_conv_sum = torch.ops.mkldnn._convolution_pointwise_.binary   # accumulates into `other`
_linear_pw = torch.ops.mkldnn._linear_pointwise.default
_linear_bin = torch.ops.mkldnn._linear_pointwise.binary
_CL = torch.channels_last


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` holding a copy of ``conv``'s geometry and (folded) parameters,
    always with a bias."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"fused blocks take zero padding, not {conv.padding_mode!r}")
    left, right, top, bottom = explicit_padding(conv)
    if left != right or top != bottom:
        raise ValueError("fused blocks take symmetric padding")
    c = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  (top, left), conv.dilation, conv.groups, True, device=conv.weight.device,
                  dtype=conv.weight.dtype)
    with torch.no_grad():
        c.weight.copy_(conv.weight)
        if conv.bias is not None:
            c.bias.copy_(conv.bias)
        else:
            c.bias.zero_()
    return c


@dataclass
class ConvWeights:
    """A convolution as :func:`bind_conv` takes it where no ``nn.Conv2d`` holds it (e.g.
    batch-norm folded weights, or slices of them): weight (O, C/groups, kh, kw), bias (O,),
    symmetric zero padding (ph, pw), stride, dilation, groups."""

    weight: torch.Tensor
    bias: torch.Tensor
    padding: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:])

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


def _packed(conv: nn.Conv2d | ConvWeights, shape: Sequence[int]) -> tuple:
    """``conv``'s oneDNN operands for a channels_last input of ``shape``: the weight
    packed now, the bias, padding, stride, dilation, groups."""
    pad, stride, dil = list(conv.padding), list(conv.stride), list(conv.dilation)
    w = onednn.pack_conv(conv.weight, pad, stride, dil, conv.groups, shape)
    return w, conv.bias.detach(), pad, stride, dil, conv.groups


def _out_shape(conv: nn.Conv2d | ConvWeights, shape: Sequence[int]) -> tuple[int, int, int, int]:
    n, _, h, w = shape
    (ph, pw), (sh, sw), (dh, dw) = conv.padding, conv.stride, conv.dilation
    kh, kw = conv.kernel_size
    return (n, conv.out_channels, conv_length(h, kh, sh, (ph, ph), dh),
            conv_length(w, kw, sw, (pw, pw), dw))


def bind_conv(conv: nn.Conv2d | ConvWeights, shape: Sequence[int], act: str | None
              ) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple]:
    """A call running ``conv`` (with a bias) + ``act`` on a channels_last input of
    ``shape`` on oneDNN (weight packed now), and its output shape. The packed weight
    serves inputs of any batch size (the call is exact for them; oneDNN picks its layout
    from the channels and the geometry)."""
    w, b, pad, stride, dil, groups = _packed(conv, shape)
    attr, scalars, alg = activations.post_op(act)

    def call(x: torch.Tensor) -> torch.Tensor:
        return _conv_pw(x, w, b, pad, stride, dil, groups, attr, scalars, alg)
    return call, _out_shape(conv, shape)


def bind_conv_add(conv: nn.Conv2d | ConvWeights, shape: Sequence[int], post: str | None,
                  into_other: bool = False
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A call ``(x, other) -> post(conv(x) + other)`` on oneDNN (binary add post-op, then
    the activation). ``into_other``: the result is written into ``other`` (oneDNN's sum
    post-op, which accumulates into the output buffer: 1x1 64 -> 256 at 56 x 56, batch 8,
    2.6-3.0 ms against 3.7 for the binary add, which reads ``other`` as a second input and
    writes a new tensor); only for an ``other`` the caller made and nobody else holds,
    channels_last like the output."""
    w, b, pad, stride, dil, groups = _packed(conv, shape)
    attr, scalars, alg = activations.post_op(post)
    if post is None or attr == "relu":
        unary = None if post is None else attr
        if into_other:
            def accumulate(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
                _conv_sum(other, x, w, b, pad, stride, dil, groups, "add", None, unary,
                          scalars, alg)
                return other
            return accumulate

        def call(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            return _conv_bin(x, other, w, b, pad, stride, dil, groups, "add", None, unary,
                             scalars, alg)
        return call
    # oneDNN fuses only relu after a binary add ("Unary Fusion behavior undefined"
    # otherwise): the add as a post-op, the activation after it
    _, none_scalars, none_alg = activations.post_op(None)

    def call_then_act(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return activations.apply(post, _conv_bin(x, other, w, b, pad, stride, dil, groups,
                                                 "add", None, None, none_scalars, none_alg))
    return call_then_act


class FusedBlock(nn.Module, abc.ABC):
    """Base of the fused blocks: the dispatch between the fast path and :meth:`reference`.
    Subclasses define ``reference(x)`` and ``_bind(x) -> callable`` (the fast path for
    inputs of ``x``'s shape and strides), and set ``pattern`` (the block pattern's name)."""

    pattern = "block"
    block_kind: str | None = None  # the block kind analyze reports (convgap.blocks)

    def __init__(self) -> None:
        super().__init__()
        self._store: dict = {}
        self._params_list: list[torch.Tensor] | None = None

    def __getstate__(self) -> dict:
        """Bound plans hold packed oneDNN tensors (not copyable): copies and pickles drop
        them; they are rebuilt on the next call."""
        state = self.__dict__.copy()
        state["_store"], state["_params_list"] = {}, None
        return state

    def refresh(self) -> None:
        """Drop the bound plans (packed weights): after writes through
        ``weight.data.<op>_()``, which bypass the version counter."""
        self._store.clear()
        self._params_list = None

    def _params(self) -> list[torch.Tensor]:
        """The parameters (listed once: the plans' memo key and the fast-path guard)."""
        params = self._params_list
        if params is None:
            params = self._params_list = list(self.parameters())
        return params

    def fast_path_ok(self, x: torch.Tensor) -> bool:
        """May the fast path run on ``x``: a 4-D fp32 CPU tensor, oneDNN on, nothing
        needing a gradient, no graph being recorded, no mode watching the ops
        (:func:`convgap.ops.guard.observed`)."""
        params = self._params()
        return (x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
                and onednn.AVAILABLE and torch.backends.mkldnn.enabled
                and params[0].dtype == torch.float32 and may_run_fast(x, params)
                and not observed())

    def gpu_call(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The block's Triton kernel call for inputs like ``x`` (a CUDA tensor, or any
        under ``TRITON_INTERPRET=1``), or None where the block has none or it does not
        apply (:func:`convgap.kernels.triton.blocks.supports`)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            params = self._params()
            if may_run_fast(x, params) and not observed():
                run = reuse(self._store, "gpu", params, lambda: self.gpu_call(x) or False,
                            (x.shape, x.stride(), x.dtype))
                if run:
                    return run(x)
            return self.reference(x)
        if not self.fast_path_ok(x):
            return self.reference(x)
        run = reuse(self._store, "plan", self._params_list, lambda: self._bind(x),
                    (x.shape, x.stride()))
        return run(x)

    @abc.abstractmethod
    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The block as torch ops (autograd, tracing, export, count, other devices)."""

    KIND = "fused_block"  # the measured choice's kind for this block's fast paths
    kernel_choice: str | None = None  # what the last bound plan runs ('onednn', 'kernel', ...)
    kernel_times: dict | None = None  # the choice's measured seconds per fast path

    def _choose(self, x: torch.Tensor, runs: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                shapes: tuple) -> Callable[[torch.Tensor], torch.Tensor]:
        """The fastest of the block's fast paths ``runs`` (name -> call; the first, the
        oneDNN path, is the incumbent) on inputs like ``x``: the one measured choice
        (:mod:`convgap.choice`: each other path verified against the first, kept only past
        the margin), recorded in ``kernel_choice``."""
        key = self.choice_key(tuple(x.shape), layout_of(x), shapes)
        cands = [choice.Candidate(name, lambda run=run: run(x), 1e-5 if i else 1e-4)
                 for i, (name, run) in enumerate(runs.items())]
        decision = choice.choose(cands, kind=self.KIND, spec_key=key, device=x.device.type,
                                 rounds=config.KERNEL_ROUNDS, confirm=config.KERNEL_ROUNDS)
        name = decision.choice
        self.kernel_choice, self.kernel_times = name, dict(decision.times)
        return runs[name]

    def choice_key(self, shape: tuple[int, ...], layout: str, shapes: tuple = ()) -> tuple:
        """The measured choice's key for an input of ``shape`` in ``layout`` ('nchw' or
        'channels_last'; ``shapes``: those of its other inputs)."""
        return (tuple(shape), layout, self.spec(), shapes)

    def stored_choice(self, shape: tuple[int, ...], layout: str) -> str | None:
        """The fast path this device has chosen for an input of ``shape`` and ``layout``
        (:mod:`convgap.choice`'s stored decision, under the current thread count and malloc
        policy), or None where it has not measured one yet."""
        entry = choice.lookup(choice.cache_key(f"{self.KIND}|{self.choice_key(shape, layout)}"))
        return None if entry is None else entry["choice"]

    def spec(self) -> str:
        """What the block computes, for the measured choice's key (its repr)."""
        return repr(self)

    @abc.abstractmethod
    def _bind(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The fast path for inputs of ``x``'s shape and strides (CPU, fp32, inference)."""


class FusedConvChain(FusedBlock):
    """Convolutions in sequence, each followed by its activation (or none), an optional
    shortcut added to the last convolution's output (``"identity"``: the block input; or a
    convolution of it), and an activation after the add (``post``). ResNet basic and
    bottleneck blocks, inverted residuals, ConvFirst blocks and conv + BN + act stems are
    all this shape once batch-norm is folded.

    ``convs``: the (folded) ``nn.Conv2d`` s in order (symmetric zero padding); ``acts``:
    one activation name (:data:`convgap.ops.activations.ACTIVATIONS`) or None per conv
    (the last None when there is a shortcut: the activation after the add is ``post``);
    ``shortcut``: None, ``"identity"`` or an ``nn.Conv2d``. Parameters are copied."""

    pattern = "conv_chain"

    def __init__(self, convs: Sequence[nn.Conv2d], acts: Sequence[str | None],
                 shortcut: nn.Conv2d | str | None = None, post: str | None = None) -> None:
        super().__init__()
        if len(convs) != len(acts) or not convs:
            raise ValueError("one activation (or None) per convolution, at least one")
        for a in list(acts) + [post]:
            if a is not None and a not in activations.ACTIVATIONS:
                raise ValueError(f"unknown activation {a!r}; known: "
                                 f"{sorted(activations.ACTIVATIONS)}")
        if shortcut is not None and acts[-1] is not None:
            raise ValueError("with a shortcut the last convolution's activation comes after "
                             "the add: pass it as post")
        if shortcut is None and post is not None:
            raise ValueError("post applies after the shortcut's add: without a shortcut use "
                             "the last convolution's activation")
        self.convs = nn.ModuleList(_plain_conv(c) for c in convs)
        self.acts = list(acts)
        self.identity = shortcut == "identity"
        self.shortcut = _plain_conv(shortcut) if isinstance(shortcut, nn.Conv2d) else None
        self.post = post

    def extra_repr(self) -> str:
        short = "identity" if self.identity else "conv" if self.shortcut is not None else "none"
        return f"pattern={self.pattern}, acts={self.acts}, shortcut={short}, post={self.post}"

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv, act in zip(self.convs, self.acts):
            h = activations.apply(act, conv(h))
        if self.identity:
            h = h + x
        elif self.shortcut is not None:
            h = h + self.shortcut(x)
        return activations.apply(self.post, h)

    def _bind(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        shape = tuple(x.shape)
        calls = []
        for conv, act in zip(self.convs[:-1], self.acts[:-1]):
            call, shape = bind_conv(conv, shape, act)
            calls.append(call)
        last = self.convs[-1]
        if not (self.identity or self.shortcut is not None):
            call, _ = bind_conv(last, shape, self.acts[-1])
            calls.append(call)

            def run(x: torch.Tensor) -> torch.Tensor:
                h = x.contiguous(memory_format=_CL)
                for c in calls:
                    h = c(h)
                return h
            return run
        short = None if self.identity else bind_conv(self.shortcut, tuple(x.shape), None)[0]
        # a projection's output is the block's own: the last conv accumulates into it
        add = bind_conv_add(last, shape, self.post, into_other=short is not None)

        def run_residual(x: torch.Tensor) -> torch.Tensor:
            x = x.contiguous(memory_format=_CL)
            h = x
            for c in calls:
                h = c(h)
            return add(h, x if short is None else short(x))
        return run_residual


class FusedConvAct(FusedConvChain):
    """A convolution (+ folded batch-norm) + activation: a stem or a head conv."""
    pattern = "conv_act"


class FusedBasicBlock(FusedConvChain):
    """ResNet basic block: kxk conv + ReLU, kxk conv, + shortcut, ReLU."""
    block_kind = "basic"
    pattern = "basic"


class FusedBottleneck(FusedConvChain):
    """ResNet bottleneck: 1x1 + ReLU, kxk (grouped for ResNeXt) + ReLU, 1x1, + shortcut,
    ReLU."""
    block_kind = "bottleneck"
    pattern = "bottleneck"


class FusedConvFirst(FusedConvChain):
    """ConvFirst block: grouped 3x3, 1x1 expand + SiLU, 1x1 project, + x. On a GPU, the
    grouped conv (cuDNN's, or convgap's Triton kernel on tensor cores where it applies:
    whichever measures faster on the first input, the one measured choice) and one Triton
    launch for the 1x1 pair (:func:`convgap.kernels.triton.blocks.convfirst`)."""
    block_kind = "convfirst"
    pattern = "convfirst"

    def gpu_call(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        g, expand, project = self.convs
        e, c = expand.weight.shape[:2]
        if tuple(g.stride) != (1, 1) or tuple(g.dilation) != (1, 1) or \
                tuple(g.padding) != (g.kernel_size[0] // 2, g.kernel_size[1] // 2):
            return None
        ops = (g.weight.detach(), g.bias.detach(), expand.weight.detach().reshape(e, c),
               expand.bias.detach(), project.weight.detach().reshape(c, e),
               project.bias.detach())
        if gpu_blocks.supports("convfirst", x, *ops, act=self.acts[1]) is not None:
            return None
        act = self.acts[1]

        def run(diagonal: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda x: gpu_blocks.convfirst(x, *ops, act=act, w1_diagonal=diagonal)
        runs = {"cudnn_grouped": run(None)}
        if x.is_cuda:    # (under the interpreter: cuDNN's path, torch's conv on the CPU)
            try:
                runs["triton_grouped"] = run(gpu_grouped.block_diagonal(ops[0]))
            except ConvgapError:     # no chunk width fits the group width
                pass
        return self._choose(x, runs, ()) if len(runs) > 1 else runs["cudnn_grouped"]


class FusedInvertedResidual(FusedConvChain):
    """MobileNetV2 inverted residual: 1x1 expand + act, depthwise + act, 1x1 project
    (+ x when shapes allow); the no-expand variant starts at the depthwise conv.

    Two fast paths, chosen per input shape by measurement (:mod:`convgap.choice`, kind
    'fused_inverted_residual', the oneDNN chain the incumbent): the oneDNN chain of
    :class:`FusedConvChain`, and convgap's C kernel (:func:`convgap.kernels.cpu.pdp.bind`),
    one pass over bands of output rows with the expanded intermediate (6x the block's
    width) kept in each thread's cache-sized scratch, the activations, biases and the
    residual add in its epilogues (AVX-512 CPUs; with three convolutions and activations
    it knows)."""
    block_kind = "inverted_residual"
    pattern = "inverted_residual"
    KIND = "fused_inverted_residual"

    def _kernel(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The C kernel bound to inputs like ``x``, or None where it does not apply (the
        no-expand variant without its first 1x1: the depthwise step reads x's rows)."""
        acts = self.acts[-3:-1] if len(self.convs) == 3 else ["none", self.acts[0]]
        if len(self.convs) not in (2, 3) or not pdp.available() or any(
                a not in KERNEL_ACTIVATIONS for a in acts):
            return None
        dw, project = self.convs[-2:]
        r = dw.out_channels
        store = self._store.setdefault("kernel", {})
        with torch.no_grad():
            if len(self.convs) == 3:
                expand = self.convs[0]
                a, bias1 = expand.weight.detach().reshape(r, -1).t(), expand.bias.detach()
            else:  # no expansion: the kernel's depthwise step reads x
                a, bias1 = None, None
            d = dw.weight.detach().reshape(r, *dw.kernel_size)
            b = project.weight.detach().reshape(project.out_channels, r)
        return pdp.bind(x, a, d, b, project.bias.detach(), tuple(dw.stride),
                        tuple(dw.padding), tuple(dw.dilation), store, False, bias1,
                        bias2=dw.bias.detach(), act1=acts[0], act2=acts[1],
                        residual=self.identity)

    def gpu_call(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if len(self.convs) == 3:
            expand, dw, project = self.convs
            r, c = expand.weight.shape[:2]
            a, bias1 = expand.weight.detach().reshape(r, c).t(), expand.bias.detach()
        elif len(self.convs) == 2:
            (dw, project), a, bias1 = self.convs, None, None
            r = dw.out_channels
        else:
            return None
        if self.acts[0] != self.acts[-2] or tuple(dw.padding)[0] != tuple(dw.padding)[1] \
                or tuple(dw.stride)[0] != tuple(dw.stride)[1] or tuple(dw.dilation) != (1, 1):
            return None
        ops = (a, bias1, dw.weight.detach().reshape(r, *dw.kernel_size), dw.bias.detach(),
               project.weight.detach().reshape(project.out_channels, r),
               project.bias.detach())
        opts = dict(stride=dw.stride[0], padding=dw.padding[0], act=self.acts[0],
                    residual=self.identity)
        if gpu_blocks.supports("inverted_residual", x, *ops, **opts) is not None:
            return None
        return lambda x: gpu_blocks.inverted_residual(x, *ops, **opts)

    def _bind(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        chain = super()._bind(x)
        kernel = self._kernel(x)
        if kernel is None:
            return chain
        return self._choose(x, {"onednn": chain, "kernel": kernel},
                            tuple(tuple(c.weight.shape) for c in self.convs))


class FusedMBConv(FusedBlock):
    """EfficientNet MBConv: [1x1 expand + act], depthwise + act, squeeze-excitation
    (global mean, 1x1 reduce + act, 1x1 expand + gate), 1x1 project (+ x).

    Two passes, as the squeeze needs the whole depthwise output before the projection:
    pass 1 runs the expansion and the depthwise conv and writes the depthwise output once;
    the squeeze (a mean and two tiny GEMMs) follows; pass 2 scales that output by the gate
    and runs the projection with the residual add. Three fast paths, chosen per input shape
    by measurement (:mod:`convgap.choice`, kind 'fused_mbconv'):

    - 'onednn': every step on oneDNN, activations and the residual add as post-ops (five
      native calls);
    - 'kernel': pass 1 as convgap's C kernel keeping the expansion in cache, the rest as
      'onednn';
    - 'block': the whole block as one call of the C kernel (both passes in one parallel
      region, each thread's pass 2 reading the rows it wrote in pass 1; the gate computed
      between them): the batch-1 path, where five native calls cost more than the
      arithmetic."""

    block_kind = "mbconv"
    pattern = "mbconv"
    KIND = "fused_mbconv"

    def __init__(self, expand: nn.Conv2d | None, act: str, depthwise: nn.Conv2d,
                 dw_act: str, reduce: nn.Conv2d, se_act: str, unreduce: nn.Conv2d,
                 gate: str, project: nn.Conv2d, residual: bool) -> None:
        super().__init__()
        self.expand = None if expand is None else _plain_conv(expand)
        self.depthwise = _plain_conv(depthwise)
        self.reduce = _plain_conv(reduce)
        self.unreduce = _plain_conv(unreduce)
        self.project = _plain_conv(project)
        self.act, self.dw_act, self.se_act, self.gate = act, dw_act, se_act, gate
        self.residual = residual

    def extra_repr(self) -> str:
        return (f"pattern={self.pattern}, act={self.act}, se_act={self.se_act}, "
                f"gate={self.gate}, residual={self.residual}")

    def _gate(self, v: torch.Tensor) -> torch.Tensor:
        """The squeeze-excitation gate (N, R) of the depthwise output ``v``."""
        s = v.mean((2, 3))
        r, u = self.reduce, self.unreduce
        s = activations.apply(self.se_act, F.linear(s, r.weight.flatten(1), r.bias))
        return activations.apply(self.gate, F.linear(s, u.weight.flatten(1), u.bias))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.expand is None else activations.apply(self.act, self.expand(x))
        v = activations.apply(self.dw_act, self.depthwise(h))
        y = self.project(v * self._gate(v)[:, :, None, None])
        return y + x if self.residual else y

    def _bind(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        shape = tuple(x.shape)
        expand = None
        if self.expand is not None:
            expand, shape = bind_conv(self.expand, shape, self.act)
        dw, shape = bind_conv(self.depthwise, shape, self.dw_act)
        r, u = self.reduce, self.unreduce
        # the squeeze's two GEMMs on oneDNN, weights packed for N rows, their activations
        # as post-ops: three calls (mean, two linears) where torch needs five
        n = shape[0]
        rw = onednn.pack_linear(r.weight.flatten(1), n, torch.float32)
        uw = onednn.pack_linear(u.weight.flatten(1), n, torch.float32)
        rb, ub = r.bias.detach(), u.bias.detach()
        se_op, gate_op = activations.post_op(self.se_act), activations.post_op(self.gate)
        if self.residual:
            add = bind_conv_add(self.project, shape, None)
        else:
            project, _ = bind_conv(self.project, shape, None)

        def squeeze_project(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            s = _linear_pw(_linear_pw(v.mean((2, 3)), rw, rb, *se_op), uw, ub, *gate_op)
            v.mul_(s[:, :, None, None])
            return add(v, x) if self.residual else project(v)

        def run(x: torch.Tensor) -> torch.Tensor:
            x = x.contiguous(memory_format=_CL)
            return squeeze_project(x, dw(x if expand is None else expand(x)))

        runs = {"onednn": run}
        xc = x.contiguous(memory_format=_CL)
        first = self._first_pass(xc)
        if first is not None:
            def run_kernel(x: torch.Tensor) -> torch.Tensor:
                x = x.contiguous(memory_format=_CL)
                return squeeze_project(x, first(x))
            runs["kernel"] = run_kernel
        whole = self._block(xc)
        if whole is not None:
            runs["block"] = lambda x: whole(x.contiguous(memory_format=_CL))
        if len(runs) == 1:
            return run
        return self._choose(x, runs, (tuple(self.depthwise.weight.shape),
                                      tuple(self.project.weight.shape)))

    def _kernel_ok(self) -> bool:
        return pdp.available() and all(a in KERNEL_ACTIVATIONS for a in (
            self.act, self.dw_act, self.se_act, self.gate))

    def _first_pass(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The first pass (expansion and depthwise conv with their activations) as
        convgap's C kernel (:func:`convgap.kernels.cpu.pdp.bind` without its last 1x1),
        bound to inputs like ``x``; None where it does not apply."""
        if self.expand is None or not self._kernel_ok():
            return None
        e, dw = self.expand, self.depthwise
        r, c = e.weight.shape[:2]
        a = e.weight.detach().reshape(r, c).t()
        d = dw.weight.detach().reshape(r, *dw.kernel_size)
        return pdp.bind(x, a, d, None, None, tuple(dw.stride), tuple(dw.padding),
                        tuple(dw.dilation), self._store.setdefault("kernel", {}), False,
                        e.bias.detach(), bias2=dw.bias.detach(), act1=self.act,
                        act2=self.dw_act)

    def _block(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The whole block as one call of convgap's C kernel (:func:`convgap.kernels.cpu.pdp.bind`
        with a :class:`~convgap.kernels.cpu.pdp.Squeeze`: both passes and the gate in one
        parallel region), bound to inputs like ``x``; without an expansion the depthwise
        step reads x's rows. None where it does not apply."""
        if not self._kernel_ok():
            return None
        dw, p, rd, ud = self.depthwise, self.project, self.reduce, self.unreduce
        r = dw.out_channels
        store = self._store.setdefault("block", {})
        if self.expand is None:  # the kernel's depthwise step reads x
            a, bias1, act = None, None, "none"
        else:
            a, bias1, act = self.expand.weight.detach().reshape(r, -1).t(), \
                self.expand.bias.detach(), self.act
        squeeze = pdp.Squeeze(rd.weight.detach().flatten(1), rd.bias.detach(),
                              ud.weight.detach().flatten(1), ud.bias.detach(), self.se_act,
                              self.gate)
        return pdp.bind(x, a, dw.weight.detach().reshape(r, *dw.kernel_size),
                        p.weight.detach().flatten(1), p.bias.detach(), tuple(dw.stride),
                        tuple(dw.padding), tuple(dw.dilation), store, False, bias1,
                        bias2=dw.bias.detach(), act1=act, act2=self.dw_act,
                        residual=self.residual, squeeze=squeeze)


class FusedStemBlock(FusedBlock):
    """A network's stem and the block after it as one module: ``first`` a
    :class:`FusedConvAct` (a conv + act from an image's few channels), ``block`` the fused
    block its output feeds, without expansion or residual: a :class:`FusedInvertedResidual`
    (depthwise + act, 1x1: MobileNetV2's first block) or a :class:`FusedMBConv` (depthwise +
    act, squeeze-excitation, 1x1: EfficientNet's). ``first(x)`` then ``block(...)`` is the
    reference (and the oneDNN fast path: each module's own).

    Two fast paths, chosen per input shape by measurement (kind 'fused_stem_block', the two
    modules' own the incumbent): those, and convgap's C kernel (:mod:`convgap.kernels.cpu.
    stem`): one pass over bands of output rows, the stem's output (R channels at half the
    image's side) kept in each thread's cache and never written, the stem computed as
    broadcasts of the image's values into its R channels, x read in place; with the
    squeeze-excitation, the depthwise output written once and read back by the thread that
    wrote it (AVX-512 CPUs)."""
    pattern = "stem_block"
    KIND = "fused_stem_block"

    def __init__(self, first: FusedConvAct, block: FusedInvertedResidual | FusedMBConv
                 ) -> None:
        super().__init__()
        if not isinstance(first, FusedConvAct) or len(first.convs) != 1:
            raise ValueError("first must be a FusedConvAct of one convolution")
        if isinstance(block, FusedInvertedResidual):
            if len(block.convs) != 2 or block.identity or block.shortcut is not None:
                raise ValueError("the inverted residual must have no expansion and no "
                                 "residual")
        elif isinstance(block, FusedMBConv):
            if block.expand is not None or block.residual:
                raise ValueError("the MBConv must have no expansion and no residual")
        else:
            raise ValueError("block must be a FusedInvertedResidual or a FusedMBConv")
        self.first, self.block = first, block

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.reference(self.first.reference(x))

    def body(self) -> stem_kernel.StemBody:
        """The kernel's operands (the folded weights, as views)."""
        conv, blk = self.first.convs[0], self.block
        if isinstance(blk, FusedMBConv):
            dw, last, act2 = blk.depthwise, blk.project, blk.dw_act
            r, u = blk.reduce, blk.unreduce
            squeeze = pdp.Squeeze(r.weight.detach().flatten(1), r.bias.detach(),
                                  u.weight.detach().flatten(1), u.bias.detach(), blk.se_act,
                                  blk.gate)
        else:
            (dw, last), act2, squeeze = blk.convs, blk.acts[0], None
        return stem_kernel.StemBody(
            conv.weight.detach(), conv.bias.detach(), dw.weight.detach(), dw.bias.detach(),
            last.weight.detach().reshape(last.out_channels, last.in_channels),
            last.bias.detach(), conv.stride[0], self.first.acts[0], act2, squeeze)

    def _kernel(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The C kernel bound to inputs like ``x``, or None where it does not apply."""
        conv = self.first.convs[0]
        blk = self.block
        dw, last = (blk.depthwise, blk.project) if isinstance(blk, FusedMBConv) else blk.convs
        square = all(c.stride[0] == c.stride[1] and c.padding[0] == c.padding[1] ==
                     c.kernel_size[0] // 2 and c.kernel_size[0] == c.kernel_size[1] and
                     tuple(c.dilation) == (1, 1) for c in (conv, dw))
        if (not stem_kernel.available() or not square or conv.groups != 1
                or dw.groups != dw.in_channels or tuple(dw.stride) != (1, 1)
                or last.kernel_size != (1, 1)
                or tuple(last.stride) != (1, 1)):
            return None
        body = self.body()
        if stem_kernel.supports(body) is not None:   # channels, sides, activations
            return None
        return stem_kernel.bind(x, body, self._store.setdefault("kernel", {}))

    def _bind(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        first, block = self.first, self.block

        def modules(x: torch.Tensor) -> torch.Tensor:
            return block(first(x))
        kernel = self._kernel(x)
        if kernel is None:
            return modules
        return self._choose(x, {"modules": modules, "kernel": kernel},
                            tuple(tuple(p.shape) for p in self._params()))


class FusedConvNeXt(FusedBlock):
    """ConvNeXt block: depthwise kxk, LayerNorm over channels, Linear x4 + GELU, Linear,
    layer scale (folded into the last Linear), + x. Fast path: the depthwise conv on
    oneDNN in channels_last (whose NHWC view is the Linear layers' input as it is), the
    GELU and the residual add as the Linear calls' post-ops."""

    block_kind = "convnext"
    pattern = "convnext"

    def __init__(self, depthwise: nn.Conv2d, norm: nn.LayerNorm, fc1: nn.Linear, act: str,
                 fc2: nn.Linear, scale: torch.Tensor | None) -> None:
        super().__init__()
        self.depthwise = _plain_conv(depthwise)
        self.norm = nn.LayerNorm(norm.normalized_shape, norm.eps,
                                 elementwise_affine=norm.weight is not None,
                                 bias=norm.bias is not None)
        self.norm.load_state_dict(norm.state_dict())
        self.fc1 = nn.Linear(fc1.in_features, fc1.out_features)
        self.fc2 = nn.Linear(fc2.in_features, fc2.out_features)
        with torch.no_grad():
            self.fc1.weight.copy_(fc1.weight)
            self.fc1.bias.copy_(fc1.bias if fc1.bias is not None else 0)
            g = torch.ones(fc2.out_features) if scale is None else scale.detach().reshape(-1)
            self.fc2.weight.copy_(fc2.weight * g[:, None])
            self.fc2.bias.copy_((fc2.bias if fc2.bias is not None else 0) * g)
        self.act = act

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, act={self.act}"

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)
        h = activations.apply(self.act, self.fc1(self.norm(h)))
        return self.fc2(h).permute(0, 3, 1, 2) + x

    def _bind(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        dw, shape = bind_conv(self.depthwise, tuple(x.shape), None)
        rows = shape[0] * shape[2] * shape[3]
        w1 = onednn.pack_linear(self.fc1.weight, rows, torch.float32)
        w2 = onednn.pack_linear(self.fc2.weight, rows, torch.float32)
        b1, b2 = self.fc1.bias.detach(), self.fc2.bias.detach()
        attr, scalars, alg = activations.post_op(self.act)
        norm = self.norm
        nshape, nw, nb, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
        nw = None if nw is None else nw.detach()
        nb = None if nb is None else nb.detach()

        def run(x: torch.Tensor) -> torch.Tensor:
            x = x.contiguous(memory_format=_CL)
            h = F.layer_norm(dw(x).permute(0, 2, 3, 1), nshape, nw, nb, eps)
            h = _linear_pw(h, w1, b1, attr, scalars, alg)
            return _linear_bin(h, x.permute(0, 2, 3, 1), w2, b2, "add").permute(0, 3, 1, 2)
        return run


class FusedPoolLinear(FusedBlock):
    """A classifier head: global average pool, flatten, dropout (``p``, training only),
    linear: ``linear(dropout(x.mean((2, 3))))``, (N, C, H, W) -> (N, out_features).

    At batch 1 the linear is a matrix-vector product streaming the whole weight (5 MB for
    1280 -> 1000), which by the time the head runs has left the cache: torch's ``addmm``
    reads it at about 16 GB/s here, oneDNN's linear with the weight packed once for the
    row count at about 45 GB/s; and the pool, flatten, dropout and linear are four module
    calls. Fast path: the mean and one oneDNN linear call (weight packed for N rows)."""

    pattern = "pool_linear"

    def __init__(self, linear: nn.Linear, p: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(linear.in_features, linear.out_features,
                                device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(linear.weight)
            if linear.bias is None:
                self.linear.bias.zero_()
            else:
                self.linear.bias.copy_(linear.bias)
        self.p = float(p)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, p={self.p}"

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        s = F.dropout(x.mean((2, 3)), self.p, self.training)
        return self.linear(s)

    def _bind(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        w = onednn.pack_linear(self.linear.weight, x.shape[0], torch.float32)
        b = self.linear.bias.detach()
        return lambda x: _linear_pw(x.mean((2, 3)), w, b, "none", [], "")


FUSED_BLOCKS = (FusedConvChain, FusedConvAct, FusedInvertedResidual, FusedBasicBlock,
                FusedBottleneck, FusedConvFirst, FusedMBConv, FusedConvNeXt, FusedPoolLinear,
                FusedStemBlock)
