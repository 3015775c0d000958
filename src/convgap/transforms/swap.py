"""swap: choose, per convolution, which algorithm runs (by name, list, dict, callable, 'auto')."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch
import torch.nn as nn

from ..algorithms import registry
from ..algorithms.linear import TOLERANCE as LINEAR_TOLERANCE
from ..algorithms.linear import AlgoLinear, LinearSpec, check_linear, supports_prepacked
from ..algorithms.module import AlgoConv2d, AlgorithmFallbackWarning
from ..algorithms.spec import ConvSpec, layout_of
from ..algorithms import tuner
from ..algorithms.tuner import tuning_progress
from .. import allocator, config, timing
from ..errors import ConvgapError
from ..progress import make_progress
from ..count import tensors as _tensors
from .eligible import Found, blocker, find_layers, first_inputs, is_linear
from .refresh import refresh
from .select import Layers, select

__all__ = ["swap", "unswap", "choices", "Choice"]


Algos = Union[str, Sequence[str], Mapping[Any, str], Callable[[nn.Module, Any], str]]


@dataclass
class Choice:
    """The algorithm of one swapped layer. ``fallback``: why the request was not honoured.
    A layer left as it is (not a plain convolution) has ``requested`` and ``algorithm``
    None and the reason in ``fallback``."""

    name: str
    requested: str | None
    algorithm: str | None
    fallback: str | None
    spec: str | None
    tuning: dict | None


def _valid(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise ConvgapError(f"{where}: expected an algorithm name (str), got {name!r}; "
                           f"available: {', '.join(registry.names())}, auto")
    if name != "auto" and name not in registry.names():
        raise ConvgapError(f"{where}: unknown algorithm {name!r}; available: "
                           f"{', '.join(registry.names())}, auto")
    return name


def _requests(model: nn.Module, algos: Algos, found: Found) -> dict[str, str]:
    """Layer name -> requested algorithm, validated before anything is swapped."""
    modules = dict(model.named_modules())
    order, inputs = found.order, found.inputs
    if isinstance(algos, str):
        return {n: _valid(algos, "what") for n in order}
    if isinstance(algos, Mapping):
        out = {}
        for key, name in algos.items():
            if isinstance(key, type):
                hits = [n for n in order if isinstance(modules[n], key)]
            elif isinstance(key, str) and key in modules:
                hits = [key] if key in order else []
                if not hits and not isinstance(modules[key], nn.Conv2d):
                    raise ConvgapError(f"what[{key!r}]: that module is a "
                                       f"{type(modules[key]).__name__}, not a Conv2d")
            else:
                raise ConvgapError(f"what has key {key!r}, which is neither a module name "
                                   f"of the model nor a module type; conv layers: "
                                   f"{', '.join(order[:8])}{', ...' if len(order) > 8 else ''}")
            for n in hits:
                out[n] = _valid(name, f"what[{key!r}]")
        return out
    if callable(algos):
        out = {}
        for n in order:
            shape = tuple(inputs[n][0].shape) if n in inputs else None
            out[n] = _valid(algos(modules[n], shape), f"what({n!r}, {shape}) returned")
        return out
    if isinstance(algos, Sequence):
        if len(algos) != len(order):
            raise ConvgapError(f"what is a list of {len(algos)} names but the model has "
                               f"{len(order)} Conv2d layers (in forward order: "
                               f"{', '.join(order[:6])}{', ...' if len(order) > 6 else ''})")
        return {n: _valid(a, f"what[{i}]") for i, (n, a) in enumerate(zip(order, algos))}
    raise ConvgapError(f"what must be a name, a list, a dict, a callable or 'auto'; got "
                       f"{type(algos).__name__}")


def swap(model: nn.Module, what: Algos, example_input: torch.Tensor | None = None, *,
         layers: Layers = None, inplace: bool = False, check: bool = True,
         quiet: bool = False, candidates: Sequence[str] | None = None,
         malloc: str | None = "retain", linear: str | None = None) -> nn.Module:
    """Replace the model's ``nn.Conv2d`` layers by :class:`AlgoConv2d` running chosen
    algorithms; returns the swapped model (a copy unless ``inplace``).

    ``what``: one algorithm name for every conv; a list of names, one per selected conv in
    forward order (module order without ``example_input``); a dict mapping module names or
    module types to names (other convs are left alone); a callable
    ``(module, input_shape) -> name``
    (``input_shape`` is None without ``example_input``); or ``"auto"``: time every supported
    algorithm on each layer's real input and keep the fastest correct one (needs
    ``example_input``; ``candidates`` limits the algorithms tried; decisions are cached).
    ``layers``: which layers are considered at all (None: every Conv2d, and every Linear
    unless ``linear='keep'``; or module names, a module type, a callable
    ``(name, module) -> bool``: :mod:`convgap.transforms.select`).

    ``check`` (with ``example_input``; :func:`convgap.changes` and :func:`choices` report
    every outcome):

    - the numerical check against the original: each rebuilt layer is run on the input it
      sees in the swapped model against the original module, then the whole model against
      the original model's output; a layer that disagrees runs torch; if the whole model
      still disagrees every layer does (or, failing that, the original modules are put back);
    - for 'auto', the model-level timing check: a *layout variant* is tuned too (the first
      conv that was tuned on a plain NCHW input and measured no slower in
      ``channels_last`` runs that, so every layer after it sees channels_last maps, BN,
      activations and adds included, and the later convs are tuned for that layout); the
      per-layer tuned model, the variant, torch everywhere and eager channels_last are
      then timed interleaved and the fastest wins, by the median of per-round ratios
      against torch everywhere; if no tuned model is faster, every layer runs torch.

    ``check=False`` applies the choices unchecked (per-layer 'auto' decisions still verify
    each candidate's output while measuring).

    ``linear``: what ``nn.Linear`` layers run (pointwise convolutions on channels-last maps,
    as in ConvNeXt, and classifier heads), as :class:`~convgap.algorithms.AlgoLinear`:
    'torch', 'prepacked' (oneDNN, CPU; 2.4x MKL's sgemm on this AMD CPU) or 'auto'
    (measured, cached, and part of the model-level check); 'keep' leaves them alone;
    None (default) means 'auto' when ``what`` is 'auto', else 'keep'. With an
    ``example_input`` only layers that the forward pass calls are swapped.

    Parameters are shared with the replaced layers: ``state_dict`` is unchanged. A requested
    algorithm that cannot run a layer falls back to ``torch``, with an
    :class:`AlgorithmFallbackWarning`; :func:`choices` lists every layer's outcome.
    """
    if not isinstance(model, nn.Module):
        raise ConvgapError(f"swap needs an nn.Module, got {type(model).__name__}")
    if candidates is not None:
        for c in candidates:
            _valid(c, "candidates")
    if malloc is not None:
        allocator.check_policy(malloc)
    if linear is None:
        linear = "auto" if isinstance(what, str) and what == "auto" else "keep"
    if linear != "keep":
        check_linear(linear, "linear")
    with_linear = linear != "keep"
    chosen = set(select(model, layers, lambda m: isinstance(m, nn.Conv2d) or (
        with_linear and isinstance(m, nn.Linear)), lambda n, m: True,
        "Conv2d or Linear" if with_linear else "Conv2d (linear='keep')"))
    found = find_layers(model, example_input, linear=with_linear)
    found.skipped = {n: r for n, r in found.skipped.items() if n in chosen}
    inputs = found.inputs
    modules = dict(model.named_modules())
    order = [n for n in found.order if isinstance(modules[n], nn.Conv2d) and n in chosen]
    linears = [n for n in found.order if is_linear(modules[n]) and n in chosen
               and (example_input is None or n in inputs)]
    requests = _requests(model, what, Found(order, found.skipped, inputs))
    if "auto" in requests.values() and example_input is None:
        raise ConvgapError("what='auto' measures each layer on its real input: pass "
                           "example_input (a batch of the shape you will run)")
    if example_input is None and (linear == "auto" and linears):
        raise ConvgapError("linear='auto' measures each layer on its real input: pass "
                           "example_input (a batch of the shape you will run)")
    if found.skipped:
        warnings.warn(f"{len(found.skipped)} layer(s) left as they are: " + "; ".join(
            f"{n}: {r}" for n, r in found.skipped.items()), AlgorithmFallbackWarning,
            stacklevel=2)
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    originals = {n: modules[n] for n in [*requests, *linears]}
    fallbacks = []
    for n, name in requests.items():
        conv = modules[n]
        layer = AlgoConv2d(conv, name)
        if candidates is not None:
            layer.candidates = list(candidates)
        if name not in ("auto", "torch") and n in inputs:
            spec = ConvSpec.from_conv(conv, inputs[n][0])
            reason = registry.get(name).supports(spec)
            if reason is not None:
                layer.set_algorithm("torch", reason)
                fallbacks.append(f"{n} ({spec.short()}): {reason}")
        model.set_submodule(n, layer)
    for n in linears:
        layer = AlgoLinear(modules[n], linear)
        if linear == "prepacked" and n in inputs:
            spec = LinearSpec.from_linear(modules[n], inputs[n][0])
            reason = supports_prepacked(spec)
            if reason is not None:
                layer.set_algorithm("torch", reason)
                fallbacks.append(f"{n} ({spec.short()}): {reason}")
        model.set_submodule(n, layer)
    if fallbacks:
        warnings.warn(f"{len(fallbacks)} layer(s) fall back to torch: " + "; ".join(fallbacks),
                      AlgorithmFallbackWarning, stacklevel=2)
    n_auto = sum(1 for v in requests.values() if v == "auto") + \
        (len(linears) if linear == "auto" else 0)
    was_training = model.training
    model.eval()
    if n_auto:
        # the variant needs a conv tuned on a plain NCHW input; copy only if one can be
        try_variant = check and (candidates is None or LAYOUT_VARIANT in candidates) and \
            any(requests.get(n) == "auto" and layout_of(args[0]) == "nchw"
                for n, args in inputs.items())
        variant = copy.deepcopy(model) if try_variant else None  # swapped, not yet tuned
        first = None
        on_cpu = isinstance(example_input, torch.Tensor) and example_input.device.type == "cpu"
        with allocator.use(malloc if on_cpu else None), make_progress(quiet) as progress:
            task = progress.add_task("tuning convolutions", total=n_auto)
            with tuning_progress(progress, task), torch.no_grad():
                model(example_input)
                first = (_layout_variant_head(model, order, inputs) if variant is not None
                         else None)
                if first is not None:
                    progress.update(task, total=2 * n_auto)
                    variant.get_submodule(first).set_algorithm(LAYOUT_VARIANT)
                    progress.advance(task)
                    variant(example_input)
                else:
                    variant = None
            if check:
                _verify_model(model, example_input, variant, first, order)
    if check and example_input is not None:
        _check_against_original(model, originals, found, example_input)
    model.train(was_training)
    return model


def _tolerance(layer: nn.Module, x: torch.Tensor) -> float:
    """Relative error accepted from a swapped layer's current algorithm on input ``x``."""
    if isinstance(layer, AlgoConv2d):
        if layer.algorithm in ("auto", "torch"):
            return tuner.tolerance(registry.get("torch"), layer.spec_for(x))
        return tuner.tolerance(registry.get(layer.algorithm), layer.spec_for(x))
    spec = layer.spec_for(x)
    return max(LINEAR_TOLERANCE, tuner.precision_tolerance(spec.dtype, spec.device))


def _output_error(y: Any, ref: Any) -> float:
    """The largest relative error over the tensors of two outputs of the same structure."""
    ys, refs = _tensors(y), _tensors(ref)
    if len(ys) != len(refs):
        return math.inf
    return max((tuner.relative_error(a, b) for a, b in zip(ys, refs)), default=0.0)


@torch.no_grad()
def _check_against_original(model: nn.Module, originals: dict[str, nn.Module], found: Found,
                            x: torch.Tensor) -> None:
    """The apply-time check of every swap with an example input: each rebuilt layer against
    the *original* module on the input the layer sees in the swapped model (its layout
    included), then the whole model against the original model's output (captured before
    anything was rebuilt). A layer that disagrees runs torch; if the whole model still
    disagrees every layer does; if even that disagrees, the original modules are put back.
    Each step warns with the numbers."""
    rebuilt = {n: model.get_submodule(n) for n in originals}
    rebuilt = {n: m for n, m in rebuilt.items() if isinstance(m, (AlgoConv2d, AlgoLinear))}
    seen, y = first_inputs({m: n for n, m in rebuilt.items()}, lambda: model(x))
    problems, tols, changed = [], [1e-4], False
    for n, layer in rebuilt.items():
        if n not in seen:
            continue
        args, orig = seen[n], originals[n]
        ref = orig(*args)
        tol = _tolerance(layer, args[0])
        err = _output_error(layer(*args), ref)
        if err > tol and layer.algorithm != "torch":
            reason = (f"check against the original layer: {layer.algorithm} differs by "
                      f"{err:.2e} > {tol:.0e}; runs torch")
            layer.set_algorithm("torch", reason)
            problems.append(f"{n}: {reason}")
            changed = True
            tol = _tolerance(layer, args[0])
            err = _output_error(layer(*args), ref)
        if err > tol:  # even torch: the rebuilt layer is not the original's computation
            model.set_submodule(n, orig)
            problems.append(f"{n}: the rebuilt layer differs from the original by {err:.2e}; "
                            "the original is kept")
            changed = True
        tols.append(tol)
    tol = max(tols)
    err = _output_error(model(x) if changed else y, found.output)
    if err > tol:
        swapped = {n: m for n, m in model.named_modules()
                   if isinstance(m, (AlgoConv2d, AlgoLinear)) and n in originals}
        reason = (f"model-level check against the original model: output differs by "
                  f"{err:.2e} > {tol:.0e}; every layer runs torch")
        for m in swapped.values():
            if m.algorithm != "torch":
                m.set_algorithm("torch", reason)
        err = _output_error(model(x), found.output)
        if err > tol:
            for n in swapped:
                model.set_submodule(n, originals[n])
            reason = (f"model-level check against the original model: output differs by "
                      f"{err:.2e} > {tol:.0e} even with torch everywhere; the original "
                      "layers are kept")
        problems.append(reason)
    if problems:
        warnings.warn("; ".join(problems), AlgorithmFallbackWarning, stacklevel=3)


LAYOUT_VARIANT = "channels_last"  # what the first conv runs in the layout variant


HEAD_CANDIDATES = 3  # convs confirmed head to head before the variant gives up


def _layout_variant_head(model: nn.Module, order: list[str],
                         inputs: dict[str, tuple] | None = None) -> str | None:
    """Where the layout variant switches to channels_last: the first conv (forward order)
    tuned by 'auto' on a plain NCHW input whose ``channels_last`` time (input conversion
    included) is no worse than ``torch``'s, so the switch costs that layer nothing (a
    3-channel 7x7 stem, 1.3x slower in NHWC here, is passed over). The tuner's round-robin
    medians nominate; with the layer's captured input in ``inputs``, a head-to-head of
    the two (median of per-round ratios, at most ``HEAD_CANDIDATES`` layers) confirms (a
    mobilenet_v2 stem nominated by its medians re-checked 1.1x slower alone). None if no
    conv qualifies."""
    tried = 0
    for n in order:
        m = model.get_submodule(n)
        if not isinstance(m, AlgoConv2d) or m.requested != "auto":
            continue
        tun = m.tuning or {}
        times = tun.get("times") or {}
        if not (tun.get("layout") == "nchw" and m.in_channels > 1 and "torch" in times
                and LAYOUT_VARIANT in times and times[LAYOUT_VARIANT] <= times["torch"]):
            continue
        if inputs is None or n not in inputs:
            return n
        if tried == HEAD_CANDIDATES:
            return None
        tried += 1
        x = inputs[n][0]
        probe, plain = AlgoConv2d(m, LAYOUT_VARIANT), m.to_conv2d()
        with torch.no_grad():
            t_cl, t_torch = timing.compare([lambda: probe(x), lambda: plain(x)],
                                           config.CONFIRM_ROUNDS, x.device.type)
        ratio = timing.paired_ratio(t_cl, t_torch)
        if ratio <= 1.0:
            m.tuning = dict(tun, variant_head_ratio=ratio)
            return n
    return None


def _verify_model(model: nn.Module, x: torch.Tensor, variant: nn.Module | None = None,
                  first: str | None = None, order: Sequence[str] = ()) -> None:
    """Model-level guard for 'auto': per-layer wins can turn into a whole-model loss (a
    layout one layer prefers slows the layers after it), and a layout no single layer
    gains from can win for the whole model. Time, interleaved, the tuned model, a copy
    running torch everywhere (eager PyTorch in the input's layout), the layout ``variant``
    (its conv ``first`` runs channels_last) and, for a plain NCHW 4-D input, eager PyTorch
    in channels_last (the model and input converted). The faster of the two plain
    configurations (by median per-round ratio against torch) is the incumbent; the faster
    of the tuned model and the variant replaces it only if its paired ratio against it is
    at most ``1 - config.MARGIN``. Eager channels_last is taken as the first conv of
    ``order`` running ``channels_last`` and every tuned layer torch; torch everywhere as
    every layer running torch. So 'auto' is never slower than eager PyTorch in either
    layout. (Paired ratios, not a ratio of medians: a shared machine's
    drifts of several percent would otherwise revert real wins at random.)"""
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (AlgoConv2d, AlgoLinear)) and m.requested == "auto"}
    head = next((n for n in order if isinstance(layers.get(n), AlgoConv2d)), None)
    plain_cl = head is not None and x.dim() == 4 and layout_of(x) == "nchw"
    if variant is None and not plain_cl and all(m.algorithm == "torch"
                                                for m in layers.values()):
        return
    reference = unswap(model)  # plain nn.Conv2d everywhere; the tuned layers keep their state
    fns = {"tuned": lambda: model(x), "torch": lambda: reference(x)}
    if variant is not None:
        fns["variant"] = lambda: variant(x)
    if plain_cl:
        eager_cl = copy.deepcopy(reference).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fns["eager_cl"] = lambda: eager_cl(x_cl)
    for name, fn in fns.items():
        fn.__name__ = name  # what each timed callable is (reports, tests)
    with torch.no_grad():
        timings = timing.compare(list(fns.values()), config.MODEL_CHECK, x.device.type)
    del reference
    by = dict(zip(fns, timings))
    ratio = {n: timing.paired_ratio(t, by["torch"]) for n, t in by.items()}
    # plain PyTorch (either layout) is the incumbent; a tuned configuration replaces it only
    # when faster by config.MARGIN against the faster plain one, paired in the same rounds
    # (the smallest ratio alone let a noisy 1% win stand for a real 4% loss)
    plain = min((n for n in ("torch", "eager_cl") if n in by), key=ratio.__getitem__)
    tuned = min((n for n in ("tuned", "variant") if n in by), key=ratio.__getitem__)
    best = tuned if timing.paired_ratio(by[tuned], by[plain]) <= 1 - config.MARGIN else plain
    summary = ", ".join(f"{n} {1e3 * t.median:.3g} ms ({ratio[n]:.3f})" for n, t in by.items())
    if best == "variant":
        note = (f"layout variant: {first} runs channels_last and so does everything after "
                f"it; whole model, paired ratio against torch everywhere: {summary}")
        for n, m in layers.items():
            v = variant.get_submodule(n)
            m.set_algorithm(v.algorithm, v.fallback)
            if n == first:
                m.tuning = dict(m.tuning or {}, choice=v.algorithm, variant=note)
            else:
                m.tuning = v.tuning
        return
    if best == "eager_cl":
        note = (f"model-level check: eager channels_last was fastest ({summary}): {head} "
                "runs channels_last, every other layer torch on channels_last maps, "
                "4-D weights in channels_last")
        # what was measured: the model's 4-D weights in channels_last too (with NCHW
        # weights the same choices ran 1-2% slower on efficientnet_b0, measured); the values
        # are unchanged, and set_algorithm/refresh drop state prepared from the old tensors
        model.to(memory_format=torch.channels_last)
        refresh(model)
        for n, m in layers.items():
            if n == head:
                m.set_algorithm(LAYOUT_VARIANT)
                m.tuning = dict(m.tuning or {}, choice=LAYOUT_VARIANT, variant=note)
            elif m.algorithm != "torch":
                m.set_algorithm("torch", note)
        return
    if best == "torch" and any(m.algorithm != "torch" for m in layers.values()):
        reason = f"model-level check: nothing beat torch everywhere ({summary}); kept torch"
        for m in layers.values():
            m.set_algorithm("torch", reason)
        warnings.warn(reason, AlgorithmFallbackWarning, stacklevel=3)


def choices(model: nn.Module) -> list[Choice]:
    """What each swapped layer runs, in module order, and the Conv2d / Linear layers that
    every transform leaves as they are (``requested`` and ``algorithm`` None, ``fallback``
    the reason: a subclass with its own forward, hooks, parametrizations)."""
    out = []
    for n, m in model.named_modules():
        if isinstance(m, (AlgoConv2d, AlgoLinear)):
            out.append(Choice(n, m.requested, m.algorithm, m.fallback,
                              (m.tuning or {}).get("spec"), m.tuning))
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and (reason := blocker(m)) is not None:
            out.append(Choice(n, None, None, reason, None, None))
    return out


def unswap(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Turn every AlgoConv2d / AlgoLinear back into a plain nn.Conv2d / nn.Linear
    (parameters shared)."""
    if not inplace:
        model = copy.deepcopy(model)
    for n, m in list(model.named_modules()):
        if isinstance(m, AlgoConv2d):
            model.set_submodule(n, m.to_conv2d())
        elif isinstance(m, AlgoLinear):
            model.set_submodule(n, m.to_linear())
    return model
