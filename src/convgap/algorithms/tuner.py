"""Measured algorithm choice ('auto') and the persistent tuning cache.

For a layer's real input, every registered algorithm that supports the spec is prepared,
checked against ``F.conv2d`` (relative error max|y - ref| / max|ref| within the algorithm's
``tolerance``, widened to the reference's own rounding in fp16 / bf16 / TF32:
:func:`tolerance`), and timed interleaved with the others (medians). The fastest correct one
wins, but a non-``torch`` algorithm must then beat ``torch`` by ``MARGIN`` again in a
head-to-head confirmation (two callables interleaved, more repeats, judged on the median of
the per-round ratios), so neither noise nor the
cache pollution of a heavy neighbour in the round-robin replaces the reference with
something no faster.

Decisions persist in ``tuning.json`` in the convgap cache directory, keyed by device name,
torch version, threads, the malloc policy on CPU (:mod:`convgap.allocator`) and the full
spec (which includes dtype, layout and input shape); writes are atomic; a corrupt file is
reported and rebuilt; a hit times nothing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
from typing import Any, Iterator, Sequence

import torch

from .. import allocator, cache, timing
from ..hardware import device_name
from . import registry
from .module import AlgoConv2d
from .spec import ConvSpec

__all__ = ["tune_layer", "tune_spec", "cache_key", "TUNING_FILE", "TUNE_CONFIG", "MARGIN",
           "relative_error", "tuning_progress", "tolerance", "precision_tolerance",
           "PRECISION_TOLERANCE"]

TUNING_FILE = "tuning.json"
TUNE_CONFIG = timing.TimingConfig(warmup=2, min_repeats=5, max_repeats=25, min_time=0.05)
CONFIRM_CONFIG = timing.TimingConfig(warmup=3, min_repeats=15, max_repeats=200, min_time=0.2)
MARGIN = 0.03
# Accepted relative error where the reference itself is computed in reduced precision:
# the fp16 / bf16 output rounding (unit roundoff 4.9e-4 / 3.9e-3, with room for accumulation
# order), and fp32 on CUDA while ``torch.backends.cudnn.allow_tf32`` lets F.conv2d multiply
# in TF32 (10 mantissa bits, as fp16). An algorithm's own ``tolerance`` is a floor.
PRECISION_TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "tf32": 2e-3}

_memory: dict[tuple[str, str], dict] = {}  # (cache dir, key) -> decision, this process
_progress: list[tuple[Any, Any]] = []  # (rich Progress, task) of the running swap


def cache_key(spec: ConvSpec) -> str:
    """Tuning-cache key: device name, torch version, threads, (CPU) the malloc policy in
    force, and the full spec."""
    dev = "cpu" if spec.device == "cpu" else f"{spec.device}:{torch.cuda.current_device()}"
    malloc = f"|malloc={allocator.policy()}" if spec.device == "cpu" else ""
    return (f"{device_name(dev)}|torch={torch.__version__}|threads={torch.get_num_threads()}"
            f"{malloc}|{spec.key()}")


def precision_tolerance(dtype: str, device: str) -> float:
    """The rounding of a reference computed in ``dtype`` on ``device`` as a relative error
    bound (0 for fp32/fp64 without TF32): :data:`PRECISION_TOLERANCE`."""
    if dtype == "float32" and device == "cuda" and torch.backends.cudnn.allow_tf32:
        dtype = "tf32"
    return PRECISION_TOLERANCE.get(dtype, 0.0)


def tolerance(alg: registry.Algorithm, spec: ConvSpec) -> float:
    """Relative error accepted from ``alg`` against ``F.conv2d`` on ``spec``: the algorithm's
    own ``tolerance``, widened to the rounding of the reference's precision."""
    return max(alg.tolerance, precision_tolerance(spec.dtype, spec.device))


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (inf on shape mismatch or non-finite values)."""
    if y.shape != ref.shape:
        return math.inf
    scale = ref.abs().max().item() or 1.0
    err = (y.float() - ref.float()).abs().max().item() / scale
    return err if math.isfinite(err) else math.inf


@contextlib.contextmanager
def tuning_progress(progress: Any, task: Any) -> Iterator[None]:
    """Advance ``task`` of a rich ``progress`` once per tuned layer inside the block."""
    _progress.append((progress, task))
    try:
        yield
    finally:
        _progress.pop()


def _lookup(key: str) -> dict | None:
    mkey = (str(cache.cache_dir()), key)
    if mkey in _memory:
        return _memory[mkey]
    entry = cache.read_json(TUNING_FILE).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("choice"), str):
        _memory[mkey] = entry
        return entry
    return None


def _store(key: str, entry: dict) -> None:
    _memory[(str(cache.cache_dir()), key)] = entry
    entries = cache.read_json(TUNING_FILE)  # merge with what other processes wrote
    entries[key] = entry
    cache.write_json(TUNING_FILE, entries)


def clear_memory() -> None:
    """Forget this process's cached decisions (the file is left as is)."""
    _memory.clear()


