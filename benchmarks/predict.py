"""Benchmark: convgap.predict_latency against measurement (issue 21).

The calibration (``convgap.predict.calibrate``, on random networks only; ``--quick`` for
the quick one, timed) predicts every zoo model at 224x224 and the third-party-style models
of ``benchmarks/third_party_models.py`` (written to differ from the zoo; none is used in
calibration) at several image sizes, at each batch size and layout. Each is measured whole
(as ``convgap.analyze`` times it) and per leaf layer inside the running model
(``convgap.predict.profile``: every operator timed where it runs; the layers sum to the
run, which layers timed alone do not):

- per model: predicted ms, measured ms (the median of two interleaved timings of the whole
  model), error; the time one prediction takes; the two timings' disagreement (the
  measurement's noise within one window);
- every model measured again after the whole pass (minutes later): how far the same
  measurement moves on this machine over the benchmark's span ("re-measured": MAPE and
  the share within +-10% of the first measurement; its layers profiled again: their MAPE,
  plain and time-weighted), the floor under any prediction error judged against one
  measurement;
- a probe (:func:`probe`: a fixed small plan) timed after calibration and after each
  model's measurement: the share of rows measured while the machine ran it over 1.25x
  slower than at calibration, and the MAPE of the other rows;
- a memory probe (:func:`memory_probe`: one batch norm over 14.5 MB of activations)
  beside it: the two probes' medians over the rows against their calibration-time
  values (a host whose memory slows while small runs do not shows in the second only);
- summary: whole-model MAPE, the share of models within +-10% (nn-Meter's measure),
  per-layer MAPE (plain, and weighted by measured time), Spearman's rank correlation of
  predicted and measured over all models; per variant; and the dynamic blocks' own MAPE
  over the densities.

Every model plain (both layouts); the zoo and the first eight validation models also as
variants (channels-last): swapped (``convgap.swap``: Winograd F(2x2, 3x3) on every dense 3x3
stride-1 conv), factorized in two families (``convgap.factorize`` Tucker and TT at compression
4), fused (``convgap.fuse``: a whole-network oneDNN plan where the model lowers to one,
predicted as the faster of the plan and its fused blocks; else every matched block) and
dynamic (``convgap.make_dynamic``,
spatial, granularity 4, forced to densities 0.75 / 0.5 / 0.25); the variants of resnet50,
convnext_tiny and convfirst at batch 1 only (time). Prints the tables and writes
benchmarks/results/predict.json::

    python benchmarks/predict.py [--quick] [--recalibrate] [--threads 2] [--batch 1 8]
        [--variants plain swapped tucker tt fused dyn0.75 dyn0.5 dyn0.25]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

RESULTS = Path(__file__).parent / "results"
ZOO = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "convfirst")
# third-party-style models and the image side each is predicted at
VALIDATION = {"resnet_d": 160, "resnext": 128, "regnet": 160, "mobilenetv3": 224,
              "mixnet": 128, "ghostnet": 192, "repvgg": 128, "densenet": 96,
              "dla": 128, "hrnet": 96, "res2net": 128, "inception_v3": 160,
              "xception": 128, "cspresnet": 160, "vgg_bn": 96, "lcnet": 224}


def models(names):
    from convgap import models as zoo
    sys.path.insert(0, str(Path(__file__).parent))
    from third_party_models import MODELS
    for name in names:
        torch.manual_seed(0)
        if name in ZOO:
            yield name, zoo.create(name).eval(), 224
        else:
            yield name, MODELS[name]().eval(), VALIDATION[name]


VARIANTS = ("plain", "swapped", "tucker", "tt", "fused", "dyn0.75", "dyn0.5", "dyn0.25")
VARIANT_MODELS = list(ZOO) + list(VALIDATION)[:8]
# their variants at batch 1 only (a batch-8 call takes 0.2-0.5 s here: the session's time)
HEAVY = ("resnet50", "convnext_tiny", "convfirst")


def variant(model, name):
    """``model`` as the variant ``name``, or None where it changes nothing."""
    import convgap
    from convgap.dynamic import force_density
    from convgap.layers import FusedNetwork
    from convgap.predict.units import is_unit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "plain":
            return model
        if name == "swapped":
            def winograd(n, m):   # dense 3x3 stride-1 convs: where Winograd applies
                return (type(m) is torch.nn.Conv2d and m.kernel_size == (3, 3)
                        and m.stride == (1, 1) and m.groups == 1)
            if not any(winograd(n, m) for n, m in model.named_modules()):
                return None
            return convgap.swap(model, "winograd_f2", layers=winograd, quiet=True)
        if name in ("tucker", "tt"):
            try:
                out = convgap.factorize(model, name, compression=4.0, quiet=True)
            except convgap.ConvgapError:
                return None
        elif name == "fused":   # as fuse makes it: a whole-network plan where it lowers
            out = convgap.fuse(model, quiet=True)
            if isinstance(out, FusedNetwork):
                return out
        else:
            try:
                out = convgap.make_dynamic(model, "spatial", granularity=4, check=False,
                                           quiet=True)
            except convgap.ConvgapError:
                return None
            force_density(out, float(name[3:]))
    return out if any(is_unit(m) for m in out.modules()) else None


def cases(args):
    """(name, variant, model, side, batch, layout) of every row, in order; the same rows
    (fresh models) on every call."""
    for name, base, side in models(args.models):
        for var in args.variants:
            if var != "plain" and name not in VARIANT_MODELS:
                continue
            model = variant(base, var)
            if model is None:
                continue
            batches = args.batch if var == "plain" or name not in HEAVY else args.batch[:1]
            for batch in batches:
                for layout in (args.layouts if var == "plain" else ["channels_last"]):
                    yield name, var, model, side, batch, layout


def measure(model, side, batch, layout, pair=False):
    """The model's latency (s): the median of two interleaved timings' medians (``pair``:
    both timings' medians)."""
    from convgap import config, timing
    from convgap.ops.layouts import memory_format
    model = model.to(memory_format=memory_format(layout))
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=memory_format(layout))
    with torch.no_grad():
        a, b = timing.compare([lambda: model(x), lambda: model(x)], config.ANALYZE_MODEL)
    return (a.median, b.median) if pair else (a.median + b.median) / 2


