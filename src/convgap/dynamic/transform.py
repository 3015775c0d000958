"""make_dynamic: wrap each residual block of a model with a masker (LAUDNet), and the
switches of a dynamic model (``force_density``, ``set_execution``, ``dynamic_blocks``).

Blocks are found by what they compute (:func:`convgap.transforms.patterns.describe`, as
``fuse`` finds them): a module whose output is a residual add of a body made of stages
``conv [batch-norm] [activation]`` and a shortcut (the input, or ops such as a projection
conv + batch-norm), then activations. That takes basic and bottleneck blocks (any stride,
projection shortcuts), inverted residuals with a residual, ConvFirst blocks, written as the
zoo writes them or as third-party code does. Anything else is left, with the reason in
``convgap_left`` (:func:`convgap.changes`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .. import choice
from ..errors import ConvgapError
from ..layers.dynamic import EXECUTIONS, MODES, DynamicBlock, Stage
from ..progress import make_progress
from ..transforms.changes import LEFT_ATTR
from ..transforms.eligible import first_inputs
from ..transforms.patterns import Chain, describe
from ..transforms.select import Layers, select
from ..transforms.trace import is_leaf

__all__ = ["make_dynamic", "force_density", "set_execution", "dynamic_blocks", "evaluating",
           "DynamicWarning", "GRANULARITIES", "TOLERANCE", "block_stages"]

GRANULARITIES = (1, 2, 4, 8)   # what granularity="auto" times (those <= the output side)
TOLERANCE = 1e-4               # sparse against masked, fp32 relative error


class DynamicWarning(UserWarning):
    """A block's sparse execution disagreed with its masked reference and runs masked."""


def block_stages(chain: Chain) -> tuple[list[Stage], list[str], list[str]] | str:
    """A chain as (stages, shortcut module names, post activations), or why it is not a
    block make_dynamic takes."""
    if chain.shortcut is None:
        return "no residual add (an inactive position would have no value)"
    stages: list[Stage] = []
    for op in chain.body:
        if op.kind == "conv":
            m = op.module
            if m.dilation != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
                return f"{op.name}: dilated, string or non-zero padding"
            stages.append(Stage(op.name))
        elif op.kind == "bn" and stages and stages[-1].bn is None and stages[-1].act is None:
            stages[-1].bn = op.name
        elif op.kind == "act" and stages and stages[-1].act is None:
            stages[-1].act = op.arg
        else:
            return f"the body has a {op!r} that is not conv [batch-norm] [activation]"
    if len(stages) < 2:
        return "fewer than two convolutions in the body"
    short: list[str] = []
    for op in chain.shortcut:
        if op.kind in ("conv", "bn", "pool") and op.name:
            short.append(op.name)
        else:
            return f"the shortcut has a {op!r}"
    post = []
    for op in chain.post:
        if op.kind != "act":
            return f"after the add: {op!r}"
        post.append(op.arg)
    return stages, short, post


def _find(model: nn.Module, wanted) -> tuple[list[tuple[str, nn.Module, tuple]], dict]:
    found, left = [], {}

    def visit(module: nn.Module, name: str) -> None:
        if is_leaf(module) or isinstance(module, DynamicBlock):
            return
        chain = describe(module) if name else None
        if isinstance(chain, str):
            if chain.residual:
                left[name] = chain
        elif chain is not None and chain.shortcut is not None:
            parts = block_stages(chain)
            if isinstance(parts, str):
                left[name] = parts
            elif wanted is None or name in wanted:
                found.append((name, module, parts))
                return
        before = len(found)
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)
        if len(found) > before:
            left.pop(name, None)
    visit(model, "")
    return found, left


def _granularities(granularity, n_stages: int) -> list | None:
    if granularity in ("auto", "predict"):
        return None
    if isinstance(granularity, int) and not isinstance(granularity, bool):
        return [granularity] * n_stages
    g = list(granularity)
    if len(g) != n_stages or not all(isinstance(v, int) and v >= 1 for v in g):
        raise ConvgapError(f"granularity: 'auto', 'predict', one int, or one int per stage "
                           f"({n_stages} stages of blocks by output size), got "
                           f"{granularity!r}")
    return g


