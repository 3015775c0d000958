"""Calibration: micro-benchmarks of the operators convgap's models run, fitted into one
latency model per operator kind, cached per device.

:func:`calibrate` records the operators of random networks (:mod:`.synthetic`; never a zoo
or user model) at batch 1 and 8 in both layouts, times each distinct operator alone
(:func:`~convgap.predict.record.replay`), and times each whole network. Per kind
(:data:`~convgap.predict.features.KINDS`) a gradient-boosted regressor (scikit-learn's
``HistGradientBoostingRegressor``) learns log(measured / baseline) from the operator's
features, the baseline being its roofline latency on the measured roofs plus one call's
overhead (the median time of a call that moves no data), so the model only learns how far
each shape falls from the roofs. A whole network is then predicted from its operators'
predictions summed per kind and its module count, with weights fitted (non-negative least
squares on relative errors) to the calibration networks' measured latencies
(:meth:`Calibration.total`): operators inside a network meet caches their lone timing did
not, and every module call costs Python time no operator shows.

Cached (``$CONVGAP_CACHE/predict/``) per device name, threads, dtype, malloc policy, torch
version and :data:`VERSION`, like the roofs. Seconds throughout.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import pickle
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import allocator, cache, hardware, timing
from ..errors import ConvgapError
from ..progress import make_progress
from .features import FEATURES, KINDS, baseline, features, kind
from ..ops.layouts import LAYOUTS
from .record import Op, record, replay
from .synthetic import network

__all__ = ["Calibration", "calibrate", "load", "fit", "time_ops", "VERSION", "OP_TIMING",
           "NETWORK_TIMING"]

VERSION = 4  # bumped when the calibration changes: older cache entries are re-fitted
CACHE_DIR = "predict"
# each operator alone: short timings on a shared machine read high (slowdowns, not
# speedups): 0.01 s per operator gave convs 17% above analyze's per-layer times
OP_TIMING = timing.TimingConfig(warmup=2, min_repeats=5, max_repeats=25, min_time=0.03)
# whole networks: the targets of the network-level fit (the same small network timed twice
# with 0.05 s each differed by 21% on average on this shared 2-core machine)
NETWORK_TIMING = timing.TimingConfig(warmup=2, min_repeats=5, max_repeats=25, min_time=0.2)
NETWORKS = {True: 12, False: 40}     # quick: networks recorded and timed
BATCHES = (1, 8)


@dataclass
class Calibration:
    """A device's fitted latency models. ``models``: per kind, a regressor of log(measured
    / baseline) from :func:`~convgap.predict.features.features` (None: the baseline alone);
    ``overhead_s``: one call's cost; ``weights``: of each kind's summed predictions and of
    the module count ('module') in a whole network (:meth:`total`); ``stats``: sample
    counts and fit errors."""

    key: str
    roofs: hardware.Roofs
    overhead_s: float
    models: dict[str, Any]
    weights: dict[str, float]
    stats: dict = field(default_factory=dict)
    measured_at: str = ""

    def total(self, ops: Sequence[Op], seconds: np.ndarray, model: nn.Module) -> float:
        """A whole network's predicted latency from its ops, their predictions
        (:meth:`op_seconds`) and the model they were recorded from (its module count)."""
        return float(_terms(ops, seconds, model) @ _weight_vector(self.weights))

    def op_seconds(self, ops: Sequence[Op]) -> np.ndarray:
        """Each op's predicted latency alone (seconds)."""
        out = np.empty(len(ops))
        by_kind: dict[str, list[int]] = {}
        for i, op in enumerate(ops):
            by_kind.setdefault(kind(op), []).append(i)
        for k, idx in by_kind.items():
            base = np.array([baseline(ops[i], self.roofs, self.overhead_s) for i in idx])
            model = self.models.get(k)
            if model is None:
                out[idx] = base
                continue
            x = np.array([features(ops[i]) for i in idx], dtype=np.float64)
            out[idx] = base * np.exp(model.predict(x))
        return out


TERMS = KINDS + ("module",)


def _terms(ops: Sequence[Op], seconds: np.ndarray, model: nn.Module) -> np.ndarray:
    """Per kind, the ops' predicted seconds summed; then the model's module count."""
    out = np.zeros(len(TERMS))
    for op, s in zip(ops, seconds):
        out[KINDS.index(kind(op))] += s
    out[-1] = sum(1 for _ in model.modules())
    return out


def _weight_vector(weights: dict[str, float]) -> np.ndarray:
    return np.array([weights.get(t, 0.0) for t in TERMS])


