"""Benchmark: the efficiency gap of every zoo model, CPU, fp32, NCHW and channels_last.

For each model and batch size: GMACs, measured / ideal / roofline latency (ms),
computational efficiency, and the sum of isolated per-layer latencies over the whole-model
latency, for both layouts (each from convgap.analyze). Then the two layouts' whole-model
latencies are timed again interleaved in one run, and their ratio is reported. On CPU
each run also reports the page faults per forward pass and what glibc's default malloc
policy costs against retaining freed memory (convgap.allocator; both policies timed in
alternating blocks). The main numbers are measured as the process is (glibc's default).
Each model runs in a fresh process: the default policy's cost depends on the heap's history
(a free chunk left by an earlier model serves a large request without faults), and a
process serving one model is what a deployment looks like.

    python benchmarks/analyze_zoo.py [--threads 2] [--batch 1 8] [--models ...] [--quick]

Prints a table and writes benchmarks/results/analyze_zoo.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import convgap
from convgap import hardware, models, timing
from convgap.progress import make_progress

RESULTS = Path(__file__).parent / "results"


def layout_ratio(name: str, batch: int, threads: int, cfg: timing.TimingConfig) -> float:
    """channels_last / NCHW whole-model latency, the two timed interleaved."""
    with timing.threads(threads):
        net = models.create(name).eval()
        cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, 224, 224)
        xcl = x.contiguous(memory_format=torch.channels_last)
        t_nchw, t_cl = timing.compare([lambda: net(x), lambda: cl(xcl)], cfg)
    return t_cl.median / t_nchw.median


def _alloc(a: dict | None) -> str:
    if not a:
        return "-"
    return f"{1e3 * a['overhead_s']:.1f} ({100 * a['share']:.0f}%)"


def collect(args) -> list[dict]:
    """The rows of ``args.models`` (analyzed in this process)."""
    cfg = timing.QUICK if args.quick else None
    ratio_cfg = timing.QUICK if args.quick else timing.TimingConfig(2, 5, 15, 1.0)
    roofs = hardware.roofs("cpu", torch.float32, threads=args.threads)
    rows = []
    with make_progress() as progress:
        for name in args.models:
            model = models.create(name)
            for batch in args.batch:
                shape = (batch, 3, 224, 224)
                for layout in ("nchw", "channels_last"):
                    rep = convgap.analyze(model, shape, layout=layout, threads=args.threads,
                                          name=name, timing_config=cfg, roofs=roofs,
                                          progress=progress)
                    run = rep.runs[0]
                    t = run.total
                    rows.append({
                        "model": name, "batch": batch, "layout": layout,
                        "gmacs": t.macs / 1e9, "params": t.params,
                        "measured_ms": 1e3 * t.measured_s, "ideal_ms": 1e3 * t.ideal_s,
                        "roofline_ms": 1e3 * t.roofline_s, "efficiency": t.efficiency,
                        "bound": t.bound, "layers_ratio": run.layers_ratio,
                        "worst_layer": max(run.layers, key=lambda r: r.measured_s).name,
                        "malloc": run.malloc, "faults_per_call": run.faults_per_call,
                        "allocation": run.allocation,
                    })
                ratio = layout_ratio(name, batch, args.threads, ratio_cfg)
                rows[-1]["cl_over_nchw_interleaved"] = rows[-2]["cl_over_nchw_interleaved"] = ratio
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--models", nargs="+", default=models.names())
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS / "analyze_zoo.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        rows = collect(args)
        args.out.write_text(json.dumps(rows))
        return
    roofs = hardware.roofs("cpu", torch.float32, threads=args.threads)
    rows = []
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:  # one fresh process per model
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--child", "--models", name, "--threads",
                   str(args.threads), "--batch", *map(str, args.batch), "--out", str(out)]
            if args.quick:
                cmd.append("--quick")
            print(f"{name} ...", flush=True)
            subprocess.run(cmd, check=True)
            rows += json.loads(out.read_text())

    table = Table(title=f"analyze_zoo: CPU {roofs.device_name}, {args.threads} threads, fp32, "
                        f"224x224; roofs {roofs.peak_flops / 1e9:.0f} GFLOP/s, "
                        f"{roofs.bandwidth / 1e9:.0f} GB/s", title_justify="left")
    for col in ("model", "batch", "layout", "GMACs", "measured ms", "ideal ms", "roofline ms",
                "efficiency", "layers/model", "CL/NCHW (interleaved)", "faults/call",
                "malloc cost ms"):
        table.add_column(col, justify="left" if col in ("model", "layout") else "right")
    for r in rows:
        table.add_row(r["model"], str(r["batch"]), r["layout"], f"{r['gmacs']:.2f}",
                      f"{r['measured_ms']:.1f}", f"{r['ideal_ms']:.1f}", f"{r['roofline_ms']:.1f}",
                      f"{100 * r['efficiency']:.1f}%", f"{r['layers_ratio']:.2f}",
                      f"{r['cl_over_nchw_interleaved']:.2f}",
                      f"{r['faults_per_call']:.0f}" if r["faults_per_call"] is not None else "-",
                      _alloc(r["allocation"]))
    Console(width=200).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "analyze_zoo", "threads": args.threads, "batches": args.batch,
        "dtype": "float32", "image_size": 224, "device": roofs.device_name,
        "peak_flops": roofs.peak_flops, "bandwidth": roofs.bandwidth,
        "torch": torch.__version__, "convgap": convgap.__version__,
        "python": platform.python_version(), "quick": args.quick,
        "seconds": time.time() - start, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