def layer_times(model, pred, side, batch, layout):
    """(the profiled run's op times, each predicted layer's time inside it by name; {}
    where the run's operators do not match the recording's). A whole-network plan
    predicted as its plan: its primitives timed inside the plan's run."""
    from convgap import ConvgapError
    from convgap.ops.layouts import memory_format
    from convgap.predict.plan import plan_times
    from convgap.predict.profile import align, by_module, profile
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=memory_format(layout))
    if pred.path == "plan":
        prof = plan_times(model, x, repeats=5)
        return prof, by_module(pred.ops, prof, [r.name for r in pred.layers])
    prof = profile(model.to(memory_format=memory_format(layout)), x, repeats=5)
    try:
        return prof, by_module(pred.ops, align(pred.ops, prof), [r.name for r in pred.layers])
    except ConvgapError:
        return prof, {}


def probe():
    """The machine's state now: a fixed small whole-network plan (random network 0 at
    64x64, batch 1) timed, seconds (the median of 0.2 s of runs). Small two-thread runs
    here swing up to 2x with the host's other tenants for minutes at a time (a 0.2 ms plan:
    0.19 ms in one window, 0.42 in the next), more than any prediction error; a row's probe
    against the calibration's says which window it was measured in."""
    from convgap import choice, timing
    from convgap.layers import FusedNetwork
    from convgap.predict.synthetic import network
    from convgap.transforms.patterns import NETWORK
    import convgap
    global _PROBE
    if "_PROBE" not in globals():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = convgap.fuse(network(0)[0], quiet=True, patterns=[NETWORK])
        x = torch.randn(1, 3, 64, 64)
        if isinstance(net, FusedNetwork):
            with choice.forced({FusedNetwork.KIND: "plan"}), torch.no_grad():
                net(x)
        _PROBE = (net, x)
    net, x = _PROBE
    with torch.no_grad():
        return timing.measure(lambda: net(x), timing.TimingConfig(
            warmup=3, min_repeats=10, max_repeats=2000, min_time=0.2), "cpu").median


