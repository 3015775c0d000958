"""fuse: run a model's residual blocks (and conv + BN + activation stems, and its classifier
head) as fused modules (:mod:`convgap.layers.fused_blocks`), verified and measured where
they are applied.

Steps: batch-norm folded into the convolutions (:func:`fold_batchnorm`); every module,
from the top down, read as a chain (:func:`.patterns.describe`) and offered to the pattern
registry (:data:`.patterns.PATTERNS`), a matched module not descended into; with an
example input, each fused block run on the block's real input (relative error <= 1e-4
in fp32, else not kept), then timed against the block it replaces through the one measured
choice (:func:`convgap.choice.choose`, kind 'fuse': kept only where at least
``config.MARGIN`` faster); last, the whole model checked against the original.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import allocator, choice
from ..errors import ConvgapError
from ..kernels.cpu import plan as cplan
from ..layers.fused_blocks import FusedBlock, FusedConvAct, FusedPoolLinear, FusedStemBlock
from ..layers.network import FusedNetwork
from ..ops.layouts import layout_of
from ..progress import make_progress
from .changes import FUSED_ATTR, FUSED_INTO_ATTR, LEFT_ATTR
from .eligible import first_inputs
from .fold import fold_batchnorm
from .lower import lower
from .patterns import (CONV_ACT, HEAD, NETWORK, PATTERNS, STEM, Chain, ConvAct, Head,
                       Pattern, describe, find_conv_acts, find_head, find_stems, match)
from .select import Layers, select
from .trace import is_leaf

__all__ = ["fuse", "fused_blocks", "BlockRow", "FusionWarning", "FUSED_ATTR",
           "TOLERANCE"]

TOLERANCE = 1e-4   # fp32 relative error of a fused block against the block it replaces


class FusionWarning(UserWarning):
    """A matched block was not fused (it disagreed, or was not faster), or the fused
    model as a whole disagreed with the original."""


@dataclass
class _Found:
    name: str
    module: nn.Module
    chain: Chain
    pattern: Pattern


def _find(model: nn.Module, wanted, patterns: dict[str, Pattern]
          ) -> tuple[list[_Found], dict[str, str]]:
    """Matched blocks (top down, not descending into a match) and, for modules that look
    like blocks (a residual add) but match no pattern, why."""
    found: list[_Found] = []
    left: dict[str, str] = {}

    def visit(module: nn.Module, name: str) -> None:
        if is_leaf(module) or isinstance(module, FusedBlock):
            return
        chain = describe(module) if name else None  # the model itself is never one block
        if isinstance(chain, str):
            if chain.residual:
                left[name] = chain
        elif chain is not None:
            pattern, why = match(chain)
            if pattern is not None and pattern.name in patterns and (
                    wanted is None or name in wanted):
                found.append(_Found(name, module, chain, pattern))
                return
            if chain.shortcut is not None:
                left[name] = "; ".join(f"{k}: {v}" for k, v in why.items()) or (
                    f"pattern {pattern.name} not selected" if pattern else "no pattern")
        before = len(found)
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)
        if len(found) > before:  # a container of blocks (a stage), not a block left
            left.pop(name, None)
    visit(model, "")
    return found, left


def fuse(model: nn.Module, example_input: torch.Tensor | None = None, *,
         layers: Layers = None, inplace: bool = False, check: bool = True,
         quiet: bool = False, patterns: list[str] | None = None,
         malloc: str | None = "retain") -> nn.Module:
    """Fold batch-norm and run every block that matches a registered pattern as one fused
    module (``Fused...``); returns the model (a copy unless ``inplace``). Inference only:
    the model must be in eval mode (batch-norm is folded from its running statistics).

    ``layers``: which blocks (module names, a type, or ``callable(name, module)``, as
    :func:`convgap.transforms.select`), default all; ``patterns``: the pattern names to
    use (default every registered one, :data:`convgap.transforms.patterns.PATTERNS`, and
    ``"pool_linear"``: a classifier head ending the model, global average pool -> flatten
    -> [dropout] -> linear, run as one :class:`~convgap.layers.FusedPoolLinear` in the
    pool's place, the modules after it left as ``nn.Identity``; and ``"stem_block"``: a
    fused stem conv + act from an image's few channels whose output only feeds a fused
    inverted residual or MBConv without expansion or residual (MobileNetV2's and
    EfficientNet's first blocks), run as one :class:`~convgap.layers.FusedStemBlock`, the
    block's module left as ``nn.Identity``; both only without ``layers``). A conv +
    activation written outside any block (a ResNet's stem in the model's own forward) is
    fused under ``"conv_act"`` too, the activation's module left as ``nn.Identity`` (only
    without ``layers``). Last, ``"network"`` (only without ``layers``): a model whose
    trace lowers to a oneDNN plan (:func:`convgap.transforms.lower.lower`: convs,
    activations, pooling, additions, broadcast multiplications, batch-norm, linear
    layers) is returned as a :class:`~convgap.layers.FusedNetwork`, the whole forward one
    C call, measured per input shape against the block-fused model it holds (``.blocks``)
    and run where faster; it needs oneDNN's wheel (``pip install 'convgap[onednn]'``),
    else the block-fused model is returned and :func:`convgap.changes` says why.
    With ``example_input`` and ``check`` (the default), each fused block is verified on
    its real input (fp32 relative error <= 1e-4) and timed against the block it replaces
    (interleaved, paired; kept only if ``config.MARGIN`` faster; the decision is cached
    like the algorithm choices, :mod:`convgap.choice`), and the whole fused model is
    checked against the original (if it disagrees, every block is put back, with a
    :class:`FusionWarning`). Without them every matched block is fused, unmeasured (each
    is exact by construction). ``malloc``: the CPU malloc policy while measuring
    (:mod:`convgap.allocator`). What was fused, what was left and why:
    :func:`convgap.changes`.
    """
    if model.training:
        raise ConvgapError("fuse is for inference: batch-norm is folded from its running "
                           "statistics; call model.eval() first")
    use = [*PATTERNS, HEAD, STEM, NETWORK] if patterns is None else list(patterns)
    unknown = [p for p in use if p not in PATTERNS and p not in (HEAD, STEM, NETWORK)]
    if unknown:
        raise ConvgapError(f"unknown block patterns {unknown}; registered: "
                           f"{[*PATTERNS, HEAD, STEM, NETWORK]}")
    measure = check and example_input is not None
    reference = None
    if measure:
        with torch.no_grad():
            reference = model(example_input)
    model = model if inplace else copy.deepcopy(model)
    fold_batchnorm(model, example_input if check else None, inplace=True, check=check,
                   quiet=True)
    wanted = None
    if layers is not None:
        wanted = set(select(model, layers, lambda m: not is_leaf(m), lambda n, m: True,
                            what="block (a module that is not a single layer)"))
    network = _network(model) if NETWORK in use and wanted is None else None
    found, left = _find(model, wanted, {p: PATTERNS[p] for p in use if p in PATTERNS})
    head = _head(model, use, wanted, found)
    loose = (find_conv_acts(model, [f.name for f in found])
             if CONV_ACT in use and wanted is None else [])
    inputs: dict[str, tuple] = {}
    if measure:
        watch = {f.module: f.name for f in found}
        watch.update({model.get_submodule(c.conv): c.conv for c in loose})
        if head is not None:
            watch[model.get_submodule(head.pool)] = head.pool
        with torch.no_grad():
            inputs, _ = first_inputs(watch, lambda: model(example_input))
    fused: dict[str, tuple[nn.Module, nn.Module]] = {}
    slower: dict[str, tuple[nn.Module, nn.Module]] = {}  # exact, measured not faster
    problems: list[str] = []
    on_cpu = isinstance(example_input, torch.Tensor) and example_input.device.type == "cpu"
    with allocator.use(malloc if (measure and on_cpu) else None), make_progress(quiet) as bar, \
            torch.no_grad():
        task = bar.add_task("fusing blocks", total=len(found) + len(loose)
                            + (head is not None))
        for f in found:
            bar.advance(task)
            try:
                new = f.pattern.build(f.chain)
            except (ValueError, ConvgapError) as exc:
                setattr(f.module, LEFT_ATTR, f"{f.pattern.name}: {exc}")
                problems.append(f"{f.name}: {exc}")
                continue
            # in the mode of the block it replaces (a new module is in training mode)
            new = new.to(next(f.module.parameters()).device).train(f.module.training)
            info = {"pattern": f.pattern.name, "chain": repr(f.chain)}
            why, wrong = _verify(f.module, new, f.pattern.name, inputs.get(f.name), info)
            if why is not None:
                setattr(f.module, LEFT_ATTR, why)
                if wrong:
                    problems.append(f"{f.name}: {why}")
                else:
                    slower[f.name] = (f.module, new)
                continue
            setattr(new, FUSED_ATTR, info)
            fused[f.name] = (f.module, new)
            model.set_submodule(f.name, new)
        for c in loose:
            bar.advance(task)
            _fuse_conv_act(model, c, inputs.get(c.conv), fused, problems)
        if head is not None:
            bar.advance(task)
            _fuse_head(model, head, inputs.get(head.pool), fused, problems)
        if STEM in use and wanted is None:
            _fuse_stems(model, inputs, fused, slower, problems)
    for name, reason in left.items():
        module = model.get_submodule(name)
        if not hasattr(module, LEFT_ATTR):
            setattr(module, LEFT_ATTR, f"no block pattern matched ({reason})")
    if reference is not None and fused:
        with torch.no_grad():
            err = choice.relative_error(model(example_input), reference)
        tol = choice.tolerance(TOLERANCE, reference.dtype, example_input.device.type) * 10
        if not err <= tol:
            for name, (old, _) in fused.items():
                model.set_submodule(name, old)
            problems.append(f"the fused model disagrees with the original by {err:.2e} > "
                            f"{tol:.0e}: every block was put back")
    if problems:
        warnings.warn("; ".join(problems), FusionWarning, stacklevel=2)
    if isinstance(network, FusedNetwork):
        network.blocks = model
        model = _keep_network(network, model, example_input if measure else None)
    elif network is not None:
        setattr(model, LEFT_ATTR, f"{NETWORK}: {network}")
    return model


def _network(folded: nn.Module) -> FusedNetwork | str:
    """The folded model as a :class:`FusedNetwork` (its torch path a copy of ``folded``
    sharing its parameters; the blocks are fused afterwards), or why not."""
    why = cplan.unavailable()
    if why is not None:
        return f"the oneDNN plan is unavailable: {why}"
    program = lower(folded)
    if isinstance(program, str):
        return f"the network does not lower to a oneDNN plan: {program}"
    shared = {id(t): t for t in (*folded.parameters(), *folded.buffers())}
    return FusedNetwork(copy.deepcopy(folded, shared), program).train(folded.training)


def _keep_network(network: FusedNetwork, blocks: nn.Module,
                  example_input: torch.Tensor | None) -> nn.Module:
    """``network`` (its plan measured against ``blocks`` on ``example_input`` when given,
    per input shape afterwards) unless it is unusable here."""
    info = {"pattern": NETWORK, "chain": repr(network.program)}
    if example_input is not None and example_input.device.type == "cpu":
        with torch.no_grad():
            network(example_input)
        times = network.kernel_times or {}
        info.update(input_shape=tuple(example_input.shape),
                    layout=layout_of(example_input), choice=network.kernel_choice,
                    layerwise_s=times.get("blocks"), fused_s=times.get("plan"))
    setattr(network, FUSED_ATTR, info)
    return network


def _verify(old, new: nn.Module, pattern: str, args: tuple | None, info: dict
            ) -> tuple[str | None, bool]:
    """Check ``new`` against ``old`` (a module or a callable) on the block's real input
    ``args`` (None: not measured) and time them through the one measured choice (kind
    'fuse'): (None, False) to fuse, else (why not, whether ``new`` was wrong). Records the
    error and times in ``info``."""
    if args is None:
        return None, False
    x = args[0]
    info.update(input_shape=tuple(x.shape), layout=layout_of(x))
    ref = old(x)
    err = choice.relative_error(new(x), ref)
    info["error"] = err
    tol = choice.tolerance(TOLERANCE, x.dtype, x.device.type)
    if not err <= tol:
        return (f"fused {pattern} disagrees with the block by {err:.2e} > {tol:.0e}; the "
                f"block is kept"), True
    spec = f"{tuple(x.shape)}|{layout_of(x)}|{new!r}"
    decision = choice.choose(
        [choice.Candidate("layerwise", lambda: old(x)),
         choice.Candidate("fused", lambda: new(x), TOLERANCE)],
        kind="fuse", spec_key=spec, device=x.device.type, reference=ref)
    info.update(layerwise_s=decision.times.get("layerwise"),
                fused_s=decision.times.get("fused"), cached=decision.cached)
    if decision.choice == "fused":
        return None, False
    times = ", ".join(f"{k} {1e3 * v:.3g} ms" for k, v in decision.times.items())
    ratio = (decision.confirm or {}).get("ratio")
    return (f"fused {pattern} not faster ({times}"
            + (f"; paired ratio {ratio:.3f}" if ratio else "") + ")"), False


def _head(model: nn.Module, use: list[str], wanted, found: list[_Found]) -> Head | None:
    """The classifier head to fuse (:func:`.patterns.find_head`), or None: not asked for,
    blocks selected by ``layers`` (the head is not a block), none found, or inside a block
    already matched."""
    if HEAD not in use or wanted is not None:
        return None
    head = find_head(model)
    if isinstance(head, str):
        return None
    names = [head.pool, *head.modules()]
    if any(n == f.name or n.startswith(f.name + ".") for n in names for f in found):
        return None
    return head


def _fuse_head(model: nn.Module, head: Head, args: tuple | None,
               fused: dict[str, tuple[nn.Module, nn.Module]], problems: list[str]) -> None:
    """Verify, time and, if kept, put the fused head in place: the pool's module becomes a
    :class:`FusedPoolLinear`, the modules after it (flatten, dropout, the linear layer)
    ``nn.Identity`` s marked with the pool's name (:data:`FUSED_INTO_ATTR`)."""
    pool, linear = model.get_submodule(head.pool), model.get_submodule(head.linear)
    new = FusedPoolLinear(linear, head.p).train(linear.training)  # dropout as before
    info = {"pattern": HEAD, "chain": " -> ".join(["pool", *head.modules()])}
    _place(model, head.pool, pool, new, lambda x: head.run(model, x), args, info,
           head.modules(), fused, problems)


def _place(model: nn.Module, name: str, old: nn.Module, new: nn.Module, reference,
           args: tuple | None, info: dict, away: list[str],
           fused: dict[str, tuple[nn.Module, nn.Module]], problems: list[str]) -> None:
    """Verify and time ``new`` against ``reference`` (what the model runs from ``name``'s
    input, :func:`_verify`) and, if kept, put it in ``name``'s place and an
    ``nn.Identity`` marked with ``name`` (:data:`FUSED_INTO_ATTR`) in each of ``away``'s;
    if not, why is recorded on ``old``."""
    why, wrong = _verify(reference, new, info["pattern"], args, info)
    if why is not None:
        setattr(old, LEFT_ATTR, why)
        if wrong:
            problems.append(f"{name}: {why}")
        return
    setattr(new, FUSED_ATTR, info)
    fused[name] = (old, new)
    for n in away:
        module = model.get_submodule(n)
        stand_in = nn.Identity().train(module.training)
        setattr(stand_in, FUSED_INTO_ATTR, name)
        fused[n] = (module, stand_in)
        model.set_submodule(n, stand_in)
    model.set_submodule(name, new)


def _fuse_conv_act(model: nn.Module, pair: ConvAct, args: tuple | None,
                   fused: dict[str, tuple[nn.Module, nn.Module]], problems: list[str]) -> None:
    """Verify, time and, if kept, put in place a conv + activation written outside any
    block (:func:`.patterns.find_conv_acts`): the conv's module becomes a
    :class:`FusedConvAct`, the activation's an ``nn.Identity`` marked with the conv's
    name; if not kept, why is recorded on the conv."""
    conv, act = model.get_submodule(pair.conv), model.get_submodule(pair.act)
    try:
        new = FusedConvAct([conv], [pair.name])
    except ValueError as exc:
        setattr(conv, LEFT_ATTR, f"{CONV_ACT}: {exc}")
        return
    new = new.to(conv.weight.device).train(conv.training)
    info = {"pattern": CONV_ACT, "chain": f"{pair.conv} -> {pair.act}"}
    _place(model, pair.conv, conv, new, lambda x: act(conv(x)), args, info, [pair.act],
           fused, problems)


def _fuse_stems(model: nn.Module, inputs: dict[str, tuple],
                fused: dict[str, tuple[nn.Module, nn.Module]],
                slower: dict[str, tuple[nn.Module, nn.Module]], problems: list[str]) -> None:
    """Each stem and the block after it (:func:`.patterns.find_stems`, on the model with
    every block fused, those measured not faster too) verified and timed as one
    :class:`FusedStemBlock` (holding the two fused modules) against what the model runs
    there now (each module fused or not) and, if kept, put in the stem's place, the
    block's module an ``nn.Identity`` marked with the stem's name; if not, why is recorded
    in the stem's fused info ('stem_block') where it was fused."""
    for name, (_, new) in slower.items():
        model.set_submodule(name, new)
    pairs = find_stems(model)
    for name, (old, _) in slower.items():
        model.set_submodule(name, old)
    for first_name, block_name in pairs:
        parts = [fused.get(n) or slower[n] for n in (first_name, block_name)]
        (first_old, first), (block_old, block) = parts
        now_first, now_block = (model.get_submodule(n) for n in (first_name, block_name))
        new = FusedStemBlock(first, block).train(first.training)
        info = {"pattern": STEM, "chain": f"{first_name} -> {block_name}"}
        why, wrong = _verify(lambda x: now_block(now_first(x)), new, STEM,
                             inputs.get(first_name), info)
        if why is not None:
            record = getattr(now_first, FUSED_ATTR, None)
            if record is not None:
                record[STEM] = why
            if wrong:
                problems.append(f"{first_name}: {why}")
            continue
        # the two modules' own records move into the stem block's: changes() reports it
        info["parts"] = {first_name: first.__dict__.pop(FUSED_ATTR, None),
                         block_name: block.__dict__.pop(FUSED_ATTR, None)}
        setattr(new, FUSED_ATTR, info)
        stand_in = nn.Identity().train(block.training)
        setattr(stand_in, FUSED_INTO_ATTR, first_name)
        fused[first_name] = (first_old, new)
        fused[block_name] = (block_old, stand_in)
        model.set_submodule(first_name, new)
        model.set_submodule(block_name, stand_in)


@dataclass
class BlockRow:
    """One fused block of a model: its module name and pattern; the block's layer-wise
    time and the fused module's time (seconds, medians of the measured choice; None where
    not measured); FLOPs and fused bytes (input + weights + output) from
    :func:`convgap.count`; the fused-block roofline and ideal latencies (seconds) on
    ``roofs``; computational efficiency = ideal / fused time."""

    name: str
    pattern: str
    input_shape: tuple | None
    layerwise_s: float | None
    fused_s: float | None
    flops: int
    fused_bytes: int
    roofline_s: float
    ideal_s: float

    @property
    def efficiency(self) -> float | None:
        return self.ideal_s / self.fused_s if self.fused_s else None

    @property
    def of_roofline(self) -> float | None:
        """Fused time / fused-block roofline (1.0: at the roofline)."""
        return self.fused_s / self.roofline_s if self.fused_s else None


def fused_blocks(model: nn.Module, roofs) -> list[BlockRow]:
    """The fused blocks of ``model`` (as :func:`fuse` left them, measured on its example
    input) with their fused-block roofline on ``roofs`` (:func:`convgap.hardware.roofs`)."""
    from ..count import count
    rows = []
    for name, m in model.named_modules():
        info = getattr(m, FUSED_ATTR, None)
        if info is None:
            continue
        shape = info.get("input_shape")
        flops = nbytes = 0
        if shape is not None:
            c = count(m, shape, next(m.parameters()).dtype)
            flops, nbytes = c.flops, c.min_bytes
        rows.append(BlockRow(name, info["pattern"], shape, info.get("layerwise_s"),
                             info.get("fused_s"), flops, nbytes,
                             roofs.roofline_latency(flops, nbytes), roofs.ideal_latency(flops)))
    return rows
