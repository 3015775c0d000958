"""Per-layer and per-block arithmetic and memory traffic of a network.

:func:`count` runs one forward pass with hooks on every module and returns a
:class:`Counts`: a :class:`LayerCount` per leaf-module *call*, a :class:`BlockCount` per
block call, and model totals. Blocks are residual and dense blocks found by structure in
that same pass (:mod:`convgap.blocks`; a ``block_kind`` class attribute or a well-known
class name is a hint), and ``Counts.unclassified`` names the top-level modules with
convolutions in which no block was found.

Units: MACs are multiply-accumulates (FLOPs = 2 x MACs); bytes are bytes. MACs of
convolutions (any groups, transposed too) and linear layers come from closed formulas;
leaf types without a formula take torch's ``FlopCounterMode`` count, and work done by
functional code outside leaf modules (a ``torch.matmul`` in a custom forward) is reported as
``unattributed_macs`` so totals always equal what torch counts.

Minimum bytes of a layer = its weights (parameters and floating buffers) + its tensor inputs +
its tensor outputs, each moved once. A block's *fused* bytes = block input + all its weights +
block output; its *layer-wise* bytes = the sum of its layers' minimum bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .blocks import Recorder, block_kind, tensors, unclassified
from .errors import ConvgapError

__all__ = ["LayerCount", "BlockCount", "Counts", "count", "trace", "Trace", "block_kind",
           "check_input", "detached_copy", "tensors", "parameter_count", "weight_owner"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TCONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Leaf types whose MACs are zero under torch's counter (elementwise, norm, pool, reshape).
_ZERO_MAC = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
             nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
             nn.Hardsigmoid, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Mish, nn.Softmax, nn.Identity,
             nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Unflatten,
             nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
             nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
             nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
             nn.ReplicationPad2d, nn.ChannelShuffle, nn.PixelShuffle)


def _nbytes(ts: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _shape(obj: Any) -> tuple[int, ...] | list:
    ts = tensors(obj)
    if len(ts) == 1:
        return tuple(ts[0].shape)
    return [tuple(t.shape) for t in ts]


def weight_owner(module: nn.Module) -> nn.Module:
    """The module whose parameters and buffers are ``module``'s weights: itself, or what
    its ``parameter_owner()`` names (a :class:`~convgap.layers.FusedNetwork`'s folded
    model: its block-fused copy holds the same values a second time)."""
    owner = getattr(module, "parameter_owner", None)
    return owner() if callable(owner) else module


def parameter_count(module: nn.Module) -> int:
    """``module``'s parameters (elements), each network weight once (:func:`weight_owner`)."""
    return sum(p.numel() for p in weight_owner(module).parameters())


def _weights(module: nn.Module) -> list[torch.Tensor]:
    module = weight_owner(module)
    own = list(module.parameters(recurse=True))
    own += [b for b in module.buffers(recurse=True) if b.is_floating_point()]
    return own


