"""Dynamic blocks (LAUDNet, Han et al. 2023): a residual block that decides per input where
to compute, with its masker, run either *masked* (the dense body times the mask: the
reference and the training path) or *sparse* (only what the mask keeps is computed).

A :class:`DynamicBlock` is built from a block's chain (:mod:`convgap.transforms.patterns`):
its body is a sequence of stages ``conv [bn] [act]``, its shortcut runs dense, and the
activations after the residual add follow. Three modes:

- ``spatial``: the masker average-pools the block input to a grid of cells, each an
  ``S x S`` tile of the block's *output* (``S`` the granularity), and a 1x1 conv gives a
  keep logit per cell. The mask multiplies the body's output before the residual add, so an
  inactive position is the shortcut (through the post activations).
- ``channel``: global pool and a two-layer MLP give one keep logit per group of the body's
  hidden channels (the input channels of its last conv, and the outputs of the trailing
  stages that produce them); the mask multiplies those stages' outputs.
- ``layer``: the spatial masker on a 1x1 grid: one keep bit per sample for the whole body.

Maskers start with every position kept (the keep logit's bias is +5). While training the
decision is a hard Gumbel (logistic-noise) sample with a straight-through gradient at
temperature ``tau``; in eval a plain comparison (logit > 0). ``force`` fixes a masker to keep
a seeded random fraction (benchmarks and tests).

Sparse execution (eval, no autograd, CPU or CUDA): spatial runs a bottleneck or inverted
residual body ([1x1,] k x k dense or depthwise, 1x1) on fp32 CPU inputs as one call of the
tile kernel (:mod:`convgap.kernels.cpu.tiles`: the first 1x1 once per pixel a kept tile's
window reads, the rest per group of kept tiles, added into the shortcut's output in
place); on CUDA a depthwise body runs in the Triton tile kernels
(:mod:`convgap.kernels.triton.tiles`; ``convgap.config.SPARSE_CUDA``); elsewhere (other
bodies, dense bodies on CUDA, no AVX-512) it gathers, per stage, the pixels
whose output is needed (the kept tiles, dilated backwards by each convolution's halo) as
rows, runs 1x1 convolutions as matrix products on those rows and k x k convolutions on the
gathered k x k neighbourhoods (im2col of the kept pixels only), and adds the last stage's
rows into the shortcut's output at the kept positions. Channel runs the convolutions on the
kept channels' weight slices (at batch > 1 the batch's union, then each sample's own mask).
Layer runs the body on the samples that keep it only. Batch-norm is folded into each
stage's weights for sparse execution (float64, kept while the weights are unchanged).
Sparse output equals masked output within fp32 rounding (``tests/test_dynamic.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config
from ..errors import ConvgapError
from ..kernels.cpu import plan as cplan
from ..kernels.cpu import tiles as tile_kernel
from ..kernels.triton import tiles as triton_tiles
from ..kernels.cpu.common import ACTIVATIONS as KERNEL_ACTIVATIONS
from ..ops import activations, guard, memo, onednn
from ..ops.batchnorm import folded
from ..ops.sizes import conv_length
from .fused_blocks import ConvWeights, bind_conv, bind_conv_add

__all__ = ["MODES", "EXECUTIONS", "KEEP_BIAS", "Stage", "SpatialMasker", "ChannelMasker",
           "LayerMasker", "DynamicBlock", "gumbel_keep"]

MODES = ("spatial", "channel", "layer")
EXECUTIONS = ("sparse", "masked")
KEEP_BIAS = 5.0   # a new masker's keep logit: every position starts active (LAUDNet)


def gumbel_keep(logits: torch.Tensor, tau: float, training: bool) -> torch.Tensor:
    """Keep (1.0) or skip (0.0) per logit. Training: a hard sample of the two-way Gumbel
    softmax (keep logit ``l`` against skip 0: logistic noise on ``l``), straight-through
    (the gradient of the soft sample at temperature ``tau``). Eval: ``logits > 0``.

    The noise shrinks with the temperature below 1 (its scale ``min(1, tau)``), so that
    training ends on the decisions eval takes. With full noise to the end, a masker could
    meet its budget by noise alone: measured, resnet18 layer-skipping blocks trained to a
    budget fraction of 0.55 with logits near +0.5, kept half the time by the noise and
    always in eval (density 1.0)."""
    if not training:
        return (logits > 0).to(logits.dtype)
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    noise = (torch.log(u) - torch.log1p(-u)) * min(1.0, tau)
    soft = torch.sigmoid((logits + noise) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


class _Masker(nn.Module):
    """What the three maskers share: temperature, forced density, the last mask.

    ``lr_scale``: the maskers train at this multiple of the learning rate
    (:func:`convgap.train.optim.param_groups`): their keep logits start at +5, and a short
    fine-tune at the network's rate moves them too little to decide anything (measured:
    resnet18 on ``shapes`` after 3 epochs at AdamW 1e-3 kept 71-74% of its tiles at targets
    0.5 and 0.3 alike, the first block of each stage all of them)."""

    lr_scale = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.tau = 1.0
        self.forced: tuple[float, int] | None = None
        self._forced_masks: dict = {}

    def force(self, density: float | None, seed: int = 0) -> None:
        """Keep a seeded random ``density`` fraction of the cells (None: decide again)."""
        if density is not None and not 0.0 <= float(density) <= 1.0:
            raise ConvgapError(f"density must be in [0, 1], got {density!r}")
        self.forced = None if density is None else (float(density), int(seed))

    def _forced(self, n: int, cells: int, like: torch.Tensor) -> torch.Tensor:
        """(n, cells) with exactly round(density * cells) ones per sample, seeded (the
        same for the same shape: kept, so that timing a forced block times the block)."""
        key = (self.forced, n, cells, like.device, like.dtype)
        hit = self._forced_masks.get(key)
        if hit is None:
            density, seed = self.forced
            g = torch.Generator().manual_seed(seed)
            keep = int(round(density * cells))
            order = torch.rand(n, cells, generator=g).argsort(dim=1)
            m = torch.zeros(n, cells)
            m.scatter_(1, order[:, :keep], 1.0)
            if len(self._forced_masks) > 64:
                self._forced_masks.clear()
            hit = self._forced_masks[key] = m.to(like.device, like.dtype)
        return hit


class SpatialMasker(_Masker):
    """Keep logits per ``granularity x granularity`` tile of an ``out_size`` output, from
    the block input average-pooled to the tile grid and a 1x1 conv. ``forward(x, out_hw)``
    returns (N, 1, gh, gw) with gh = ceil(Ho / S), gw = ceil(Wo / S)."""

    def __init__(self, in_channels: int, granularity: int) -> None:
        super().__init__()
        if granularity < 1:
            raise ConvgapError(f"granularity must be >= 1, got {granularity}")
        self.granularity = int(granularity)
        self.conv = nn.Conv2d(in_channels, 1, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.constant_(self.conv.bias, KEEP_BIAS)

    def grid(self, out_hw: tuple[int, int]) -> tuple[int, int]:
        s = self.granularity
        return -(-out_hw[0] // s), -(-out_hw[1] // s)

    def forward(self, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        gh, gw = self.grid(out_hw)
        if self.forced is not None:
            return self._forced(x.shape[0], gh * gw, x).view(-1, 1, gh, gw)
        logits = self.conv(F.adaptive_avg_pool2d(x, (gh, gw)))
        return gumbel_keep(logits, self.tau, self.training)


class LayerMasker(SpatialMasker):
    """The spatial masker on a 1x1 grid: one keep bit per sample (N, 1, 1, 1)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__(in_channels, 1)

    def grid(self, out_hw: tuple[int, int]) -> tuple[int, int]:
        return 1, 1