def fit_weights(terms: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Non-negative weights of :data:`TERMS` minimizing the relative error of
    ``terms @ w`` against ``measured`` (one row per network)."""
    from scipy.optimize import nnls
    scale = 1.0 / measured
    w, _ = nnls(terms * scale[:, None], np.ones(len(measured)))
    return dict(zip(TERMS, (float(v) for v in w)))


def _key(device: torch.device, dtype: torch.dtype, threads: int) -> str:
    return (f"{hardware.device_name(device)}|{device.type}|threads={threads}|"
            f"{str(dtype).removeprefix('torch.')}|malloc={allocator.policy()}|"
            f"torch={torch.__version__}|predict={VERSION}")


def _path(key: str):
    return cache.cache_dir() / CACHE_DIR / (hashlib.sha1(key.encode()).hexdigest()[:16]
                                            + ".pkl")


def load(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         threads: int | None = None) -> Calibration | None:
    """The cached calibration for this device, dtype and threads (default: the current
    count), or None."""
    dev = hardware.check_device(device)
    with timing.threads(threads if dev.type == "cpu" else None) as n:
        key = _key(dev, dtype, n)
    path = _path(key)
    try:
        with open(path, "rb") as fh:
            found = pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None
    return found if isinstance(found, Calibration) and found.key == key else None


def time_ops(ops: Sequence[Op], device: torch.device, config: timing.TimingConfig = OP_TIMING,
             found: dict[tuple, float] | None = None, progress=None, task=None
             ) -> dict[tuple, float]:
    """Median seconds of each distinct op (by :meth:`Op.key`) run alone on real tensors,
    added to ``found`` (ops already there are not timed again)."""
    found = {} if found is None else found
    gen = torch.Generator().manual_seed(0)
    for op in ops:
        k = op.key()
        if k not in found:
            fn = replay(op, gen)
            with torch.no_grad():
                found[k] = timing.measure(fn, config, device.type).median
            del fn
        if progress is not None:
            progress.advance(task)
    return found


def _regressor(k: str):
    from sklearn.ensemble import HistGradientBoostingRegressor
    categorical = [FEATURES[k].index("op")] if "op" in FEATURES[k] else None
    return HistGradientBoostingRegressor(max_iter=400, learning_rate=0.05,
                                         min_samples_leaf=4, l2_regularization=1e-3,
                                         categorical_features=categorical, random_state=0)


def fit(samples: Sequence[tuple[Op, float]], roofs: hardware.Roofs, overhead_s: float
        ) -> tuple[dict[str, Any], dict]:
    """Per kind, a regressor of log(measured / baseline) on (op, measured seconds) samples;
    returns (models, stats) with each kind's sample count and in-sample median absolute
    relative error."""
    models: dict[str, Any] = {}
    stats: dict[str, dict] = {}
    for k in KINDS:
        mine = [(op, s) for op, s in samples if kind(op) == k]
        if not FEATURES[k] or len(mine) < 8:
            models[k] = None
            stats[k] = {"samples": len(mine)}
            continue
        x = np.array([features(op) for op, _ in mine], dtype=np.float64)
        base = np.array([baseline(op, roofs, overhead_s) for op, _ in mine])
        y = np.log(np.array([s for _, s in mine]) / base)
        model = _regressor(k).fit(x, y)
        err = np.abs(np.exp(model.predict(x) - y) - 1)
        models[k] = model
        stats[k] = {"samples": len(mine), "median_abs_rel_error": float(np.median(err))}
    return models, stats


def _networks(quick: bool) -> list[tuple[int, int, str]]:
    """(seed, batch, layout) of the calibration runs."""
    return [(seed, batch, layout) for seed in range(NETWORKS[quick]) for batch in BATCHES
            for layout in LAYOUTS]


def calibrate(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              threads: int | None = None, quick: bool = False, refresh: bool = False,
              quiet: bool = False) -> Calibration:
    """The latency models of ``device`` for ``dtype`` under ``threads`` (default: the
    current count): from the cache unless ``refresh``, else measured now (``quick``: fewer
    calibration networks, a few minutes on 2 CPU cores) and cached. Shows a progress bar
    unless ``quiet``."""
    dev = hardware.check_device(device)
    if dev.type != "cpu":
        raise ConvgapError("calibration runs on the CPU for now (device='cpu'); GPU "
                           "prediction is not built yet")
    if not refresh:
        found = load(dev, dtype, threads)
        if found is not None:
            return found
    with timing.threads(threads) as n:
        key = _key(dev, dtype, n)
        roofs = hardware.roofs(dev, dtype)
        runs = _networks(quick)
        recorded = []
        for seed, batch, layout in runs:
            net, side = network(seed)
            if layout == "channels_last":
                net = net.to(memory_format=torch.channels_last)
            net = net.to(dtype)
            shape = (batch, 3, side, side)
            recorded.append((net, shape, layout, record(net, shape, dtype, layout)))
        total = sum(len(ops) for *_, ops in recorded)
        with make_progress(quiet) as progress:
            task = progress.add_task("calibrating: operators", total=total)
            measured: dict[tuple, float] = {}
            for *_, ops in recorded:
                time_ops(ops, dev, found=measured, progress=progress, task=task)
            wholes = []
            task2 = progress.add_task("calibrating: networks", total=len(recorded))
            for net, shape, layout, ops in recorded:
                x = torch.randn(shape).to(dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    wholes.append(timing.measure(lambda: net(x), NETWORK_TIMING,
                                                 dev.type).median)
                progress.advance(task2)
        distinct = {op.key(): (op, measured[op.key()]) for *_, ops in recorded for op in ops}
        calls = [s for op, s in distinct.values() if kind(op) == "call"]
        overhead = statistics.median(calls) if calls else 1e-6
        models, stats = fit(list(distinct.values()), roofs, overhead)
        cal = Calibration(key, roofs, overhead, models, {}, stats,
                          _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        predicted = [cal.op_seconds(ops) for *_, ops in recorded]
        terms = np.array([_terms(ops, p, net) for (net, *_, ops), p in
                          zip(recorded, predicted)])
        cal.weights = fit_weights(terms, np.array(wholes))
        fitted = terms @ _weight_vector(cal.weights)
        cal.stats["networks"] = [
            {"shape": shape, "layout": layout, "ops": len(ops), "modules": int(t[-1]),
             "whole_s": whole, "predicted_s": float(f), "ops_predicted_s": float(p.sum()),
             "ops_measured_s": sum(measured[o.key()] for o in ops)}
            for (_, shape, layout, ops), t, whole, f, p in
            zip(recorded, terms, wholes, fitted, predicted)]
        cal.stats["network_fit_mape"] = float(np.mean(np.abs(fitted / np.array(wholes) - 1)))
        path = _path(key)
        cache.write_atomic(path, lambda fh: pickle.dump(cal, fh))
        return cal

