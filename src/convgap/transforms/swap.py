"""swap: choose, per convolution, which algorithm runs (by name, list, dict, callable, 'auto')."""

from __future__ import annotations

import copy
import statistics
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch
import torch.nn as nn

from ..algorithms import registry
from ..algorithms.module import AlgoConv2d, AlgorithmFallbackWarning
from ..algorithms.spec import ConvSpec
from ..algorithms.tuner import tuning_progress
from .. import timing
from ..errors import ConvgapError
from ..progress import make_progress

__all__ = ["swap", "unswap", "choices", "Choice"]

VERIFY_CONFIG = timing.TimingConfig(warmup=2, min_repeats=11, max_repeats=40, min_time=1.0)

Algos = Union[str, Sequence[str], Mapping[Any, str], Callable[[nn.Module, Any], str]]


@dataclass
class Choice:
    """The algorithm of one swapped layer. ``fallback``: why the request was not honoured."""

    name: str
    requested: str
    algorithm: str
    fallback: str | None
    spec: str | None
    tuning: dict | None


def _convs_in_order(model: nn.Module, example_input) -> tuple[list[str], dict[str, tuple]]:
    """Names of the Conv2d layers in forward order (module order without an input), and the
    input of each conv's first call when ``example_input`` is given."""
    names = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            names.setdefault(m, n)
    if example_input is None:
        return list(names.values()), {}
    order: list[str] = []
    inputs: dict[str, tuple] = {}

    def hook(m, args):
        n = names[m]
        if n not in inputs:
            order.append(n)
            inputs[n] = args
    handles = [m.register_forward_pre_hook(hook) for m in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    except Exception as exc:
        raise ConvgapError(f"the model failed on example_input of shape "
                           f"{tuple(example_input.shape)}: {exc}") from exc
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    unused = [n for n in names.values() if n not in inputs]
    return order + unused, inputs


def _valid(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise ConvgapError(f"{where}: expected an algorithm name (str), got {name!r}; "
                           f"available: {', '.join(registry.names())}, auto")
    if name != "auto" and name not in registry.names():
        raise ConvgapError(f"{where}: unknown algorithm {name!r}; available: "
                           f"{', '.join(registry.names())}, auto")
    return name


def _requests(model: nn.Module, algos: Algos, order: list[str],
              inputs: dict[str, tuple]) -> dict[str, str]:
    """Layer name -> requested algorithm, validated before anything is swapped."""
    modules = dict(model.named_modules())
    if isinstance(algos, str):
        return {n: _valid(algos, "algos") for n in order}
    if isinstance(algos, Mapping):
        out = {}
        for key, name in algos.items():
            if isinstance(key, type):
                hits = [n for n in order if isinstance(modules[n], key)]
            elif isinstance(key, str) and key in modules:
                hits = [key] if key in order else []
                if not hits:
                    raise ConvgapError(f"algos[{key!r}]: that module is a "
                                       f"{type(modules[key]).__name__}, not a Conv2d")
            else:
                raise ConvgapError(f"algos has key {key!r}, which is neither a module name "
                                   f"of the model nor a module type; conv layers: "
                                   f"{', '.join(order[:8])}{', ...' if len(order) > 8 else ''}")
            for n in hits:
                out[n] = _valid(name, f"algos[{key!r}]")
        return out
    if callable(algos):
        out = {}
        for n in order:
            shape = tuple(inputs[n][0].shape) if n in inputs else None
            out[n] = _valid(algos(modules[n], shape), f"algos({n!r}, {shape}) returned")
        return out
    if isinstance(algos, Sequence):
        if len(algos) != len(order):
            raise ConvgapError(f"algos is a list of {len(algos)} names but the model has "
                               f"{len(order)} Conv2d layers (in forward order: "
                               f"{', '.join(order[:6])}{', ...' if len(order) > 6 else ''})")
        return {n: _valid(a, f"algos[{i}]") for i, (n, a) in enumerate(zip(order, algos))}
    raise ConvgapError(f"algos must be a name, a list, a dict, a callable or 'auto'; got "
                       f"{type(algos).__name__}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap(model: nn.Module, algos: Algos, example_input: torch.Tensor | None = None, *,
         inplace: bool = False, candidates: Sequence[str] | None = None,
         verify: bool = True, quiet: bool = False) -> nn.Module:
    """Replace the model's ``nn.Conv2d`` layers by :class:`AlgoConv2d` running chosen
    algorithms; returns the swapped model (a copy unless ``inplace``).

    ``algos``: one algorithm name for every conv; a list of names, one per conv in forward
    order (module order without ``example_input``); a dict mapping module names or module
    types to names (other convs are left alone); a callable ``(module, input_shape) -> name``
    (``input_shape`` is None without ``example_input``); or ``"auto"``: time every supported
    algorithm on each layer's real input and keep the fastest correct one (needs
    ``example_input``; ``candidates`` limits the algorithms tried; decisions are cached;
    with ``verify`` the tuned model is then timed against torch-everywhere and reverted to
    torch if it is not faster).

    Parameters are shared with the replaced convs: ``state_dict`` is unchanged. A requested
    algorithm that cannot run a layer falls back to ``torch``, with an
    :class:`AlgorithmFallbackWarning`; :func:`choices` lists every layer's outcome.
    """
    if not isinstance(model, nn.Module):
        raise ConvgapError(f"swap needs an nn.Module, got {type(model).__name__}")
    if candidates is not None:
        for c in candidates:
            _valid(c, "candidates")
    order, inputs = _convs_in_order(model, example_input)
    requests = _requests(model, algos, order, inputs)
    if "auto" in requests.values() and example_input is None:
        raise ConvgapError("algos='auto' measures each layer on its real input: pass "
                           "example_input (a batch of the shape you will run)")
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
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
        _replace(model, n, layer)
    if fallbacks:
        warnings.warn(f"{len(fallbacks)} layer(s) fall back to torch: " + "; ".join(fallbacks),
                      AlgorithmFallbackWarning, stacklevel=2)
    n_auto = sum(1 for v in requests.values() if v == "auto")
    if n_auto:
        was_training = model.training
        model.eval()
        with make_progress(quiet) as progress:
            task = progress.add_task("tuning convolutions", total=n_auto)
            with tuning_progress(progress, task), torch.no_grad():
                model(example_input)
            if verify:
                _verify_model(model, example_input)
        model.train(was_training)
    return model


def _verify_model(model: nn.Module, x: torch.Tensor) -> None:
    """Model-level guard for 'auto': per-layer wins can turn into a whole-model loss (a
    layout one layer prefers slows the layers after it). Time the tuned model against a copy
    running torch everywhere, interleaved; if the median of the per-round ratios says it is
    not faster, keep torch everywhere. (Paired ratios, not a ratio of medians: a shared
    machine's drifts of several percent would otherwise revert real wins at random.)"""
    layers = [m for m in model.modules() if isinstance(m, AlgoConv2d) and m.requested == "auto"]
    if all(m.algorithm == "torch" for m in layers):
        return
    reference = unswap(model)  # plain nn.Conv2d everywhere; the tuned layers keep their state
    with torch.no_grad():
        t_tuned, t_ref = timing.compare([lambda: model(x), lambda: reference(x)],
                                        VERIFY_CONFIG, x.device.type)
    del reference
    ratio = statistics.median(a / b for a, b in zip(t_tuned.samples, t_ref.samples))
    if ratio > 1.0:
        reason = (f"model-level check: the tuned model took {1e3 * t_tuned.median:.3g} ms, "
                  f"torch everywhere {1e3 * t_ref.median:.3g} ms (paired ratio "
                  f"{ratio:.3f}); kept torch")
        for m in layers:
            m.set_algorithm("torch", reason)
        warnings.warn(reason, AlgorithmFallbackWarning, stacklevel=3)


def choices(model: nn.Module) -> list[Choice]:
    """What each swapped layer runs, in module order."""
    return [Choice(n, m.requested, m.algorithm, m.fallback,
                   (m.tuning or {}).get("spec"), m.tuning)
            for n, m in model.named_modules() if isinstance(m, AlgoConv2d)]


def unswap(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Turn every AlgoConv2d back into a plain nn.Conv2d (parameters shared)."""
    if not inplace:
        model = copy.deepcopy(model)
    for n, m in list(model.named_modules()):
        if isinstance(m, AlgoConv2d):
            _replace(model, n, m.to_conv2d())
    return model