def memory_probe():
    """The machine's memory-bound speed now: a batch norm (inference) over a fixed
    channels-last (8, 144, 56, 56) float32 map (14.5 MB in, 14.5 MB out: past this host's
    L2, like the zoo's activations) timed, seconds (the median of 0.2 s of runs)."""
    from convgap import timing
    global _MEMORY_PROBE
    if "_MEMORY_PROBE" not in globals():
        torch.manual_seed(0)
        bn = nn.BatchNorm2d(144).eval()
        x = torch.randn(8, 144, 56, 56).contiguous(memory_format=torch.channels_last)
        _MEMORY_PROBE = (bn, x)
    bn, x = _MEMORY_PROBE
    with torch.no_grad():
        return timing.measure(lambda: bn(x), timing.TimingConfig(
            warmup=3, min_repeats=10, max_repeats=2000, min_time=0.2), "cpu").median


def run_one(name, model, side, batch, layout, cal):
    """(the row, the prediction)."""
    from convgap import predict_latency
    from convgap.ops.layouts import memory_format
    model = model.to(memory_format=memory_format(layout))
    shape = (batch, 3, side, side)
    t0 = time.perf_counter()
    pred = predict_latency(model, shape, layout=layout, calibration=cal)
    predict_s = time.perf_counter() - t0
    # the whole model twice, interleaved: their median is the measured latency, their
    # disagreement the measurement's noise within one window (a second pass over all
    # models measures it again minutes later: main)
    a, b = measure(model, side, batch, layout, pair=True)
    measured_s = (a + b) / 2
    probe_s, memory_s = probe(), memory_probe()
    prof, measured = layer_times(model, pred, side, batch, layout)
    layers = [{"name": r.name, "type": r.type, "predicted_s": r.seconds,
               "measured_s": measured[r.name]}
              for r in pred.layers if measured.get(r.name)]
    return {"model": name, "batch": batch, "layout": layout, "side": side,
            "predicted_s": pred.total_s, "measured_s": measured_s,
            "profiled_s": sum(prof), "repeat": a / b - 1, "probe_s": probe_s,
            "memory_probe_s": memory_s,
            "error": pred.total_s / measured_s - 1, "predict_s": predict_s,
            "ops": len(pred.ops), "layers": layers}, pred


