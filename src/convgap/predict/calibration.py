"""Calibration: the operators of random networks timed where they run, fitted into one
latency model per operator kind, cached per device.

:func:`calibrate` records the operators of random networks (:mod:`.synthetic`; never a zoo
or user model) at batch 1 and 8 in both layouts, some of them fused (:func:`convgap.fuse`,
every matched block), made dynamic (:func:`convgap.make_dynamic`, spatial, at a random
granularity and forced density) or factorized (each full conv with a kernel replaced by a
randomly initialised CP, Tucker, TT or flattened layer at a random compression: latency
depends on the ranks, not on the values): their fused, sparse and factorized layers are
units (:mod:`.units`), each one op. Each network runs for real under
:func:`~convgap.predict.profile.profile`: every operator's time inside the network, with
the caches as the operators before it left them (an operator timed alone, again and
again, finds its weights in cache; at batch 1 in a network most do not: whole networks
here ran up to 2.3x the sum of their layers timed alone). Per kind
(:data:`~convgap.predict.features.KINDS`) a gradient-boosted regressor (scikit-learn's
``HistGradientBoostingRegressor``) learns log(measured / baseline) from the operator's
shape and its :func:`~convgap.predict.features.context` (how long ago its inputs were last
touched), the baseline being its roofline latency on the measured roofs plus one call's
overhead (the median time of a call that moves no data), so the model only learns how far
each operator falls from the roofs; a unit's baseline is its reference operators as the
other kinds' models predict them, times its work share (a sparse block's MACs at its
masks over its dense MACs, the kept tiles' halo included), so its model learns the unit's
speed-up on the work it does (a fused block's; a sparse block's, masker included), which
carries to sizes calibration never saw. A whole network is its operators' predictions summed
plus what eager PyTorch spends around them, per operator and per module (Python calls,
argument parsing), three weights fitted (non-negative least squares on relative errors) to
the calibration networks timed whole (:meth:`Calibration.total`).

Three times as many random networks as are profiled are, where they lower to a
whole-network oneDNN plan (:func:`convgap.fuse`'s pattern 'network'), bound as one at each
batch (in a seeded layout) and each primitive timed inside the plan's run
(:func:`~convgap.predict.plan.plan_times`): the plan kinds (``'plan_conv'``,
``'plan_matmul'``, ``'plan_memory'``) learn from those, and the call around a plan's steps
(:attr:`Calibration.plan_overhead_s`) is the median of its whole time less its steps'.

Cached (``$CONVGAP_CACHE/predict/``) per device name, threads, dtype, malloc policy, torch
version and :data:`VERSION`, like the roofs. Seconds throughout.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import pickle
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import allocator, cache, choice, hardware, timing
from ..errors import ConvgapError
from ..layers.network import FusedNetwork
from ..progress import make_progress
from .features import FEATURES, KINDS, baseline, context, features, kind
from ..ops.layouts import LAYOUTS, memory_format
from .plan import network_of, plan_ops, plan_times
from .profile import align, profile, with_densities
from .units import is_unit
from .record import UNIT_PREFIX, Op, record
from .synthetic import network

__all__ = ["Calibration", "calibrate", "load", "fit", "fit_sparse", "VERSION",
           "NETWORK_TIMING", "PROFILE_REPEATS"]

VERSION = 24  # bumped when the calibration changes: older cache entries are re-fitted
CACHE_DIR = "predict"
# whole networks: the targets of the network-level fit (the same small network timed twice
# with 0.05 s each differed by 21% on average on this shared 2-core machine)
NETWORK_TIMING = timing.TimingConfig(warmup=2, min_repeats=5, max_repeats=25, min_time=0.2)
PROFILE_REPEATS = 7                   # profiled runs per network: each op's median
NETWORKS = {True: 24, False: 80}     # quick: networks recorded and timed
# quick: no network's runs start after this many seconds of measuring, once QUICK_MIN have
# run (a slower host than this one, measured at 306-332 s for the 24, fits on fewer; the
# count is in stats["networks_run"])
QUICK_S = 230.0
QUICK_MIN = 12
# networks also bound as whole-network plans (a plan is cheap to time: about 0.25 s per
# network here), each at every batch in a seeded layout (the layout changes only the
# reorder of the input)
PLANS = {True: 3, False: 3}          # x NETWORKS
# every network as it is at each batch and layout, and changed by convgap's transforms at
# one (seeded) batch and layout per entry: dynamic three times (three densities: a sparse
# block's time is a function of its density), swapped twice (Winograd's batched GEMMs are
# shapes no plain network has); the whole-network plans are runs of their own (PLANS)
VARIANTS = ("plain", "fused", "dynamic", "dynamic", "dynamic", "factorized", "swapped",
            "swapped")
BATCHES = (1, 8)


@dataclass
class Calibration:
    """A device's fitted latency models. ``models``: per kind, a regressor of log(measured
    / baseline) from :func:`~convgap.predict.features.features` (None: the baseline alone);
    ``overhead_s``: one call's cost; ``sparse_s``: by dynamic unit type, a sparse block's
    fixed cost per call (its masker, the shortcut, the wrapper: fitted with the work it
    does, :func:`fit_sparse`; each kernel's its own); ``weights``: of the summed operator
    predictions ('ops'), the operator count ('op') and the module count ('module') in a
    whole network (:meth:`total`); ``plan_overhead_s``: what a whole-network plan's call
    costs beyond its steps (:meth:`plan_total`); ``stats``: sample counts and fit
    errors."""

    key: str
    roofs: hardware.Roofs
    overhead_s: float
    models: dict[str, Any]
    weights: dict[str, float]
    stats: dict = field(default_factory=dict)
    measured_at: str = ""
    sparse_s: dict[str, float] = field(default_factory=dict)
    plan_overhead_s: float = 0.0

    def plan_total(self, seconds: np.ndarray) -> float:
        """A whole-network plan's predicted latency from its steps' predictions
        (:meth:`op_seconds` of :func:`~convgap.predict.plan.plan_ops`): their sum and the
        call around them (``plan_overhead_s``: the module call, the bound plan's lookup,
        the output's allocation)."""
        return float(np.sum(seconds)) + self.plan_overhead_s

    def total(self, ops: Sequence[Op], seconds: np.ndarray, model: nn.Module) -> float:
        """A whole network's predicted latency from its ops, their predictions
        (:meth:`op_seconds`) and the model they were recorded from (its module count)."""
        modules = sum(1 for _ in model.modules())
        return float(_terms(ops, seconds, modules) @ _weight_vector(self.weights))

    def op_seconds(self, ops: Sequence[Op]) -> np.ndarray:
        """Each op's predicted latency inside the pass ``ops`` were recorded from, in call
        order (seconds)."""
        return _seconds(ops, context(ops), self.models, self.roofs, self.overhead_s,
                        self.sparse_s)


def _sparse(op: Op) -> bool:
    """Is the unit op a dynamic block (whose work follows its masks)?"""
    return op.name.startswith(UNIT_PREFIX + "DynamicBlock")


def _bases(ops: Sequence[Op], models: dict[str, Any], roofs: hardware.Roofs,
           overhead_s: float, sparse_s: dict[str, float] | None = None) -> np.ndarray:
    """What each op's calibrated factor multiplies (all ops of one kind): an ATen op's
    roofline plus one call; a unit's reference ops as predicted (each unit its own pass)
    times its work share (a sparse block's MACs at its masks over its dense MACs, the
    kept tiles' halo included), plus one call (a dynamic block: its type's fixed cost in
    ``sparse_s``; one call where None or absent), so that the unit's factor is its
    speed-up on the work it does, learned where the reference ops' models are sure. A unit
    that runs torch operators (:data:`~convgap.predict.units.TORCH_UNITS`) has them as its
    ``body``: its base is those operators as predicted (a torch-path dynamic block's
    gathers and GEMMs on its kept rows, whose cost a work share of the dense convolutions
    does not follow), plus the fixed cost. The units' reference ops (bodies) are predicted
    together: one regressor call per kind, not per unit."""
    if not ops or not ops[0].unit:
        return np.array([baseline(op, roofs, overhead_s) for op in ops])
    parts = [op.body or op.inner for op in ops]
    seconds = _seconds([r for p in parts for r in p],
                       [w for p in parts for w in context(p)], models, roofs, overhead_s)
    out, start = np.empty(len(ops)), 0
    for i, (op, part) in enumerate(zip(ops, parts)):
        end = start + len(part)
        fixed = (sparse_s.get(op.name.removeprefix(UNIT_PREFIX), overhead_s)
                 if sparse_s is not None and _sparse(op) else overhead_s)
        # a body is the work done at the masks; the reference, scaled by the work share
        out[i] = fixed + float(seconds[start:end].sum()) * (1.0 if op.body else op.detail[5])
        start = end
    return out


def _seconds(ops: Sequence[Op], where: Sequence[tuple], models: dict[str, Any],
             roofs: hardware.Roofs, overhead_s: float,
             sparse_s: dict[str, float] | None = None
             ) -> np.ndarray:
    """Each op's predicted seconds at its context ``where``, by its kind's model (None:
    the base alone)."""
    out = np.empty(len(ops))
    by_kind: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        by_kind.setdefault(kind(op), []).append(i)
    for k, idx in by_kind.items():
        base = _bases([ops[i] for i in idx], models, roofs, overhead_s, sparse_s)
        model = models.get(k)
        # a unit with a body is its body's operators as predicted: no factor of its own
        scaled = [j for j, i in enumerate(idx) if not ops[i].body]
        out[idx] = base
        if model is None or not scaled:
            continue
        x = np.array([features(ops[idx[j]], where[idx[j]]) for j in scaled], dtype=np.float64)
        out[[idx[j] for j in scaled]] = base[scaled] * np.exp(model.predict(x))
    return out


TERMS = ("ops", "op", "module")


def _terms(ops: Sequence[Op], seconds: np.ndarray, modules: int) -> np.ndarray:
    """The ops' predicted seconds summed, their count, the model's module count."""
    return np.array([float(np.sum(seconds)), len(ops), modules])


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


# features a kind's factor may only grow with: a unit's density and work share (its time
# grows with what it keeps; unconstrained, the trees put 20-39 of 86 sparse blocks of the
# benchmark faster at density 0.5 than at 0.25, or at 0.75 than at 0.5)
MONOTONE = ("density", "work_share")


def _regressor(k: str):
    from sklearn.ensemble import HistGradientBoostingRegressor
    categorical = [FEATURES[k].index(c) for c in ("op", "type") if c in FEATURES[k]] or None
    monotone = [1 if f in MONOTONE else 0 for f in FEATURES[k]]
    return HistGradientBoostingRegressor(max_iter=400, learning_rate=0.05,
                                         min_samples_leaf=4, l2_regularization=1e-3,
                                         categorical_features=categorical,
                                         monotonic_cst=monotone if any(monotone) else None,
                                         random_state=0)


def fit_sparse(work_s: np.ndarray, measured: np.ndarray, overhead_s: float) -> float:
    """A sparse dynamic block's fixed cost per call (seconds): ``c`` of ``measured ~ c + k
    work_s`` (``work_s``: its reference ops' predicted seconds times its work share; c, k
    >= 0 minimizing the relative error), at least one call's ``overhead_s``. Its masker,
    shortcut and wrapper cost about the same at any density, so the time does not scale
    with the work alone: scaled, the small blocks calibration sees put a large factor on
    the work at low densities, which large blocks do not have (resnet18 at 224x224,
    density 0.25, batch 8: +94% before)."""
    from scipy.optimize import nnls
    if len(measured) < 2:
        return overhead_s
    scale = 1.0 / measured
    (c, _), _ = nnls(np.stack([scale, work_s * scale], axis=1), np.ones(len(measured)))
    return max(float(c), overhead_s)


def fit(samples: Sequence[tuple[Op, tuple, float]], roofs: hardware.Roofs,
        overhead_s: float) -> tuple[dict[str, Any], dict, dict[str, float]]:
    """Per kind, a regressor of log(measured / base) on (op, its context, measured
    seconds) samples (units last: their base is their reference ops predicted by the other
    kinds' models, a dynamic block's plus its type's fixed cost, :func:`fit_sparse`; a unit
    with a body is predicted as its body's ops plus that fixed cost, with no factor, and
    is no sample of the units' regressor: fitted on calibration's small blocks, whose
    torch path is mostly Python between operators, the factor put the zoo's ConvFirst
    blocks 1.4-3.7x above their body's operators, and those within 10-25% of measured);
    returns (models, stats, the fixed costs by dynamic unit type) with each kind's sample
    count and in-sample median absolute relative error."""
    models: dict[str, Any] = {}
    stats: dict[str, dict] = {}
    sparse_s: dict[str, float] = {}
    for k in KINDS:
        mine = [(op, w, s) for op, w, s in samples if kind(op) == k]
        if not FEATURES[k] or len(mine) < 8:
            models[k] = None
            stats[k] = {"samples": len(mine)}
            continue
        if k == "unit":
            # per dynamic unit type: the tile kernel's fixed cost is not the torch path's
            for t in sorted({op.name for op, _, _ in mine if _sparse(op)}):
                dyn = [i for i, (op, _, _) in enumerate(mine) if op.name == t]
                work = _bases([mine[i][0] for i in dyn], models, roofs, overhead_s) \
                    - overhead_s
                sparse_s[t.removeprefix(UNIT_PREFIX)] = fit_sparse(
                    work, np.array([mine[i][2] for i in dyn]), overhead_s)
            stats["sparse_s"] = dict(sparse_s)
            mine = [(op, w, s) for op, w, s in mine if not op.body]   # no factor: above
            if len(mine) < 8:
                models[k] = None
                stats[k] = {"samples": len(mine)}
                continue
        x = np.array([features(op, w) for op, w, _ in mine], dtype=np.float64)
        base = _bases([op for op, _, _ in mine], models, roofs, overhead_s, sparse_s)
        y = np.log(np.array([s for *_, s in mine]) / base)
        model = _regressor(k).fit(x, y)
        err = np.abs(np.exp(model.predict(x) - y) - 1)
        models[k] = model
        stats[k] = {"samples": len(mine), "median_abs_rel_error": float(np.median(err))}
    return models, stats, sparse_s


def _networks(quick: bool) -> list[list[tuple[int, str, int, str, int]]]:
    """Per calibration network, its runs: (seed, variant, batch, layout, the variant's own
    seed)."""
    out = []
    for seed in range(NETWORKS[quick]):
        runs = []
        # plans spread over the whole calibration, not timed in one window of it (small
        # two-thread runs here change speed for minutes at a time)
        for plan in range(seed * PLANS[quick], (seed + 1) * PLANS[quick]):
            rng = random.Random(-1 - plan)
            runs += [(plan, "network", b, rng.choice(LAYOUTS), 0) for b in BATCHES]
        runs += [(seed, "plain", b, lay, 0) for b in BATCHES for lay in LAYOUTS]
        rng = random.Random(seed)
        runs += [(seed, v, rng.choice(BATCHES), rng.choice(LAYOUTS), seed * 100 + i)
                 for i, v in enumerate(VARIANTS[1:])]
        out.append(runs)
    return out


def _variant(net: nn.Module, seed: int, variant: str) -> nn.Module | None:
    """``net`` as calibrated: as it is, fused (every matched block), dynamic (spatial, a
    seeded granularity and forced density), factorized (:func:`_factorized`) or swapped (a
    seeded algorithm on every conv it supports); None where the variant changes
    nothing."""

    from ..dynamic.transform import dynamic_blocks, force_density, make_dynamic
    from ..transforms.fuse import fuse
    from ..transforms.patterns import NETWORK, block_patterns
    if variant == "plain":
        return net
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # what was left unfused or static
        if variant == "fused":   # blocks
            out = fuse(net, quiet=True, patterns=block_patterns())
            return out if any(is_unit(m) for m in out.modules()) else None
        if variant == "network":   # the whole network as one plan, where it lowers
            return network_of(fuse(net, quiet=True, patterns=[NETWORK]))
        rng = random.Random(seed)
        if variant == "factorized":
            return _factorized(net, rng)
        if variant == "swapped":
            return _swapped(net, rng)
        try:
            out = make_dynamic(net, "spatial", granularity=rng.choice((1, 2, 4, 8)),
                               check=False, quiet=True)
        except ConvgapError:     # no residual block it recognises
            return None
    return force_density(out, rng.choice((0.1, 0.25, 0.5, 0.75, 1.0)), seed) \
        if dynamic_blocks(out) else None


def _factorized(net: nn.Module, rng) -> nn.Module | None:
    """``net`` with each ungrouped conv with a kernel above 1x1 replaced by a randomly
    initialised factorized layer of the same geometry: one family for the network (CP,
    Tucker, TT, flattened), a compression of 2, 4 or 8 (None: no such conv)."""
    from ..layers import FlattenedConv2d, TensorialConv2d
    fam = rng.choice(("cp", "tucker", "tt", "flattened"))
    compression = rng.choice((2.0, 4.0, 8.0))
    convs = [(n, m) for n, m in net.named_modules() if type(m) is nn.Conv2d
             and m.groups == 1 and max(m.kernel_size) > 1 and isinstance(m.padding, tuple)
             and m.padding[0] == m.padding[1]]
    for name, c in convs:
        args = (c.in_channels, c.out_channels, c.kernel_size)
        geo = {"stride": c.stride, "padding": c.padding, "bias": c.bias is not None}
        layer = (FlattenedConv2d(*args, **geo) if fam == "flattened" else
                 TensorialConv2d(*args, fam, compression=compression, **geo))
        net.set_submodule(name, layer)
    return net.eval() if convs else None


SWAPPED = ("winograd_f2", "winograd_f4", "winograd_f2", "winograd_f4", "im2col", "fft",
           "implicit_gemm", "depthwise", "prepacked", "channels_last")   # Winograd: twice


def _swapped(net: nn.Module, rng) -> nn.Module | None:
    """``net`` with one seeded algorithm (:data:`SWAPPED`) on every conv it supports (None:
    on none)."""
    from ..algorithms import ConvSpec, registry
    from ..transforms.swap import swap
    alg = registry.get(rng.choice(SWAPPED))

    def supported(name: str, m: nn.Module) -> bool:
        if type(m) is not nn.Conv2d:
            return False
        x = torch.empty(1, m.in_channels, 32, 32, device="meta")
        return alg.supports(ConvSpec.from_conv(m, x)) is None
    if not any(supported(n, m) for n, m in net.named_modules()):
        return None
    return swap(net, alg.name, layers=supported, quiet=True)


def calibrate(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              threads: int | None = None, quick: bool = False, refresh: bool = False,
              quiet: bool = False) -> Calibration:
    """The latency models of ``device`` for ``dtype`` under ``threads`` (default: the
    current count): from the cache unless ``refresh``, else measured now (``quick``: fewer
    calibration networks, a few minutes on 2 CPU cores: no network starts after
    :data:`QUICK_S` seconds once :data:`QUICK_MIN` have run) and cached. Shows a progress
    bar unless ``quiet``."""
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
        groups = _networks(quick)
        total = sum(len(g) for g in groups)
        ran = 0           # networks whose runs started
        start = time.perf_counter()
        samples: list[tuple[Op, tuple, float]] = []
        recorded = []     # (ops, module count, whole seconds, profiled op sum)
        planned = []      # whole-network plans: (whole seconds, their steps' sum)
        skipped: list[str] = []
        with make_progress(quiet) as progress:
            task = progress.add_task("calibrating: random networks", total=total)
            for group in groups:
                if quick and ran >= QUICK_MIN and time.perf_counter() - start > QUICK_S:
                    progress.update(task, completed=total)
                    break
                ran += 1
                for seed, variant, batch, layout, own in group:
                    net, side = network(seed)
                    net = _variant(net, own, variant)
                    if net is None:
                        progress.advance(task)
                        continue
                    fmt = memory_format(layout)
                    net = net.to(dtype=dtype, memory_format=fmt)
                    shape = (batch, 3, side, side)
                    x = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
                    if variant == "network":
                        try:
                            ops = plan_ops(net, shape, layout, dtype)
                            seconds = plan_times(net, x, PROFILE_REPEATS)
                        except ConvgapError as exc:   # no plan for this input
                            skipped.append(f"{seed} {variant} b{batch} {layout}: {exc}")
                            progress.advance(task)
                            continue
                        samples += list(zip(ops, context(ops), seconds))
                        with choice.forced({FusedNetwork.KIND: "plan"}), torch.no_grad():
                            net(x)          # bound as its plan: the whole call timed next
                        with torch.no_grad():
                            whole = timing.measure(lambda: net(x), NETWORK_TIMING,
                                                   dev.type).median
                        planned.append((whole, sum(seconds)))
                        progress.advance(task)
                        continue
                    ops = record(net, shape, dtype, layout)
                    try:
                        prof = profile(net, x, PROFILE_REPEATS)
                        ops = with_densities(ops, prof)
                        seconds = align(ops, prof)
                    except ConvgapError as exc:  # ran other operators than recorded: no labels
                        skipped.append(f"{seed} {variant} b{batch} {layout}: {exc}")
                        progress.advance(task)
                        continue
                    samples += [(op, w, s) for op, w, s in zip(ops, context(ops), seconds)
                                if s is not None]
                    with torch.no_grad():
                        whole = timing.measure(lambda: net(x), NETWORK_TIMING, dev.type).median
                    recorded.append((ops, sum(1 for _ in net.modules()), whole,
                                     sum(s for s in seconds if s is not None)))
                    progress.advance(task)
        calls = [s for op, _, s in samples if kind(op) == "call"]
        overhead = statistics.median(calls) if calls else 1e-6
        models, stats, sparse_s = fit(samples, roofs, overhead)
        cal = Calibration(key, roofs, overhead, models, {}, stats,
                          _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                          sparse_s, statistics.median(max(w - s, 0.0) for w, s in planned)
                          if planned else 0.0)
        terms = np.array([_terms(ops, cal.op_seconds(ops), modules)
                          for ops, modules, _, _ in recorded])
        wholes = np.array([whole for _, _, whole, _ in recorded])
        cal.weights = fit_weights(terms, wholes)
        fitted = terms @ _weight_vector(cal.weights)
        cal.stats["networks"] = [
            {"ops": len(ops), "modules": modules, "whole_s": whole, "predicted_s": float(f),
             "ops_predicted_s": float(t[0]), "ops_profiled_s": profiled}
            for (ops, modules, whole, profiled), t, f in zip(recorded, terms, fitted)]
        cal.stats["skipped"] = skipped
        cal.stats["networks_run"] = ran
        cal.stats["plans"] = [{"whole_s": w, "steps_s": st} for w, st in planned]
        cal.stats["network_fit_mape"] = float(np.mean(np.abs(fitted / wholes - 1)))
        path = _path(key)
        cache.write_atomic(path, lambda fh: pickle.dump(cal, fh))
        return cal