class ChannelMasker(_Masker):
    """Keep logits per group of ``channels`` hidden channels: global pool, linear, ReLU,
    linear. ``forward(x)`` returns (N, groups)."""

    def __init__(self, in_channels: int, channels: int, groups: int,
                 hidden: int | None = None) -> None:
        super().__init__()
        if groups < 1 or channels % groups:
            raise ConvgapError(f"{channels} hidden channels do not split into {groups} "
                               "equal groups")
        self.groups = int(groups)
        self.channels = int(channels)
        hidden = hidden or max(16, in_channels // 4)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, groups)
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.constant_(self.fc2.bias, KEEP_BIAS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forced is not None:
            return self._forced(x.shape[0], self.groups, x)
        logits = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
        return gumbel_keep(logits, self.tau, self.training)

    def expand(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, groups) -> (N, channels, 1, 1)."""
        return mask.repeat_interleave(self.channels // self.groups, dim=1)[:, :, None, None]


@dataclass
class Stage:
    """One stage of a block body: names (in the block) of its conv and batch-norm, and its
    activation's name."""

    conv: str
    bn: str | None = None
    act: str | None = None


def _out_hw(hw: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    """``conv``'s output size for an input of spatial size ``hw``."""
    return tuple(conv_length(n, conv.kernel_size[d], conv.stride[d],
                             (conv.padding[d], conv.padding[d]), conv.dilation[d])
                 for d, n in enumerate(hw))


# a dynamic block's own attributes: no child of the block it wraps may bear these names
_OWN = ("stages", "shortcut_path", "post_acts", "masker", "mode", "execution", "hidden",
        "dense_from", "block_name", "last_mask", "last_hw")


class DynamicBlock(nn.Module):
    """A residual block run dynamically. Its children are the original block's children
    (the state dict keeps the block's names, plus ``masker.*``); ``stages`` the body,
    ``shortcut_path`` the names of the shortcut's modules in order (empty: identity),
    ``post_acts`` the activations after the add. ``execution``: 'sparse' (the default; eval without
    autograd) or 'masked'. ``last_mask`` holds the mask of the last forward."""

    def __init__(self, block: nn.Module, stages: Sequence[Stage], shortcut: Sequence[str],
                 post: Sequence[str], mode: str, *, granularity: int = 1, groups: int = 4,
                 name: str = "") -> None:
        super().__init__()
        if mode not in MODES:
            raise ConvgapError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
        for child_name, child in block.named_children():
            if child_name in _OWN:
                raise ConvgapError(f"the block's child {child_name!r} has the name of a "
                                   "dynamic block's own attribute: rename it to make the "
                                   "block dynamic")
            self.add_module(child_name, child)
        self._block = [block]  # the original, not a child (its children are ours)
        self.block_name = name
        self.stages = list(stages)
        self.shortcut_path = list(shortcut)
        self.post_acts = list(post)
        self.mode = mode
        self.execution = "sparse"
        # sparse execution runs below this density, the dense body times the mask from it
        # (set by measurement: convgap.dynamic.measure_latency); above 1: always sparse
        self.dense_from = 2.0
        self.last_mask: torch.Tensor | None = None
        self.last_hw: tuple[int, int] | None = None
        self._fold: dict = {}
        self._sizes: dict = {}        # sizes() per input size
        self._tile_store: dict = {}   # the tile kernel's packed weights and scratch
        convs = self.convs()
        self._tile_plan = _tile_plan(self.stages, convs) if mode == "spatial" else None
        # every conv zero-padded by numbers: the body can be a bound oneDNN plan (_plan)
        self._bindable = all(isinstance(c.padding, tuple) and c.padding_mode == "zeros"
                             for c in convs)
        cin = convs[0].in_channels
        if mode == "spatial":
            self.masker = SpatialMasker(cin, granularity)
        elif mode == "layer":
            self.masker = LayerMasker(cin)
        else:
            self.hidden = self._hidden_stages()
            width = convs[-1].in_channels
            self.masker = ChannelMasker(cin, width, groups)

    def refresh(self) -> None:
        """Drop the prepared state (folded and packed weights, bound plans, the tile
        kernel's packed body): after writes through ``weight.data.<op>_()``, which bypass
        the version counter."""
        self._fold.clear()
        self._tile_store.clear()
        self._sizes.clear()

    # -- structure ----------------------------------------------------------------------
    def original(self) -> nn.Module:
        """The block this one was made from (it shares these parameters): the static
        computation."""
        return self._block[0]

    def convs(self) -> list[nn.Conv2d]:
        return [self.get_submodule(s.conv) for s in self.stages]

    def _hidden_stages(self) -> list[int]:
        """The trailing stages (before the last) whose outputs are the last conv's input
        channels: the stages a channel mask multiplies."""
        convs = self.convs()
        width = convs[-1].in_channels
        out = []
        for i in range(len(convs) - 2, -1, -1):
            if convs[i].out_channels != width:
                break
            out.insert(0, i)
        if not out:
            raise ConvgapError("channel mode needs a stage producing the last conv's input")
        for i in out + [len(convs) - 1]:
            c = convs[i]
            if c.groups > 1 and not _depthwise(c):
                raise ConvgapError(f"channel mode slices channels, and {self.stages[i].conv}"
                                   f" is a grouped conv ({c.groups} groups)")
        return out

    def sizes(self, hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        """The spatial sizes of the body's input and of each stage's output (kept per input
        size: looking the convs up costs 15 us, a third of a small sparse block's call)."""
        hw = tuple(hw)
        hit = self._sizes.get(hw)
        if hit is None:
            out = [hw]
            for c in self.convs():
                out.append(_out_hw(out[-1], c))
            hit = self._sizes[hw] = tuple(out)
        return hit

    def out_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        return self.sizes(hw)[-1]

    def cells(self, hw: tuple[int, int]) -> int:
        """Mask cells per sample for an input of spatial size ``hw`` (tiles, channel
        groups, or 1): the densities a sample can have are their multiples of 1 / cells."""
        if self.mode == "channel":
            return self.masker.groups
        gh, gw = self.masker.grid(self.out_size(hw))
        return gh * gw

    def granularity(self) -> int | None:
        return self.masker.granularity if self.mode == "spatial" else None

    # -- masks ----------------------------------------------------------------------------
    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The masker's decision for ``x``: spatial/layer (N, 1, gh, gw), channel (N, G)."""
        if self.mode == "channel":
            return self.masker(x)
        return self.masker(x, self.out_size(tuple(x.shape[-2:])))

    def pixel_mask(self, mask: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """A spatial/layer mask (N, 1, gh, gw) at the output's resolution (N, 1, Ho, Wo)."""
        ho, wo = out_hw
        if mask.shape[-2:] == (1, 1):
            return mask.expand(-1, -1, ho, wo)
        s = self.masker.granularity
        m = mask.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
        return m[:, :, :ho, :wo]

    def density(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fraction of the body's outputs computed, per sample (N,)."""
        mask = self.last_mask if mask is None else mask
        if mask is None:
            raise ConvgapError("the block has not run yet: no mask")
        return mask.flatten(1).mean(1)

    def stage_macs(self, hw: tuple[int, int]) -> list[int]:
        """Each stage's dense MACs per sample for an input of spatial size ``hw``."""
        return [h * w * c.out_channels * (c.in_channels // c.groups) * c.kernel_size[0]
                * c.kernel_size[1] for c, (h, w) in zip(self.convs(), self.sizes(hw)[1:])]

    def cost_macs(self, mask: torch.Tensor | None = None, hw: tuple[int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MACs the body computes at ``mask``, its dense MACs), per sample, averaged over
        the batch; differentiable in the mask (a stage's halo enters at its measured
        share). Spatial: each stage's share is the fraction of its output positions
        computed (the kept tiles, dilated by the later convolutions' windows); channel: its
        kept output and input channels; layer: the keep bit."""
        mask = self.last_mask if mask is None else mask
        hw = self.last_hw if hw is None else hw
        if mask is None or hw is None:
            raise ConvgapError("the block has not run yet: no mask")
        macs = self.stage_macs(hw)
        dense = float(sum(macs))
        d = mask.flatten(1).mean(1)                       # (N,)
        if self.mode == "layer":
            cost = d * dense
        elif self.mode == "channel":
            cost = torch.zeros_like(d)
            convs = self.convs()
            for i, mac in enumerate(macs):
                share = torch.ones_like(d)
                if i in self.hidden:
                    share = share * d
                if i - 1 in self.hidden and not _depthwise(convs[i]):
                    share = share * d
                cost = cost + share * mac
        else:
            convs = self.convs()
            sizes = self.sizes(hw)
            with torch.no_grad():
                need = self.pixel_mask(mask.detach(), sizes[-1])[:, 0] > 0
                kept = need.flatten(1).float().mean(1).clamp_min(1e-12)
                shares = [None] * len(convs)
                shares[-1] = torch.ones_like(kept)
                for i in range(len(convs) - 1, 0, -1):
                    need = _needed_input(need, convs[i], sizes[i])
                    shares[i - 1] = need.flatten(1).float().mean(1) / kept
            d = self.pixel_mask(mask, sizes[-1]).flatten(1).mean(1)
            cost = sum(d * s * mac for s, mac in zip(shares, macs))
        return cost.mean(), torch.tensor(dense, dtype=cost.dtype, device=cost.device)

    def work_share(self, density: float, n: int, hw: tuple[int, int], seed: int = 0
                   ) -> float:
        """MACs the body computes over its dense MACs for ``n`` inputs of spatial size
        ``hw`` whose masks keep round(``density`` x cells) cells each, seeded (spatial: the
        kept tiles' halo included, so above the density at small granularities)."""
        with torch.no_grad():
            macs, dense = self.cost_macs(self.seeded_mask(density, n, hw, seed), tuple(hw))
        return float(macs) / max(float(dense), 1e-30)

    def seeded_mask(self, density: float, n: int, hw: tuple[int, int], seed: int = 0
                    ) -> torch.Tensor:
        """The masks a masker forced to ``density`` with ``seed`` keeps for ``n`` inputs of
        spatial size ``hw`` (round(density x cells) cells each; CPU, float32): spatial and
        layer (N, 1, gh, gw), channel (N, G)."""
        cells = self.cells(hw)
        keep = int(round(float(density) * cells))
        order = torch.rand(n, cells, generator=torch.Generator().manual_seed(seed))
        mask = torch.zeros(n, cells).scatter_(1, order.argsort(dim=1)[:, :keep], 1.0)
        if self.mode != "channel":
            gh, gw = self.masker.grid(self.out_size(hw))
            mask = mask.view(n, 1, gh, gw)
        return mask

    # -- execution ------------------------------------------------------------------------
    def _stage(self, i: int, h: torch.Tensor) -> torch.Tensor:
        s = self.stages[i]
        h = self.get_submodule(s.conv)(h)
        if s.bn is not None:
            h = self.get_submodule(s.bn)(h)
        return activations.apply(s.act, h)

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.shortcut_path:
            x = self.get_submodule(name)(x)
        return x

    def _finish(self, y: torch.Tensor, inplace: bool = False,
                acts: Sequence[str] | None = None) -> torch.Tensor:
        """The activations after the add (``acts``: these instead of all of them)."""
        for a in self.post_acts if acts is None else acts:
            if inplace and a == "relu":
                y = y.relu_()
            else:
                y = activations.apply(a, y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = self.__dict__    # plain attributes: nn.Module's __setattr__ costs 1 us each
        seen["last_hw"] = tuple(x.shape[-2:])
        sparse = (self.execution == "sparse" and not self.training
                  and not torch.is_grad_enabled() and x.dtype == torch.float32
                  and not guard.observed() and not guard.exporting())
        if sparse and self.dense_from > 1.0 and self._tiled(x) and not self.masker.training:
            # the masker decides inside the tile kernel's call (25 us less per call at
            # batch 1 than its three torch ops); a forced mask is given to it
            forced = seen["last_mask"] = (self.mask(x) if self.masker.forced is not None
                                          else None)
            return self._sparse_tiles(x, forced)
        m = seen["last_mask"] = self.mask(x)
        if sparse and (self.dense_from > 1.0 or float(m.mean()) < self.dense_from):
            return self.sparse(x, m)
        return self.masked(x, m)

    def masked(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The reference: the dense body times the mask, plus the dense shortcut."""
        h = x
        if self.mode == "channel":
            cm = self.masker.expand(m).to(x.dtype)
            for i in range(len(self.stages)):
                h = self._stage(i, h)
                if i in self.hidden:
                    h = h * cm
        else:
            for i in range(len(self.stages)):
                h = self._stage(i, h)
            h = h * self.pixel_mask(m, tuple(h.shape[-2:])).to(h.dtype)
        return self._finish(self._shortcut(x) + h)

    # sparse ------------------------------------------------------------------------------
    def _stage_tensors(self, i: int) -> list[torch.Tensor]:
        """The tensors stage ``i``'s folded weights are computed from: its conv's weight
        and bias, its batch-norm's affine parameters and running statistics (where present;
        looked up through the modules' dicts: a few microseconds less per stage than
        ``get_submodule`` and attribute access, on every sparse call)."""
        s = self.stages[i]
        conv = _child(self, s.conv)
        found = [conv._parameters.get("weight"), conv._parameters.get("bias")]
        if s.bn is not None:
            bn = _child(self, s.bn)
            found += [bn._parameters.get("weight"), bn._parameters.get("bias"),
                      bn._buffers.get("running_mean"), bn._buffers.get("running_var")]
        return [t for t in found if t is not None]

    def _folded(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage ``i``'s conv weight and bias with its batch-norm folded in (float64
        arithmetic), kept while the parameters are unchanged."""
        s = self.stages[i]

        def compute():
            return _fold_conv(self.get_submodule(s.conv),
                              None if s.bn is None else self.get_submodule(s.bn))

        return memo.reuse(self._fold, i, self._stage_tensors(i), compute)

    def _im2col(self, i: int) -> torch.Tensor:
        """Stage ``i``'s folded weight in window order (:func:`_im2col_weight`)."""
        w, b = self._folded(i)
        return memo.reuse(self._fold, ("im2col", i), [w], lambda: _im2col_weight(
            w, self.get_submodule(self.stages[i].conv).groups))

    def sparse(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The block computing only what ``m`` keeps (eval, no autograd)."""
        if self.mode == "layer":
            return self._sparse_layer(x, m)
        if self.mode == "channel":
            return self._sparse_channel(x, m)
        return self._sparse_spatial(x, m)

    def _sparse_layer(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        keep = m.view(-1) > 0
        n = int(keep.sum())
        if self._plannable(x):
            plan = self._plan(x)
            if n == x.shape[0]:
                return plan.full(x)
            if n == 0:
                return plan.skip(x)
            idx, rest = keep.nonzero().view(-1), (~keep).nonzero().view(-1)
            return _merge([(idx, plan.full(x.index_select(0, idx))),
                           (rest, plan.skip(x.index_select(0, rest)))], x.shape[0])
        out = self._shortcut(x)
        if n:
            if n == x.shape[0]:
                h = self._body_folded(x)
                out = out + h
            else:
                idx = keep.nonzero().view(-1)
                h = self._body_folded(x.index_select(0, idx))
                out = out.index_add(0, idx, h)
        return self._finish(out)

    def _body_folded(self, h: torch.Tensor) -> torch.Tensor:
        for i, s in enumerate(self.stages):
            conv = self.get_submodule(s.conv)
            w, b = self._folded(i)
            h = activations.apply(s.act, F.conv2d(h, w, b, conv.stride, conv.padding,
                                                  conv.dilation, conv.groups))
        return h

    def _sparse_channel(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        keep = m > 0                                        # (N, groups)
        if self._plannable(x):
            # one bound plan per pattern of kept groups; the batch split by pattern
            if x.shape[0] == 1 or bool((keep == keep[:1]).all()):
                return self._plan(x, _kept(keep[0])).full(x)
            patterns, which = torch.unique(keep, dim=0, return_inverse=True)
            parts = []
            for j in range(len(patterns)):
                idx = (which == j).nonzero().view(-1)
                parts.append((idx, self._plan(x, _kept(patterns[j])).full(
                    x.index_select(0, idx))))
            return _merge(parts, x.shape[0])
        out = self._shortcut(x)
        per = self.masker.channels // self.masker.groups
        union = m.amax(0) > 0
        if not bool(union.any()):   # the last conv sees zeros: its output is its bias
            w, b = self._folded(len(self.stages) - 1)
            y = activations.apply(self.stages[-1].act, b.view(1, -1, 1, 1))
            return self._finish(out + y)
        kept = union.nonzero().view(-1)
        ch = (kept[:, None] * per + torch.arange(per, device=kept.device)).view(-1)
        full = len(ch) == self.masker.channels
        exact = bool((m == m[:1]).all())  # every sample keeps the same groups
        cm = None if exact else self.masker.expand(m)[:, ch].to(x.dtype)
        h = x
        for i, s in enumerate(self.stages):
            conv = self.get_submodule(s.conv)
            w, b, groups, take = self._sliced(i, None if full else ch)
            if take:
                h = h[:, ch]
            h = activations.apply(s.act, F.conv2d(h, w, b, conv.stride, conv.padding,
                                                  conv.dilation, groups))
            if cm is not None and i in self.hidden:
                h = h * cm
        return self._finish(out + h)

    def _sliced(self, i: int, ch: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        """Stage ``i``'s folded weight and bias on the hidden channels ``ch`` only (channel
        mode; None: all), its groups, and whether its input must first be sliced to
        ``ch`` (a depthwise stage reading the block input)."""
        conv = _child(self, self.stages[i].conv)
        w, b = self._folded(i)
        groups, take = conv.groups, False
        if ch is not None:
            dw = _depthwise(conv)
            if i in self.hidden:
                w, b = w[ch], b[ch]
                if dw:
                    groups, take = len(ch), i - 1 not in self.hidden
            if i - 1 in self.hidden and not dw:
                w = w[:, ch]
        return w, b, groups, take

    # bound dense plans (layer and channel modes) -----------------------------------------
    def _plannable(self, x: torch.Tensor) -> bool:
        """May the body run as a bound oneDNN plan on ``x`` (:meth:`_plan`): a 4-D fp32 CPU
        tensor, oneDNN on, every conv zero-padded by numbers."""
        return (self._bindable and x.dim() == 4 and x.device.type == "cpu"
                and x.dtype == torch.float32 and onednn.AVAILABLE
                and torch.backends.mkldnn.enabled)

    def _plan(self, x: torch.Tensor, kept: tuple[int, ...] | None = None) -> "_Plan":
        """The block (body, shortcut, add, post activations; batch-norm folded) bound to
        oneDNN for inputs of ``x``'s channels and size and any batch size, every activation
        and the residual add as the convolutions' post-ops (what :mod:`fused_blocks` runs
        for a static block), on the channel groups ``kept`` only (channel mode; None: all).
        Kept per (``kept``, size) while the parameters are unchanged. Only where
        :meth:`_plannable` (the caller checks)."""
        tensors = [t for i in range(len(self.stages)) for t in self._stage_tensors(i)]
        for name in self.shortcut_path:
            module = _child(self, name)
            tensors += [t for t in (*module._parameters.values(), *module._buffers.values())
                        if t is not None]
        return memo.reuse(self._fold, ("plan", kept, tuple(x.shape[1:])), tensors,
                          lambda: self._bind_plan(x, kept))

    def _short_weights(self) -> ConvWeights | None | str:
        """The shortcut as a folded conv (a conv, or conv + batch-norm), None (identity) or
        'modules' (anything else: run as it is)."""
        path = [self.get_submodule(n) for n in self.shortcut_path]
        if not path:
            return None
        conv, bn = path[0], path[1] if len(path) == 2 else None
        if not (isinstance(conv, nn.Conv2d) and len(path) <= 2 and isinstance(conv.padding, tuple)
                and conv.padding_mode == "zeros" and (bn is None
                                                      or isinstance(bn, nn.BatchNorm2d))):
            return "modules"
        w, b = _fold_conv(conv, bn)
        return ConvWeights(w.contiguous(), b, conv.padding, conv.stride, conv.dilation,
                           conv.groups)

    def _bind_plan(self, x: torch.Tensor, kept: tuple[int, ...] | None) -> "_Plan":
        shape = (1, *x.shape[1:])     # packed weights serve any batch size
        convs = self.convs()
        ch = None          # the kept hidden channels (channel mode)
        take = None        # the input channels the first stage reads (a depthwise first)
        if kept is not None:
            per = self.masker.channels // self.masker.groups
            ch = torch.tensor([g * per + j for g in kept for j in range(per)],
                              dtype=torch.long)
        specs = []
        for i, conv in enumerate(convs):
            w, b, groups, first = self._sliced(i, ch)
            if first:
                take = ch       # (only the first stage: see _hidden_stages)
            specs.append(ConvWeights(w.contiguous(), b.contiguous(), conv.padding,
                                     conv.stride, conv.dilation, groups))
        short = self._short_weights()
        short_call = (bind_conv(short, shape, None)[0] if isinstance(short, ConvWeights)
                      else None)
        if take is not None:
            shape = (1, len(take), *shape[2:])
        post, last_act = list(self.post_acts), self.stages[-1].act

        def shortcut(x: torch.Tensor) -> torch.Tensor:
            if short is None:
                return x
            if short_call is not None:
                return short_call(x)
            return self._shortcut(x).contiguous(memory_format=torch.channels_last)

        def skip(x: torch.Tensor) -> torch.Tensor:
            return self._finish(shortcut(x.contiguous(memory_format=torch.channels_last)))

        if ch is not None and len(ch) == 0:   # the last conv sees zeros: its output is its bias
            const = activations.apply(last_act, specs[-1].bias.view(1, -1, 1, 1))

            def nothing(x: torch.Tensor) -> torch.Tensor:
                x = x.contiguous(memory_format=torch.channels_last)
                return self._finish(shortcut(x) + const)
            return _Plan(nothing, skip, shortcut)
        calls = []
        for spec, s in zip(specs[:-1], self.stages[:-1]):
            call, shape = bind_conv(spec, shape, s.act)
            calls.append(call)
        if last_act is None:    # the add (and the first post activation) as post-ops
            add, rest = bind_conv_add(specs[-1], shape, post[0] if post else None), post[1:]
        else:
            last = bind_conv(specs[-1], shape, last_act)[0]
            add, rest = (lambda h, other: other + last(h)), post

        def full(x: torch.Tensor) -> torch.Tensor:
            x = x.contiguous(memory_format=torch.channels_last)
            h = x if take is None else x.index_select(1, take).contiguous(
                memory_format=torch.channels_last)
            for c in calls:
                h = c(h)
            return self._finish(add(h, shortcut(x)), acts=rest)
        if take is None and short != "modules" and len(post) <= 1 and \
                cplan.unavailable() is None:
            full = _native(full, specs, self.stages, short, post)
        return _Plan(full, skip, shortcut)

    def _tile_body(self) -> tile_kernel.Body:
        """The body, batch norms folded, as the tile kernel takes it (:func:`_tile_plan`),
        kept while the parameters are unchanged (one check of them all, not one per
        stage)."""
        first, mid, last = self._tile_plan
        order = [i for i in (first, mid, last) if i is not None]

        def build():
            folded = {i: self._folded(i) for i in order}
            w1, b1 = folded.get(first, (None, None))
            w2, b2 = folded[mid]
            w3, b3 = folded.get(last, (None, None))
            stride = (lambda i: self.get_submodule(self.stages[i].conv).stride[0])
            return tile_kernel.Body(
                w1 if w1 is None or w1.shape[2] > 1 else w1.view(w1.shape[0], -1), b1,
                w2, b2, None if w3 is None else w3.view(w3.shape[0], -1), b3, stride(mid),
                None if first is None else self.stages[first].act, self.stages[mid].act,
                1 if first is None else stride(first))
        return memo.reuse(self._fold, "tile_body",
                          [t for i in order for t in self._stage_tensors(i)], build)

    def sparse_kernel(self, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> str:
        """What runs a spatial block's body sparsely for inputs on ``device`` in ``dtype``:
        'tiles' or 'tiles-depthwise' (the CPU tile kernel, :mod:`convgap.kernels.cpu.tiles`,
        with a dense or a depthwise middle conv), else 'torch' (the convs on the kept
        positions in torch, scattered back; and every channel or layer block)."""
        if not self._tiled_for(torch.device(device).type, dtype):
            return "torch"
        return "tiles-depthwise" if _depthwise(self.convs()[self._tile_plan[1]]) else "tiles"

    def _tiled_for(self, device_type: str, dtype: torch.dtype) -> bool:
        return (self._tile_plan is not None and device_type == "cpu"
                and dtype == torch.float32 and tile_kernel.available())

    def _tiled(self, x: torch.Tensor) -> bool:
        """Whether the spatial body runs in the tile kernel for ``x`` (every forward)."""
        return self._tiled_for(x.device.type, x.dtype)

    def _sparse_tiles(self, x: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """Spatial sparse execution as one call of the tile kernel
        (:mod:`convgap.kernels.cpu.tiles`): the body on the kept tiles of ``m`` (N, 1, gh,
        gw), added into the shortcut's output in place; ``m`` None: the masker decides in
        the same call (its eval decision; kept as ``last_mask``)."""
        if self.shortcut_path and self._plannable(x):
            # the shortcut conv folded and packed (eager conv + BN: 2x)
            out = self._plan(x).shortcut(x.contiguous(memory_format=torch.channels_last))
        else:
            out = self._shortcut(x) if self.shortcut_path else x.clone()
        if not (out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)):
            out = out.contiguous()
        body = self._tile_body()
        key = ("tiles", x.shape, x.is_contiguous(), out.is_contiguous(),
               self.masker.granularity)
        call = memo.reuse(self._fold, key, [body.w2], lambda: tile_kernel.bind(
            x, out, self.masker.granularity, body, self._tile_store))
        if m is None:
            gh, gw = self.masker.grid(self.out_size(tuple(x.shape[-2:])))
            m = self.__dict__["last_mask"] = torch.empty(x.shape[0], 1, gh, gw)
            conv = self.masker.conv
            call(x, out, m, (conv.weight, conv.bias))
        else:
            call(x, out, m.to(torch.float32).contiguous())
        return self._finish(out, inplace=True)

    def _sparse_triton(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Spatial sparse execution on a GPU: the Triton tile kernels
        (:mod:`convgap.kernels.triton.tiles`) on ``m``'s kept tiles, added into the
        shortcut's output in place; nothing read back to the host (CUDA-graph capturable)."""
        out = self._shortcut(x) if self.shortcut_path else x.clone()
        triton_tiles.residual_tiles(x, out, m[:, 0], self.masker.granularity,
                                    self._tile_body())
        return self._finish(out, inplace=True)

    def _cuda_triton(self) -> bool:
        """Whether spatial sparse execution on CUDA takes the Triton tile kernels
        (``config.SPARSE_CUDA``; 'auto': for a depthwise middle conv)."""
        kernel = _cuda_kernel()
        if kernel == "auto":
            return any(c.groups > 1 for c in self.convs())
        return kernel == "triton"

    def _sparse_spatial(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if self._tiled(x):
            return self._sparse_tiles(x, m)
        if x.device.type == "cuda" and self._cuda_triton() and (
                self._tile_plan is not None and x.dtype == torch.float32
                and triton_tiles.runnable(x)):
            return self._sparse_triton(x, m)
        return self._sparse_torch(x, m, self._folded, self._im2col)

    def sparse_shapes(self, x: torch.Tensor, mask: torch.Tensor,
                      weights: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                      ) -> torch.Tensor:
        """The spatial torch path (:meth:`sparse_kernel` 'torch') on ``x`` at ``mask``
        (N, 1, gh, gw; CPU, e.g. :meth:`seeded_mask`) with ``weights`` (per stage: the
        folded weight, bias and weight in window order, e.g. :meth:`weight_shapes`): what
        :func:`convgap.predict.record.record` runs on meta tensors to see the operators that
        path dispatches (gathers, GEMMs on the kept rows, scatters), which follow the masks,
        not the values."""
        if self.mode != "spatial":
            raise ConvgapError(f"sparse_shapes: a {self.mode} block has no spatial torch path")
        return self._sparse_torch(x, mask, lambda i: weights[i][:2], lambda i: weights[i][2])

    def weight_shapes(self, device: str | torch.device = "meta"
                      ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per stage, tensors of the shapes of its folded weight, bias and weight in window
        order (:meth:`sparse_shapes`) on ``device`` (values unset)."""
        out = []
        for c in self.convs():
            w = torch.empty(c.weight.shape, dtype=c.weight.dtype, device=device)
            out.append((w, torch.empty(w.shape[0], dtype=w.dtype, device=device),
                        _im2col_weight(w, c.groups)))
        return out

    def _sparse_torch(self, x: torch.Tensor, m: torch.Tensor,
                      folded: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                      im2col: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """The spatial body in torch operators at the kept positions of ``m`` only,
        gathered, each conv a GEMM on their rows (or windows), scattered back into the
        shortcut's output; ``folded(i)`` / ``im2col(i)``: stage i's batch-norm-folded
        weight and bias / weight in window order. ``m`` may live on the CPU for an ``x`` on
        another device (meta, in :meth:`sparse_shapes`): the positions are computed where
        ``m`` is and moved to ``x``'s device where they index it."""
        convs = self.convs()
        n = x.shape[0]
        sizes = self.sizes(tuple(x.shape[-2:]))
        need = [None] * (len(convs) + 1)    # per stage output: bool (N, H, W)
        need[-1] = self.pixel_mask(m, sizes[-1])[:, 0] > 0
        for i in range(len(convs) - 1, 0, -1):
            need[i] = _needed_input(need[i + 1], convs[i], sizes[i])
        out = self._shortcut(x) if self.shortcut_path else x.clone()
        if not bool(need[-1].any()):
            return self._finish(out)
        h = None       # the current stage's input: None (x), a padded map or _Sparse rows
        idx = None
        for i, c in enumerate(convs):
            w, b = folded(i)
            act = self.stages[i].act
            if isinstance(h, _Sparse):
                rows = _linear_act(h.rows, w.view(w.shape[0], -1), b, act)
            else:
                idx = need[i + 1].view(-1).nonzero().view(-1)
                if h is None and _pointwise(c):
                    rows = _linear_act(_rows_view(x).index_select(0, idx.to(x.device)),
                                       w.view(w.shape[0], -1), b, act)
                else:
                    if h is None:
                        h = _padded(x, _pads(c))
                    rows = _pixel_conv(h, c, im2col(i), b, act, idx, sizes[i + 1])
            if i == len(convs) - 1:
                break
            nxt = convs[i + 1]
            if _pointwise(nxt):
                h = _Sparse(rows, idx)
            else:   # the next conv reads neighbourhoods: scatter into a zero padded map
                h = _scatter(rows, idx, n, sizes[i + 1], _pads(nxt))
        if _is_rows_view(out):
            _rows_view(out).index_add_(0, idx.to(out.device), rows)
        else:   # NCHW at batch > 1: write through the (N, H, W, C) view
            ho, wo = sizes[-1]
            at = tuple(t.to(out.device) for t in (idx // (ho * wo), (idx % (ho * wo)) // wo,
                                                  idx % wo))
            view = out.permute(0, 2, 3, 1)
            view.index_put_(at, view[at] + rows)
        return self._finish(out, inplace=True)


def _cuda_kernel() -> str:
    """config.SPARSE_CUDA, checked."""
    kernel = config.SPARSE_CUDA
    if kernel not in config.SPARSE_CUDA_CHOICES:
        raise ConvgapError(f"config.SPARSE_CUDA must be one of "
                           f"{config.SPARSE_CUDA_CHOICES}, got {kernel!r}")
    return kernel


def _linear_act(rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor, act: str | None
                ) -> torch.Tensor:
    """act(rows @ w.t() + b): oneDNN's GEMM with the activation as a post-op where it can
    run (twice MKL's addmm on these row counts here), else torch."""
    if onednn.usable(rows, w):
        attr, scalars, algo = activations.post_op(act)
        return torch.ops.mkldnn._linear_pointwise(rows.contiguous(), w, b, attr, scalars,
                                                  algo)
    return activations.apply(act, F.linear(rows, w, b))


class _Sparse:
    """Rows of a map at flat positions ``idx`` only (what a 1x1 stride-1 conv needs)."""

    def __init__(self, rows: torch.Tensor, idx: torch.Tensor) -> None:
        self.rows, self.idx = rows, idx


class _Plan(NamedTuple):
    """A dynamic block bound for its dense path (:meth:`DynamicBlock._plan`): ``full(x)``
    the whole block, ``skip(x)`` the shortcut and the post activations only, ``shortcut``
    the shortcut alone (x itself when it is the identity; outputs channels-last)."""

    full: Callable[[torch.Tensor], torch.Tensor]
    skip: Callable[[torch.Tensor], torch.Tensor]
    shortcut: Callable[[torch.Tensor], torch.Tensor]   # of a channels-last input


def _native(fallback: Callable[[torch.Tensor], torch.Tensor], specs: Sequence[ConvWeights],
            stages: Sequence[Stage], short: ConvWeights | None, post: Sequence[str]
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A bound block's whole dense path for one sample as one oneDNN plan per input
    shape and strides (:class:`convgap.kernels.cpu.plan.Plan`: the stages, the shortcut's
    conv, the residual add and the activations as post-ops, one C call instead of a torch
    operator per conv, 22-56 us each on the host here: resnet18's channel-mode blocks at
    batch 1 0.71 -> 0.56 of the static model); ``fallback`` (the torch operators, packed
    once for any batch size) for more samples (a batch split by mask pattern has parts of
    every size: a plan per size cost more to build than it saved) and where a plan cannot
    be built. Outputs channels-last, as ``fallback``."""
    plans: dict = {}

    def conv(p: cplan.Plan, src: int, spec: ConvWeights, **kw) -> int:
        ph, pw = spec.padding
        return p.conv(src, spec.weight, spec.bias, stride=spec.stride,
                      padding=(ph, pw, ph, pw), dilation=spec.dilation, groups=spec.groups,
                      **kw)

    def build(x: torch.Tensor):
        p = cplan.Plan()
        h = i = p.input(x.shape, x.stride())
        for spec, s in zip(specs[:-1], stages[:-1]):
            h = conv(p, h, spec, act=s.act)
        sc = None if short is None else conv(p, i, short)
        y = conv(p, h, specs[-1], act=stages[-1].act, add_into=sc,
                 add_from=i if short is None else None,
                 act_after=post[0] if post else None)
        n, c, hh, ww = p.dims(y)
        p.output(y, (n, c, hh, ww), (c * hh * ww, 1, ww * c, c))
        p.finalize()
        return p, (n, c, hh, ww)

    def full(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            return fallback(x)
        key = (x.shape, x.stride())
        entry = plans.get(key)
        if entry is None:
            try:
                entry = build(x)
            except ConvgapError:     # strides oneDNN cannot describe, ...
                entry = False
            plans[key] = entry
        if entry is False:
            return fallback(x)
        plan, shape = entry
        return plan.run(x, torch.empty(shape, memory_format=torch.channels_last))
    full.plans = plans   # type: ignore[attr-defined]
    return full


def _kept(keep: torch.Tensor) -> tuple[int, ...] | None:
    """A sample's kept channel groups (a bool row) as a plan key: None when all are."""
    if bool(keep.all()):
        return None
    return tuple(keep.nonzero().view(-1).tolist())


def _merge(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
    """One batch of ``n`` from parts (sample indices, their outputs): channels-last."""
    like = parts[0][1]
    out = like.new_empty((n, *like.shape[1:])).contiguous(memory_format=torch.channels_last)
    for idx, y in parts:
        out.index_copy_(0, idx, y)
    return out


def _fold_conv(conv: nn.Conv2d, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv``'s weight and bias (zeros where it has none) with ``bn`` folded in
    (float64 arithmetic), in the conv's device and dtype, detached."""
    w, b = conv.weight.detach(), conv.bias
    if bn is not None:
        w, b = folded(w, b, bn)
    elif b is None:
        b = torch.zeros(w.shape[0])
    like = conv.weight
    return w.to(like.device, like.dtype), b.detach().to(like.device, like.dtype)


def _child(module: nn.Module, name: str) -> nn.Module:
    """``module.get_submodule(name)`` through the ``_modules`` dicts."""
    for part in name.split("."):
        module = module._modules[part]
    return module


def _tile_plan(stages: Sequence[Stage], convs: Sequence[nn.Conv2d]
               ) -> tuple[int | None, int, int | None] | None:
    """(first, middle, last) stage indices where the tile kernel
    (:mod:`convgap.kernels.cpu.tiles`) runs the body: [first, k x k (dense or depthwise),
    1x1] (a bottleneck, an inverted residual; the middle as many channels out as in),
    [k x k depthwise, 1x1] (first None: an
    inverted residual without expansion) or [first, k x k dense] (last None: a basic block);
    a first conv of one group, square, odd and padded by half its side (a 1x1, or a basic
    block's 3x3, of any stride), a square k x k conv of padding k // 2 and no dilation, a
    last 1x1 of stride 1 and one group, the kernel's activations and none after the last
    conv; None for any other body."""
    def plain_1x1(c):
        return _pointwise(c) and c.groups == 1

    def square(c):
        k, s = c.kernel_size[0], c.stride[0]
        return (c.kernel_size == (k, k) and c.stride == (s, s) and c.padding == (k // 2, k // 2)
                and c.dilation == (1, 1) and c.padding_mode == "zeros")

    def first(c):
        return square(c) and c.kernel_size[0] % 2 == 1 and c.groups == 1

    def middle(c):   # the kernel keeps R channels through it: as many in as out
        return (square(c) and (c.groups == 1 or _depthwise(c))
                and c.in_channels == c.out_channels)

    acts = [s.act for s in stages]
    if acts[-1] is not None or any(a is not None and a not in KERNEL_ACTIVATIONS
                                   for a in acts):
        return None
    if len(convs) == 3 and first(convs[0]) and middle(convs[1]) and plain_1x1(convs[2]):
        return 0, 1, 2
    if len(convs) == 2 and middle(convs[0]) and _depthwise(convs[0]) and plain_1x1(convs[1]):
        return None, 0, 1
    if (len(convs) == 2 and first(convs[0]) and middle(convs[1]) and convs[1].groups == 1
            and convs[1].in_channels == convs[1].out_channels):
        return 0, 1, None
    return None


def _depthwise(c: nn.Conv2d) -> bool:
    return c.groups > 1 and c.groups == c.in_channels == c.out_channels


def _pointwise(c: nn.Conv2d) -> bool:
    return c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0)


def _is_rows_view(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) or (
        t.shape[0] == 1 and t.is_contiguous())


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as (N*H*W, C): a view when channels-last (or N == 1), else a copy."""
    n, c = t.shape[:2]
    if n == 1 and t.is_contiguous():
        return t.view(c, -1).t()
    return t.permute(0, 2, 3, 1).reshape(-1, c)


def _needed_input(need_out: torch.Tensor, conv: nn.Conv2d, in_hw: tuple[int, int]
                  ) -> torch.Tensor:
    """The input positions (N, H, W) that the needed outputs of ``conv`` read."""
    if _pointwise(conv):
        return need_out
    if conv.stride == (1, 1) and conv.dilation == (1, 1) and all(
            k == 2 * p + 1 for k, p in zip(conv.kernel_size, conv.padding)):
        # a window centred on each output: dilate the needed set by it
        return F.max_pool2d(need_out[:, None].float(), conv.kernel_size, 1,
                            conv.padding)[:, 0] > 0
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    ones = need_out.new_ones((1, 1, kh, kw), dtype=torch.float32)
    full = F.conv_transpose2d(need_out[:, None].float(), ones, stride=(sh, sw),
                              dilation=(dh, dw))[:, 0]
    h, w = in_hw
    full = F.pad(full, (0, max(0, w + pw - full.shape[2]), 0, max(0, h + ph - full.shape[1])))
    return full[:, ph:ph + h, pw:pw + w] > 0


def _pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of ``conv``'s input map."""
    ph, pw = conv.padding
    return ph, ph, pw, pw


def _padded(x: torch.Tensor, pads: tuple[int, int, int, int]) -> "_Map":
    """``x`` (N, C, H, W) as a zero-padded channels-last map."""
    t, b, l, r = pads
    data = F.pad(x.permute(0, 2, 3, 1), (0, 0, l, r, t, b)).contiguous()
    return _Map(data, t, l)


def _scatter(rows: torch.Tensor, idx: torch.Tensor, n: int, hw: tuple[int, int],
             pads: tuple[int, int, int, int]) -> "_Map":
    """Rows at flat positions ``idx`` of an (N, H, W) map, into a zero-padded map."""
    t, b, l, r = pads
    h, w = hw
    hp, wp = h + t + b, w + l + r
    data = rows.new_zeros(n, hp, wp, rows.shape[1])
    at = (idx // (h * w)) * (hp * wp) + ((idx % (h * w)) // w + t) * wp + idx % w + l
    at = at.to(data.device)
    data.view(-1, rows.shape[1]).index_copy_(0, at, rows)
    return _Map(data, t, l)


class _Map:
    """A channels-last map (N, Hp, Wp, C) with ``top`` / ``left`` rows / columns of zero
    padding."""

    def __init__(self, data: torch.Tensor, top: int, left: int) -> None:
        self.data, self.top, self.left = data, top, left


def _pixel_conv(h: _Map, conv: nn.Conv2d, w: torch.Tensor, b: torch.Tensor,
                act: str | None, idx: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """act(``conv``) at the flat output positions ``idx`` only, from their gathered
    windows (im2col of those positions): (P, C_out). ``w``: the weight in window order
    (:meth:`DynamicBlock._im2col`), ``b`` the bias (batch-norm folded)."""
    ho, wo = out_hw
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    n, hp, wp, c = h.data.shape
    nn_, rem = idx // (ho * wo), idx % (ho * wo)
    base = (nn_ * (hp * wp) + ((rem // wo) * sh + h.top - ph) * wp
            + (rem % wo) * sw + h.left - pw)
    offs = (torch.arange(kh, device=idx.device)[:, None] * wp
            + torch.arange(kw, device=idx.device)[None, :]).view(-1)
    patches = h.data.view(-1, c).index_select(0, (base[:, None] + offs).view(-1).to(
        h.data.device))
    patches = patches.view(len(idx), kh * kw, c)
    p, kk = patches.shape[:2]
    g = conv.groups
    if g == 1:
        return _linear_act(patches.view(p, -1), w, b, act)
    if _depthwise(conv):
        y = torch.einsum("pkc,kc->pc", patches, w) + b
    else:
        og, ig = conv.out_channels // g, c // g
        pg = patches.view(p, kk, g, ig).permute(2, 0, 1, 3).reshape(g, p, kk * ig)
        y = torch.bmm(pg, w).permute(1, 0, 2).reshape(p, g * og) + b
    return activations.apply(act, y)


def _im2col_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A conv weight (O, C/g, kh, kw) in the order of gathered windows (kk, C): dense
    (O, kk*C), depthwise (kk, C), grouped (g, kk*C/g, O/g)."""
    o, ig, kh, kw = w.shape
    if groups == 1:
        return w.permute(0, 2, 3, 1).reshape(o, -1).contiguous()
    if ig == 1 and groups == o:
        return w.view(o, kh * kw).t().contiguous()
    og = o // groups
    return w.view(groups, og, ig, kh * kw).permute(0, 3, 2, 1).reshape(
        groups, kh * kw * ig, og).contiguous()