def summary(rows):
    from scipy.stats import spearmanr
    errs = [abs(r["error"]) for r in rows]
    dyn = [abs(l["predicted_s"] / l["measured_s"] - 1) for r in rows for l in r["layers"]
           if l["type"] == "DynamicBlock"]
    layer = [(abs(l["predicted_s"] / l["measured_s"] - 1), l["measured_s"])
             for r in rows for l in r["layers"]]
    again = [(abs(l["remeasured_s"] / l["measured_s"] - 1), l["measured_s"])
             for r in rows for l in r["layers"] if l.get("remeasured_s")]
    slow = [r for r in rows if r["probe_s"] > 1.25 * rows[0]["cal_probe_s"]]
    return {"models": len(rows), "mape": statistics.mean(errs),
            "probe_slow_share": len(slow) / len(rows),
            "mape_probe_as_calibration": statistics.mean(
                abs(r["error"]) for r in rows if r not in slow) if len(slow) < len(rows)
            else None,
            "probe_ratio": statistics.median(r["probe_s"] / r["cal_probe_s"] for r in rows),
            "memory_probe_ratio": statistics.median(
                r["memory_probe_s"] / r["cal_memory_probe_s"] for r in rows),
            "within_10": sum(e <= 0.10 for e in errs) / len(errs),
            "layer_mape": statistics.mean(e for e, _ in layer),
            "layer_weighted_mape": sum(e * w for e, w in layer) / sum(w for _, w in layer),
            "repeat_mape": statistics.mean(abs(r["repeat"]) for r in rows),
            "drift_mape": statistics.mean(abs(r["drift"]) for r in rows),
            "drift_within_10": sum(abs(r["drift"]) <= 0.10 for r in rows) / len(rows),
            "layer_drift_mape": statistics.mean(e for e, _ in again) if again else None,
            "layer_drift_weighted_mape": (sum(e * w for e, w in again)
                                          / sum(w for _, w in again)) if again else None,
            "spearman": float(spearmanr([r["predicted_s"] for r in rows],
                                        [r["measured_s"] for r in rows]).statistic),
            "predict_ms_median": statistics.median(r["predict_s"] for r in rows) * 1e3,
            "dynamic_block_mape": statistics.mean(dyn) if dyn else None}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"])
    p.add_argument("--models", nargs="+", default=list(ZOO) + list(VALIDATION))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--quick", action="store_true", help="the quick calibration")
    p.add_argument("--recalibrate", action="store_true", help="calibrate even if cached")
    p.add_argument("--malloc", default="retain", choices=("default", "retain"),
                   help="the malloc policy calibration and measurement run under (retain: "
                        "no page faults on large activations, the same for all)")
    p.add_argument("--out", type=Path, default=RESULTS / "predict.json")
    return p.parse_args(argv)


