"""Profile: where one factorized layer's eager call spends its time, host against device.

One TensorialConv2d (or FlattenedConv2d) on one input shape, against the dense 3x3 of the
same channels, and against its own contraction path run as torch steps:
1. eager latency (timing.compare: every sample synchronised, host launch overhead included);
2. host time per call: N calls enqueued back to back without synchronising, divided by N
   (on CPU the same work as eager; on a GPU the host's share, which hides behind the device
   when the device is the slower);
3. on CUDA, device time per call (timing.compare_graphs: the calls captured in a CUDA graph,
   replayed between CUDA events);
4. torch.profiler's top operators and kernels for the layer, and cProfile's top Python
   functions by own time (the host's share, function by function).

    python benchmarks/layer_profile.py [--family cp] [--channels 256] [--size 14]
        [--batch 8] [--compression 10] [--layout nchw|channels_last] [--device cpu|cuda]
        [--threads 2] [--calls 200]

Prints a table and writes benchmarks/results/layer_profile_<family>_<channels>_<device>.json
(--out to change).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import time
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"


def host_per_call(fn, calls: int, device: str) -> float:
    """Seconds per call to enqueue ``calls`` calls (synchronised before, not between)."""
    from convgap import timing
    best = float("inf")
    for _ in range(5):
        timing.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
        timing.synchronize(device)
    return best


def top_functions(fn, calls: int, n: int = 12) -> list[dict]:
    """cProfile's top ``n`` functions by own (tottime) seconds per call over ``calls``."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({name})", "calls": ncalls / calls,
                     "own_us": 1e6 * tottime / calls, "cumulative_us": 1e6 * cumtime / calls})
    return sorted(rows, key=lambda r: -r["own_us"])[:n]


def top_ops(fn, calls: int, device: str, n: int = 10) -> list[dict]:
    """torch.profiler's top ``n`` events by self device time (CPU: self CPU time), per call."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", 0.0) or 0.0
        rows.append({"name": e.key[:80], "count": e.count / calls,
                     "self_cpu_us": e.self_cpu_time_total / calls,
                     "self_device_us": dev_us / calls})
    key = "self_device_us" if device == "cuda" else "self_cpu_us"
    return sorted(rows, key=lambda r: -r[key])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="cp",
                    help="cp, tucker, tt, tr, rcp (TensorialConv2d) or flattened")
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--size", type=int, default=14)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--compression", type=float, default=10.0)
    ap.add_argument("--layout", default="nchw", choices=("nchw", "channels_last"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=200, help="calls per host/profile sample")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.calls < 1:
        ap.error("--calls must be >= 1")
    import convgap
    from convgap import timing
    from convgap.einsum import einsum
    from convgap.layers import FlattenedConv2d, TensorialConv2d
    device = str(torch.device(args.device))
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:  # IEEE fp32 everywhere, as benchmarks/tensorial.py
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    c, size = args.channels, args.size
    torch.manual_seed(0)
    dense = nn.Conv2d(c, c, 3, padding=1, bias=False).eval().to(device)
    if args.family == "flattened":
        layer = FlattenedConv2d(c, c, 3, padding=1, bias=False).eval().to(device)
    else:
        layer = TensorialConv2d(c, c, 3, args.family, compression=args.compression,
                                padding=1, bias=False).eval().to(device)
    x = torch.randn(args.batch, c, size, size, device=device)
    if args.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        dense = dense.to(memory_format=torch.channels_last)
    fns = {"dense": lambda: dense(x), "layer": lambda: layer(x)}
    if isinstance(layer, TensorialConv2d):
        xi, conv = layer._input(x), layer._conv_args()
        fns["steps"] = lambda: einsum(layer.expression, xi, *layer.factors, **conv)
    cfg = timing.TimingConfig(warmup=3, min_repeats=20, max_repeats=200, min_time=0.2)
    console = Console(width=200)
    out: dict = {"benchmark": "layer_profile", "family": args.family, "channels": c,
                 "size": size, "batch": args.batch, "compression": args.compression,
                 "layout": args.layout, "device": device, "threads": args.threads,
                 "device_name": convgap.hardware.device_name(device),
                 "torch": torch.__version__, "convgap": convgap.__version__,
                 "python": platform.python_version(), "calls": args.calls}
    with timing.threads(args.threads), torch.no_grad():
        eager = dict(zip(fns, timing.compare(list(fns.values()), cfg, device)))
        out["runs"] = layer.kernel_for(x)
        rows = {}
        for name, fn in fns.items():
            rows[name] = {"eager_ms": eager[name].median_ms,
                          "host_ms": 1e3 * host_per_call(fn, args.calls, device)}
        if on_cuda:
            graphs = timing.compare_graphs(list(fns.values()), cfg, device)
            for name, t in zip(fns, graphs):
                rows[name]["device_ms"] = t.median_ms
        out["times"] = rows
        out["layer_ops"] = top_ops(fns["layer"], min(args.calls, 50), device)
        if "steps" in fns:
            out["steps_ops"] = top_ops(fns["steps"], min(args.calls, 50), device)
        out["layer_python"] = top_functions(fns["layer"], args.calls)
    t = Table(title=f"{args.family} {args.compression:g}x, {c} ch @ {size}, batch "
                    f"{args.batch}, {args.layout}, {out['device_name']}, {args.threads} "
                    f"threads; layer runs {out['runs']}", title_justify="left")
    for col in ("call", "eager ms", "host ms / call", "device ms / call"):
        t.add_column(col, justify="left" if col == "call" else "right")
    for name, r in rows.items():
        t.add_row(name, f"{r['eager_ms']:.4f}", f"{r['host_ms']:.4f}",
                  f"{r['device_ms']:.4f}" if "device_ms" in r else "-")
    console.print(t)
    for key in ("layer_ops", "steps_ops"):
        if key not in out:
            continue
        t = Table(title=f"{key.split('_')[0]}: torch.profiler, per call", title_justify="left")
        for col in ("event", "count", "self CPU us", "self device us"):
            t.add_column(col, justify="left" if col == "event" else "right")
        for r in out[key]:
            t.add_row(r["name"], f"{r['count']:.2g}", f"{r['self_cpu_us']:.1f}",
                      f"{r['self_device_us']:.1f}")
        console.print(t)
    t = Table(title="layer: Python functions by own time, per call (cProfile; its overhead "
                    "inflates every row)", title_justify="left")
    for col in ("function", "calls", "own us", "cumulative us"):
        t.add_column(col, justify="left" if col == "function" else "right")
    for r in out["layer_python"]:
        t.add_row(r["function"], f"{r['calls']:.2g}", f"{r['own_us']:.1f}",
                  f"{r['cumulative_us']:.1f}")
    console.print(t)
    if args.out is None:
        args.out = RESULTS / f"layer_profile_{args.family}_{c}_{torch.device(device).type}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
