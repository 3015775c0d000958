"""The convgap model zoo: own definitions of standard CNNs, with no weight downloads.

``create(name)`` builds a zoo model; ``load(spec)`` also accepts a user model given as
``package.module:factory``; ``load_weights(model, path)`` loads a user's own checkpoint.
Every residual-style block class carries a ``block_kind`` attribute ("basic", "bottleneck",
"inverted_residual", "mbconv", "convnext", "convfirst") that the counter uses to group layers.
Module and parameter names follow torchvision's definitions, so a state_dict saved from the
matching torchvision model has the same keys and shapes.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from convgap.errors import ConvgapError

from ._registry import factories, register
from . import convfirst as _convfirst  # noqa: F401  (imports fill the registry)
from . import convnext as _convnext  # noqa: F401
from . import efficientnet as _efficientnet  # noqa: F401
from . import mobilenet as _mobilenet  # noqa: F401
from . import resnet as _resnet  # noqa: F401

__all__ = ["BLOCK_KINDS", "check_state_dict", "create", "load", "load_weights", "names",
           "register"]

BLOCK_KINDS = ("basic", "bottleneck", "inverted_residual", "mbconv", "convnext", "convfirst")


def names() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(factories())


def _unknown_name_message(name: str) -> str:
    available = names()
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"unknown model {name!r}.{hint} Available models: {', '.join(available)}"
        " (or give your own as 'package.module:factory')."
    )


def create(name: str, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """Build the zoo model ``name`` with randomly initialised weights."""
    table = factories()
    if not isinstance(name, str) or name not in table:
        raise ConvgapError(_unknown_name_message(str(name)))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConvgapError(f"num_classes must be a positive integer, got {num_classes!r}")
    try:
        return table[name](num_classes=num_classes, **kwargs)
    except TypeError as e:
        if kwargs and "unexpected keyword argument" in str(e):
            raise ConvgapError(
                f"model {name!r} does not accept {e}; remove that option "
                f"(pass only options that {name}'s factory takes)"
            ) from e
        raise


def load(spec: str, num_classes: int | None = None) -> nn.Module:
    """Build a model from a zoo name or a ``package.module:factory`` spec.

    Zoo models take ``num_classes`` (None: 1000). For a ``module:factory`` spec the module
    is imported and ``factory()`` is called, with ``num_classes=`` when one is given, which
    the factory must then accept (else a clear error, never a silently ignored option); an
    ``nn.Module`` instance at that attribute is returned as is (and takes no
    ``num_classes``). The attribute may be dotted (``pkg.mod:Class.build``).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConvgapError(
            f"model spec must be a zoo name or 'package.module:factory', got {spec!r}"
        )
    spec = spec.strip()
    if ":" not in spec:
        return create(spec, num_classes=1000 if num_classes is None else num_classes)

    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ConvgapError(
            f"bad model spec {spec!r}: write it as 'package.module:factory', "
            "e.g. 'mymodels.nets:build'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConvgapError(
            f"cannot import module {module_name!r} for model spec {spec!r} ({e}); "
            "make sure it is installed or its folder is on PYTHONPATH"
        ) from e
    except Exception as e:  # the user's module raised while importing
        raise ConvgapError(
            f"importing module {module_name!r} for model spec {spec!r} failed with "
            f"{type(e).__name__}: {e}; fix the error in that module"
        ) from e

    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConvgapError(
                f"module {module_name!r} has no attribute {attr_path!r} (model spec {spec!r}); "
                "check the name after the ':'"
            )
        obj = getattr(obj, part)

    if isinstance(obj, nn.Module):
        if num_classes is not None:
            raise ConvgapError(
                f"{spec!r} is a model instance, so num_classes={num_classes} cannot be "
                "applied: drop --num-classes, or point the spec at a factory that takes "
                "num_classes")
        return obj
    if not callable(obj):
        raise ConvgapError(
            f"{spec!r} is a {type(obj).__name__}, not a callable; point the spec at a function "
            "that takes no arguments and returns an nn.Module"
        )
    kwargs = {}
    if num_classes is not None:
        if not _takes(obj, "num_classes"):
            raise ConvgapError(
                f"{spec} does not take num_classes, so num_classes={num_classes} cannot be "
                "applied: drop --num-classes, or give the factory a num_classes parameter")
        kwargs["num_classes"] = num_classes
    try:
        model = obj(**kwargs)
    except Exception as e:
        raise ConvgapError(
            f"calling {spec}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) raised "
            f"{type(e).__name__}: {e}; the factory must build the model from "
            f"{'these arguments' if kwargs else 'no arguments'}"
        ) from e
    if not isinstance(model, nn.Module):
        raise ConvgapError(
            f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module; make the "
            "factory return the model"
        )
    return model


def _takes(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` accepts keyword argument ``name`` (or any via **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               or p.kind == p.VAR_KEYWORD for p in params)


def _name_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    more = len(keys) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ConvgapError(
            f"{path} does not hold a state_dict (got {type(obj).__name__}); save weights with "
            "torch.save(model.state_dict(), path) or as {'state_dict': model.state_dict()}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConvgapError(
            f"{path} is not a state_dict: entries {_name_keys(bad)} are not named tensors; save "
            "weights with torch.save(model.state_dict(), path)"
        )
    return dict(obj)


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a user's checkpoint into ``model`` (in place) and return the model.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)`` and may be
    a plain state_dict or a dict holding one under "state_dict" or "model". A "module." prefix
    (DistributedDataParallel) is stripped when the model's own keys lack it. Keys and shapes
    must match the model exactly.
    """
    path_str = os.fspath(path)
    if not os.path.exists(path_str):
        raise ConvgapError(f"weights file {path_str} does not exist; check the path")
    if os.path.isdir(path_str):
        raise ConvgapError(f"weights path {path_str} is a folder; give the checkpoint file")
    try:
        obj = torch.load(path_str, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConvgapError(
            f"cannot read weights from {path_str} ({type(e).__name__}: {first[:200]}); the file "
            "must be written by torch.save(model.state_dict(), path) and hold only tensors "
            "(it is loaded with weights_only=True)"
        ) from e

    model.load_state_dict(check_state_dict(model, _extract_state_dict(obj, path_str), path_str),
                          strict=True)
    return model


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor],
                     source: str) -> dict[str, torch.Tensor]:
    """``state`` (read from ``source``, named in the message) checked against ``model``
    without loading it: keys and shapes must match exactly, else :class:`ConvgapError`
    listing what differs. A "module." prefix (DistributedDataParallel) is stripped when the
    model's own keys lack it. Returns the state to pass to ``model.load_state_dict``."""
    state = dict(state)
    expected = model.state_dict()
    if all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)} vs model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_name_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_name_keys(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_name_keys(mismatched)}")
    if problems:
        raise ConvgapError(
            f"weights in {source} do not fit {type(model).__name__}: " + "; ".join(problems)
            + ". Use a checkpoint saved from the same architecture and num_classes."
        )
    return state