def make_dynamic(model: nn.Module, mode: str = "spatial",
                 example_input: torch.Tensor | None = None, *,
                 granularity: int | Sequence[int] | str = "auto", groups: int = 4,
                 target: float = 0.5, layers: Layers = None, inplace: bool = False,
                 check: bool = True, quiet: bool = False) -> nn.Module:
    """Wrap every residual block of ``model`` it recognises in a :class:`DynamicBlock`
    with a ``mode`` masker ('spatial', 'channel' or 'layer'); returns the model (a copy
    unless ``inplace``). The blocks keep their parameters and names (a static model's
    state dict loads into the dynamic one with ``strict=False``; the maskers are new).

    - ``granularity`` (spatial): the side, in output pixels, of the tiles a mask keeps or
      skips: one int for every block, one per stage (blocks grouped by output size, in
      order), 'auto' (needs ``example_input``): each stage's first block is timed sparse
      at density ``target`` for each of :data:`GRANULARITIES` (up to its output side) and
      the fastest is kept (the one measured choice, kind 'dynamic-granularity'), or
      'predict' (needs ``example_input``, for the blocks' input shapes): the same choice
      from the device's latency predictor (:func:`convgap.predict_latency`, calibrated
      once), no block timed.
    - ``groups`` (channel): keep bits per block, each over an equal share of the hidden
      channels (the last conv's input channels).
    - ``target``: the fraction of the computation to keep (used by 'auto' here; the
      training budget takes its own target).
    - ``layers``: which blocks (module names, a type or ``callable(name, module)``).
    - ``check`` (with ``example_input``): each block's sparse execution is run against its
      masked reference at a seeded density of 0.5 on the block's real input (fp32 relative
      error <= 1e-4); one that disagrees runs masked, with a :class:`DynamicWarning`.

    Sparse execution is the default in eval without autograd; training and anything under
    autograd run masked. :func:`set_execution` switches, :func:`force_density` fixes the
    maskers. Blocks left (and why): :func:`convgap.changes` (``convgap_left``).
    """
    if mode not in MODES:
        raise ConvgapError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if not 0.0 < float(target) <= 1.0:
        raise ConvgapError(f"target must be in (0, 1], got {target!r}")
    if granularity in ("auto", "predict") and mode == "spatial" and example_input is None:
        raise ConvgapError(f"granularity={granularity!r} needs the blocks' inputs: give "
                           "example_input, or an int granularity")
    model = model if inplace else copy.deepcopy(model)
    wanted = None
    if layers is not None:
        wanted = set(select(model, layers, lambda m: not is_leaf(m), lambda n, m: True,
                            what="block (a module that is not a single layer)"))
    found, left = _find(model, wanted)
    if not found:
        raise ConvgapError("no residual block found to make dynamic" + (
            ": " + "; ".join(f"{k}: {v}" for k, v in list(left.items())[:4]) if left else ""))
    inputs: dict[str, tuple] = {}
    if example_input is not None:
        with evaluating(model), torch.no_grad():
            inputs, _ = first_inputs({m: n for n, m, _ in found}, lambda: model(example_input))
    blocks: dict[str, DynamicBlock] = {}
    for name, module, (stages, short, post) in found:
        try:
            blocks[name] = DynamicBlock(module, stages, short, post, mode,
                                        granularity=1, groups=groups, name=name)
            blocks[name].train(module.training)
        except ConvgapError as exc:
            setattr(module, LEFT_ATTR, f"dynamic {mode}: {exc}")
            continue
        model.set_submodule(name, blocks[name])
    for name, reason in left.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if not hasattr(module, LEFT_ATTR):
            setattr(module, LEFT_ATTR, f"not made dynamic ({reason})")
    if mode == "spatial":
        _set_granularity(blocks, inputs, granularity, target, quiet)
    if check and inputs:
        _check(blocks, inputs)
    return model


def _stages_by_size(blocks: dict[str, DynamicBlock], inputs: dict) -> list[list[str]]:
    """Block names grouped into consecutive runs of equal output size (or one stage per
    block name prefix without inputs)."""
    stages: list[list[str]] = []
    last = None
    for name, b in blocks.items():
        x = inputs.get(name)
        key = b.out_size(tuple(x[0].shape[-2:])) if x is not None else name.rsplit(".", 1)[0]
        if key != last:
            stages.append([])
            last = key
        stages[-1].append(name)
    return stages


def _set_granularity(blocks, inputs, granularity, target: float, quiet: bool) -> None:
    stages = _stages_by_size(blocks, inputs)
    chosen = _granularities(granularity, len(stages))
    if chosen is None:
        chosen = []
        pick = _predicted if granularity == "predict" else _auto
        what = "predicting" if granularity == "predict" else "timing"
        with make_progress(quiet) as bar, torch.no_grad():
            task = bar.add_task(f"{what} granularities", total=len(stages))
            for names in stages:
                chosen.append(pick(blocks[names[0]], inputs[names[0]][0], target))
                bar.advance(task)
    for names, g in zip(stages, chosen):
        for n in names:
            blocks[n].masker.granularity = int(g)