@torch.no_grad()
def tune_spec(layer, x: torch.Tensor, candidates: Sequence[str] | None = None,
              config: timing.TimingConfig = TUNE_CONFIG) -> dict:
    """Measure every candidate algorithm on ``layer`` (an AlgoConv2d) with input ``x``.

    Returns ``{"choice", "times": {name: median_s}, "errors": {name: rel_err},
    "rejected": {name: reason}}``."""
    spec = layer.spec_for(x)
    names = list(candidates) if candidates is not None else registry.names()
    if "torch" not in names:
        names.insert(0, "torch")
    ref = layer._torch(x)
    fns, kept, errors, rejected = [], [], {}, {}
    for name in names:
        alg = registry.get(name)
        reason = alg.supports(spec)
        if reason is not None:
            rejected[name] = f"unsupported: {reason}"
            continue
        # each candidate is timed as it will run: an AlgoConv2d sharing the parameters
        probe = AlgoConv2d(layer, name)
        if name != "torch":
            try:
                y = probe(x)
            except Exception as exc:  # a broken plug-in must not stop tuning
                rejected[name] = f"failed: {type(exc).__name__}: {exc}"
                continue
            err = relative_error(y, ref)
            errors[name] = err
            tol = tolerance(alg, spec)
            if err > tol:
                rejected[name] = f"relative error {err:.2e} > tolerance {tol:.0e}"
                continue
        fns.append(lambda probe=probe: probe(x))
        kept.append(name)
    results = timing.compare(fns, config, spec.device)
    times = {name: t.median for name, t in zip(kept, results)}
    best = min(times, key=times.get)
    confirm = None
    if best != "torch":
        # Round-robin timing penalises whoever runs after a cache-thrashing candidate
        # (im2col, fft): confirm the winner head-to-head against torch alone.
        pair = [fns[kept.index(best)], fns[kept.index("torch")]]
        t_best, t_torch = timing.compare(pair, CONFIRM_CONFIG, spec.device)
        ratio = timing.paired_ratio(t_best, t_torch)
        confirm = {"chosen_s": t_best.median, "torch_s": t_torch.median, "ratio": ratio}
        if ratio > 1 - MARGIN:
            best = "torch"
    return {"choice": best, "times": times, "errors": errors, "rejected": rejected,
            "confirm": confirm,
            "threads": torch.get_num_threads(),
            "malloc": allocator.policy() if spec.device == "cpu" else None,
            "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def tune_layer(layer, x: torch.Tensor) -> None:
    """Choose ``layer``'s algorithm for input ``x`` from the cache, or measure and cache it.
    Called by AlgoConv2d.forward while its algorithm is 'auto'."""
    spec = layer.spec_for(x)
    key = cache_key(spec)
    candidates = getattr(layer, "candidates", None)
    entry = _lookup(key)
    usable = (entry is not None and entry["choice"] in registry.names()
              and registry.get(entry["choice"]).supports(spec) is None
              and (candidates is None or entry["choice"] in candidates
                   or entry["choice"] == "torch"))
    if not usable:
        entry = tune_spec(layer, x, candidates)
        _store(key, entry)
        entry = dict(entry, cached=False)
    else:
        entry = dict(entry, cached=True)
    layer.set_algorithm(entry["choice"])
    layer.tuning = dict(entry, spec=spec.short(), layout=spec.layout, spec_key=spec.key())
    advance_progress()


def advance_progress() -> None:
    """One layer tuned: advance the running swap's progress bar, if any."""
    if _progress:
        progress, task = _progress[-1]
        progress.advance(task)