def main() -> None:
    from rich.console import Console
    from rich.table import Table
    from convgap import allocator, hardware, predict
    args = parse()
    warnings.simplefilter("ignore")   # the transforms' notes on what they left as it was
    torch.set_num_threads(args.threads)
    allocator.set_policy(args.malloc)
    console = Console(width=200, force_terminal=False)
    cpu = hardware.device_name("cpu")
    console.print(f"{cpu}, {args.threads} threads, fp32, batch {args.batch}, malloc "
                  f"{args.malloc}")
    t0 = time.perf_counter()
    cal = predict.calibrate(quick=args.quick, refresh=args.recalibrate)
    cal_s = time.perf_counter() - t0
    cal_probe_s, cal_memory_s = probe(), memory_probe()
    console.print(f"probes after calibration: plan {cal_probe_s * 1e3:.3f} ms, memory "
                  f"{cal_memory_s * 1e3:.3f} ms")
    console.print(f"calibration: {cal_s:.0f} s ({'quick' if args.quick else 'full'}"
                  f"{'' if args.recalibrate else ', possibly cached'}; "
                  f"{cal.stats.get('networks_run', '?')} random networks); whole-network "
                  f"weights {cal.weights}, fit {cal.stats.get('network_fit_mape', 0):.1%}")
    if args.quick and not args.recalibrate:
        console.print("(--quick without --recalibrate: a cached full calibration is used "
                      "if there is one)")
    rows, preds = [], []
    for name, var, model, side, batch, layout in cases(args):
        r, pred = run_one(name, model, side, batch, layout, cal)
        r["variant"], r["cal_probe_s"], r["cal_memory_probe_s"] = (var, cal_probe_s,
                                                                   cal_memory_s)
        rows.append(r)
        preds.append(pred)
        console.print(f"{name} {var} b{batch} {layout}: predicted "
                      f"{r['predicted_s']*1e3:.2f} ms, measured "
                      f"{r['measured_s']*1e3:.2f} ms, {r['error']:+.1%}", highlight=False)
    # every model measured again, minutes after its first measurement (the whole pass in
    # between): how far a measurement on this machine moves over the benchmark's span, the
    # floor under any prediction error judged against it
    console.print("measuring every model again ...")
    for r, pred, (name, var, model, side, batch, layout) in zip(rows, preds, cases(args)):
        r["remeasured_s"] = measure(model, side, batch, layout)
        r["drift"] = r["remeasured_s"] / r["measured_s"] - 1
        again = layer_times(model, pred, side, batch, layout)[1]
        for layer in r["layers"]:
            layer["remeasured_s"] = again.get(layer["name"])
    t = Table(title=f"predicted against measured, {cpu}, {args.threads} threads, fp32")
    for c in ("model", "variant", "side", "batch", "layout", "predicted ms", "measured ms",
              "error", "layer MAPE", "predict ms"):
        t.add_column(c, justify="right")
    for r in rows:
        lm = statistics.mean(abs(l["predicted_s"] / l["measured_s"] - 1)
                             for l in r["layers"]) if r["layers"] else float("nan")
        t.add_row(r["model"], r["variant"], str(r["side"]), str(r["batch"]), r["layout"],
                  f"{r['predicted_s']*1e3:.2f}", f"{r['measured_s']*1e3:.2f}",
                  f"{r['error']:+.1%}", f"{lm:.1%}", f"{r['predict_s']*1e3:.0f}")
    console.print(t)
    plain = [r for r in rows if r["variant"] == "plain"]
    groups = {"zoo, plain": [r for r in plain if r["model"] in ZOO],
              "validation, plain": [r for r in plain if r["model"] not in ZOO]}
    groups.update({v: [r for r in rows if r["variant"] == v] for v in VARIANTS
                   if v != "plain"})
    groups["all"] = rows
    s = Table(title="summary")
    for c in ("set", "models", "MAPE", "within +-10%", "layer MAPE", "layer MAPE (time-weighted)",
              "dynamic blocks MAPE", "Spearman", "predict ms (median)",
              "repeat |error| (noise)", "re-measured: MAPE / within 10%",
              "layers re-measured: MAPE (time-weighted)",
              "probe > 1.25x calibration's: rows / MAPE of the others",
              "probes / calibration's (median): plan / memory"):
        s.add_column(c, justify="right")
    sums = {}
    for g, rs in groups.items():
        if not rs:
            continue
        v = sums[g] = summary(rs)
        s.add_row(g, str(v["models"]), f"{v['mape']:.1%}", f"{v['within_10']:.0%}",
                  f"{v['layer_mape']:.1%}", f"{v['layer_weighted_mape']:.1%}",
                  "-" if v["dynamic_block_mape"] is None else f"{v['dynamic_block_mape']:.1%}",
                  f"{v['spearman']:.3f}", f"{v['predict_ms_median']:.0f}",
                  f"{v['repeat_mape']:.1%}",
                  f"{v['drift_mape']:.1%} / {v['drift_within_10']:.0%}",
                  "-" if v["layer_drift_mape"] is None else
                  f"{v['layer_drift_mape']:.1%} ({v['layer_drift_weighted_mape']:.1%})",
                  f"{v['probe_slow_share']:.0%} / " + (
                      "-" if v["mape_probe_as_calibration"] is None
                      else f"{v['mape_probe_as_calibration']:.1%}"),
                  f"{v['probe_ratio']:.2f} / {v['memory_probe_ratio']:.2f}")
    console.print(s)
    out = {"benchmark": "predict", "cpu": cpu, "threads": args.threads, "batches": args.batch,
           "malloc": args.malloc,
           "torch": torch.__version__, "calibration_s": cal_s, "quick": args.quick,
           "probe_after_calibration_s": cal_probe_s,
           "memory_probe_after_calibration_s": cal_memory_s,
           "weights": cal.weights, "calibration_stats": {
               k: v for k, v in cal.stats.items() if k != "networks"},
           "summary": sums, "rows": rows}
    args.out.write_text(json.dumps(out, separators=(",", ":")))   # every layer: compact
    console.print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