def formula_macs(module: nn.Module, inputs: Sequence[Any], output: Any) -> int | None:
    """MACs of one call of a leaf module by closed formula; None if its type has none."""
    if isinstance(module, _CONVS):
        out = tensors(output)[0]
        k = math.prod(module.kernel_size)
        return out.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, _TCONVS):
        x = tensors(inputs)[0]
        k = math.prod(module.kernel_size)
        return x.numel() * (module.out_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        x = tensors(inputs)[0]
        return x.numel() * module.out_features
    if isinstance(module, nn.Bilinear):
        x = tensors(inputs)[0]
        rows = x.numel() // module.in1_features
        return rows * module.in1_features * module.in2_features * module.out_features
    if isinstance(module, _ZERO_MAC):
        return 0
    return None


class _Traffic:
    """FLOPs, minimum bytes and intensity from ``macs``, ``weight_bytes``,
    ``act_in_bytes`` and ``act_out_bytes`` (shared by layer, block and model counts)."""

    macs: int
    weight_bytes: int
    act_in_bytes: int
    act_out_bytes: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def min_bytes(self) -> int:
        """Weights + inputs + outputs, each moved once (bytes)."""
        return self.weight_bytes + self.act_in_bytes + self.act_out_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte of minimum traffic."""
        return self.flops / self.min_bytes if self.min_bytes else 0.0


@dataclass
class LayerCount(_Traffic):
    """One call of a leaf module. MACs; bytes; ``params`` counts each parameter once per
    model (0 on a module's repeated calls), ``weight_bytes`` what this call reads."""

    name: str
    type: str
    input_shape: Any
    output_shape: Any
    macs: int
    params: int
    weight_bytes: int
    act_in_bytes: int
    act_out_bytes: int
    block: str | None = None
    macs_source: str = "formula"


@dataclass
class BlockCount(_Traffic):
    """One call of a block; ``layers`` are the names of the layer calls inside it."""

    name: str
    kind: str
    type: str
    input_shape: Any
    output_shape: Any
    macs: int
    params: int
    weight_bytes: int
    act_in_bytes: int
    act_out_bytes: int
    layerwise_bytes: int
    layers: list[str] = field(default_factory=list)
    shortcut: list[str] = field(default_factory=list)  # layer calls on the shortcut path
    found_by: str = "structure"  # or 'hint': a block_kind attribute or well-known class

    @property
    def fused_bytes(self) -> int:
        """Traffic of the block run as one kernel: input + weights + output (bytes)."""
        return self.min_bytes


@dataclass
class Counts(_Traffic):
    """Counts of a whole model for one input shape. ``macs`` is torch's total (layers +
    unattributed functional work); ``min_bytes`` is model input + all weights + output."""

    input_shape: tuple[int, ...]
    dtype: str
    layers: list[LayerCount]
    blocks: list[BlockCount]
    macs: int
    params: int
    weight_bytes: int
    act_in_bytes: int
    act_out_bytes: int
    unattributed_macs: int = 0
    unclassified: list[str] = field(default_factory=list)  # see blocks.unclassified

    @property
    def layerwise_bytes(self) -> int:
        """Sum of every layer's minimum bytes (traffic when each layer is its own kernel)."""
        return sum(r.min_bytes for r in self.layers)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("layers", "blocks")}
        d.update(flops=self.flops, min_bytes=self.min_bytes, layerwise_bytes=self.layerwise_bytes,
                 intensity=self.intensity)
        d["layers"] = [dict(asdict(r), flops=r.flops, min_bytes=r.min_bytes,
                            intensity=r.intensity) for r in self.layers]
        d["blocks"] = [dict(asdict(b), flops=b.flops, fused_bytes=b.fused_bytes,
                            intensity=b.intensity) for b in self.blocks]
        return d


@dataclass
class Call:
    """One module call seen by :func:`trace`: the module, its row name and (if captured) a
    detached copy of its inputs, for re-running it in isolation."""

    name: str
    module: nn.Module
    inputs: tuple | None


@dataclass
class Trace:
    counts: Counts
    layer_calls: list[Call]
    block_calls: list[Call]
    output: Any


def check_input(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Validate ``input_shape`` against the model's first convolution: rank and channels.
    Returns it as a tuple; raises :class:`ConvgapError` naming the fix."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError) as exc:
        raise ConvgapError(f"input shape must be a sequence of ints, got {input_shape!r}") from exc
    if any(s < 1 for s in shape):
        raise ConvgapError(f"input shape {shape} has a non-positive size")
    # the first layer that takes channels: a plain convolution is checked; another kind
    # (a factorized or fused layer in its place) is not, rather than checking a later conv
    first = next((m for m in model.modules() if isinstance(m, _CONVS + _TCONVS) or
                  isinstance(getattr(m, "in_channels", None), int)), None)
    if isinstance(first, _CONVS + _TCONVS):
        rank = first.weight.dim()  # (N, C, *spatial) has as many dims as the kernel
        if len(shape) != rank:
            raise ConvgapError(
                f"input shape {shape} has rank {len(shape)}, but the model's first layer "
                f"({type(first).__name__}) takes rank {rank} (N, C, *spatial): e.g. "
                f"{(1, first.in_channels) + (224,) * (rank - 2)}")
        if len(shape) >= 2 and shape[1] != first.in_channels:
            raise ConvgapError(
                f"input shape {shape} has {shape[1]} channels, but the model's first "
                f"{type(first).__name__} expects {first.in_channels}: use "
                f"({shape[0]}, {first.in_channels}, {', '.join(map(str, shape[2:]))})")
    return shape


def detached_copy(obj: Any) -> Any:
    """A copy of ``obj``'s tensors (detached, same memory format), in the same nesting of
    tuples, lists and dicts; other objects as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone(memory_format=torch.preserve_format)
    if isinstance(obj, tuple):
        return tuple(detached_copy(o) for o in obj)
    if isinstance(obj, list):
        return [detached_copy(o) for o in obj]
    if isinstance(obj, dict):
        return {k: detached_copy(v) for k, v in obj.items()}
    return obj


@torch.no_grad()
def trace(model: nn.Module, x: torch.Tensor, capture: bool = False) -> Trace:
    """Run ``model(x)`` once with hooks and FlopCounterMode; count every leaf and block call.
    With ``capture``, keep a copy of each call's inputs (for timing it in isolation)."""
    recorder = Recorder(model)
    names, leaves = recorder.names, recorder.leaves
    seen_params: set[int] = set()
    call_no: dict[str, int] = {}
    layers: list[LayerCount] = []
    layer_calls: list[Call] = []
    # every non-leaf call is a candidate block until the recorder says which are blocks:
    # (module, row, its layers' index range, call)
    candidates: list[tuple[nn.Module, BlockCount, range, Call]] = []
    stack: list[tuple[BlockCount, int]] = []  # open candidates and their first layer index
    pending: dict[int, list] = {}  # id(module) -> stack of captured inputs

    def row_name(m: nn.Module) -> str:
        base = names[m] or type(m).__name__
        call_no[base] = call_no.get(base, 0) + 1
        return base if call_no[base] == 1 else f"{base}#{call_no[base]}"

    def new_params(m: nn.Module) -> int:
        total = 0
        for p in m.parameters():
            if id(p) not in seen_params:
                seen_params.add(id(p))
                total += p.numel()
        return total

    def pre(m: nn.Module, args: tuple) -> None:
        # inputs are copied before the call: in-place layers would change them
        pending.setdefault(id(m), []).append((detached_copy(args) if capture else None,
                                              _nbytes(tensors(args)), _shape(args)))
        if m not in leaves:
            row = BlockCount(name=row_name(m), kind="", type=type(m).__name__,
                             input_shape=_shape(args), output_shape=None, macs=0, params=0,
                             weight_bytes=_nbytes(_weights(m)),
                             act_in_bytes=_nbytes(tensors(args)), act_out_bytes=0,
                             layerwise_bytes=0)
            stack.append((row, len(layers)))

    def post(m: nn.Module, args: tuple, out: Any) -> None:
        saved, in_bytes, in_shape = pending[id(m)].pop()
        if m in leaves:
            macs = formula_macs(m, args, out)
            name = row_name(m)
            layers.append(LayerCount(
                name=name, type=type(m).__name__, input_shape=in_shape,
                output_shape=_shape(out), macs=macs or 0, params=new_params(m),
                weight_bytes=_nbytes(_weights(m)), act_in_bytes=in_bytes,
                act_out_bytes=_nbytes(tensors(out)),
                macs_source="formula" if macs is not None else "flop_counter"))
            layer_calls.append(Call(name, m, saved))
            return
        row, first = stack.pop()
        row.output_shape = _shape(out)
        row.act_out_bytes = _nbytes(tensors(out))
        row.params = parameter_count(m)
        candidates.append((m, row, range(first, len(layers)), Call(row.name, m, saved)))

    handles = []
    for m in names:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    counter = FlopCounterMode(display=False)
    try:
        with recorder, counter:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    found = recorder.blocks()
    kept = [(m, row, span, call) for m, row, span, call in candidates if m in found]
    kept.sort(key=lambda c: c[2].start)  # call order of the blocks' starts
    block_rows, block_calls = [], []
    for m, row, span, call in sorted(kept, key=lambda c: -len(c[2])):  # innermost last
        info = found[m]
        row.kind, row.found_by = info.kind, info.found_by
        inner = [layers[k] for k in span]
        row.layers = [r.name for r in inner]
        row.shortcut = [r.name for r in inner if r.name.split("#")[0] in info.shortcut]
        for r in inner:
            r.block = row.name
    for m, row, span, call in kept:
        block_rows.append(row)
        block_calls.append(call)
    del candidates

    # Leaf types without a formula: torch's per-module count, split evenly over calls.
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    unknown = [r for r in layers if r.macs_source == "flop_counter"]
    for r in unknown:
        base = r.name.split("#")[0]
        flops = sum(per_module.get(f"{root}.{base}", {}).values())
        r.macs = flops // 2 // call_no.get(base, 1)
    by_name = {r.name: r for r in layers}
    for b in block_rows:
        inner = [by_name[n] for n in b.layers]
        b.macs = sum(r.macs for r in inner)
        b.layerwise_bytes = sum(r.min_bytes for r in inner)
    total_macs = counter.get_total_flops() // 2
    counts = Counts(
        input_shape=tuple(x.shape), dtype=str(x.dtype).removeprefix("torch."),
        layers=layers, blocks=block_rows, macs=total_macs,
        params=parameter_count(model),
        weight_bytes=_nbytes(_weights(model)), act_in_bytes=_nbytes([x]),
        act_out_bytes=_nbytes(tensors(out)),
        unattributed_macs=total_macs - sum(r.macs for r in layers),
        unclassified=unclassified(model, found))
    return Trace(counts, layer_calls, block_calls, out)


def count(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu") -> Counts:
    """Count MACs, parameters and bytes of every layer and block of ``model`` for an input of
    ``input_shape`` (N, C, H, W) and ``dtype``. The model is run once, in its current mode,
    on random data; see :class:`Counts` for the fields and their units."""
    shape = check_input(model, input_shape)
    x = torch.randn(shape, device=device).to(dtype)
    return run_trace(model, x).counts


def run_trace(model: nn.Module, x: torch.Tensor, capture: bool = False) -> Trace:
    """:func:`trace`, turning a failing forward pass into a :class:`ConvgapError`."""
    try:
        return trace(model, x, capture=capture)
    except ConvgapError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConvgapError(
            f"the model failed on an input of shape {tuple(x.shape)} ({x.dtype}): {first}. "
            "Check the input shape (--image-size / input_shape) and dtype.") from exc