def _candidates(block: DynamicBlock, x: torch.Tensor) -> list[int]:
    """The granularities to try on ``block`` (up to its output side), the incumbent
    first: 4, or the largest."""
    side = min(block.out_size(tuple(x.shape[-2:])))
    cands = [g for g in GRANULARITIES if g <= max(1, side)]
    first = 4 if 4 in cands else cands[-1]
    return [first] + [g for g in cands if g != first]


def _predicted(block: DynamicBlock, x: torch.Tensor, target: float) -> int:
    """The granularity at which the latency predictor puts ``block`` fastest sparse at
    density ``target`` on inputs like ``x`` (the first of equals: the incumbent)."""
    from ..predict import predict_latency
    from ..ops.layouts import layout_of
    times = {}
    for g in _candidates(block, x):
        block.masker.granularity = g
        times[g] = predict_latency(block, tuple(x.shape), layout=layout_of(x),
                                   density=target).total_s
    return min(times, key=times.get)


def _auto(block: DynamicBlock, x: torch.Tensor, target: float) -> int:
    """The granularity at which ``block`` runs fastest sparse at density ``target`` (the
    incumbent: 4, or the largest candidate up to the output side)."""
    cands = _candidates(block, x)
    mixes = {}
    for g in cands:
        block.masker.granularity = g
        mixes[g] = _mix(block.cells(tuple(x.shape[-2:])), target)

    def run(g: int) -> None:
        block.masker.granularity = g
        for d in mixes[g]:
            block.masker.force(d, seed=0)
            block(x)
    spec = f"{tuple(x.shape)}|{block.mode}|{[repr(c) for c in block.convs()]}|{target}"
    with evaluating(block):
        decision = choice.choose(
            [choice.Candidate(f"g{g}", lambda g=g: run(g), float("inf")) for g in cands],
            kind="dynamic-granularity", spec_key=spec, device=x.device.type)
    return int(decision.choice[1:])


def _mix(cells: int, density: float, runs: int = 4) -> list[float]:
    """``runs`` densities a block of ``cells`` mask cells per sample can have (multiples
    of 1 / cells) whose mean is nearest ``density``: the two around it in proportion. (At
    one cell and density 0.5: two runs skip the body, two run it, as half the samples
    would; forcing 0.5 itself keeps round(0.5) = 0 cells, a block that never computes.)"""
    exact = density * cells
    k = min(int(exact), cells)
    high = round((exact - k) * runs)
    return [min(k + 1, cells) / cells] * high + [k / cells] * (runs - high)


def _check(blocks: dict[str, DynamicBlock], inputs: dict) -> None:
    problems = []
    with torch.no_grad():
        for name, b in blocks.items():
            args = inputs.get(name)
            if args is None or b.execution != "sparse":
                continue
            x = args[0]
            with evaluating(b):
                b.masker.force(0.5, seed=0)
                m = b.mask(x)
                err = choice.relative_error(b.sparse(x, m), b.masked(x, m))
            if not err <= TOLERANCE:
                b.execution = "masked"
                problems.append(f"{name}: sparse disagrees with masked by {err:.2e}")
    if problems:
        warnings.warn("; ".join(problems) + " (those blocks run masked)", DynamicWarning,
                      stacklevel=3)


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block; every submodule's training flag and every
    masker's forced density as they were after it."""
    modes = [(m, m.training) for m in module.modules()]
    forced = [(b.masker, b.masker.forced) for b in module.modules()
              if isinstance(b, DynamicBlock)]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
        for masker, f in forced:
            masker.forced = f


def dynamic_blocks(model: nn.Module) -> dict[str, DynamicBlock]:
    """The model's dynamic blocks by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DynamicBlock)}


def force_density(model: nn.Module, density: float | None, seed: int = 0) -> nn.Module:
    """Fix every masker of ``model`` to keep a seeded random ``density`` fraction of its
    cells (spatial tiles, channel groups, or samples' blocks; exactly round(density x
    cells) per sample, block ``i`` seeded ``seed + i``); None lets the maskers decide
    again. Returns the model."""
    blocks = dynamic_blocks(model)
    if not blocks:
        raise ConvgapError("the model has no dynamic blocks (convgap.make_dynamic)")
    for i, b in enumerate(blocks.values()):
        b.masker.force(density, seed + i)
    return model


def set_execution(model: nn.Module, execution: str) -> nn.Module:
    """Run every dynamic block 'sparse' (only what the masks keep, in eval without
    autograd) or 'masked' (dense times the mask: the reference). Returns the model."""
    if execution not in EXECUTIONS:
        raise ConvgapError(f"unknown execution {execution!r}: use one of "
                           f"{', '.join(EXECUTIONS)}")
    blocks = dynamic_blocks(model)
    if not blocks:
        raise ConvgapError("the model has no dynamic blocks (convgap.make_dynamic)")
    for b in blocks.values():
        b.execution = execution
    return model
