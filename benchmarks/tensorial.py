"""Benchmark: factorized convolutions on CPU (or a GPU: --device cuda), where do the saved
MACs become saved time?

On resnet50's stride-1 3x3 convolutions of stages 2-4 (128 ch @ 28x28, 256 @ 14x14,
512 @ 7x7), batch 1 and 8, fp32, NCHW (or ``--layout channels_last``: NHWC maps and a
channels_last dense weight):
1. dense (nn.Conv2d) vs TensorialConv2d cp / tucker / tt / tr / rcp at 5x and 10x fewer
   weight parameters, and FlattenedConv2d: params, MACs, median latency (each variant timed
   interleaved with the dense layer; speedup = median of the per-round paired ratios),
   achieved GFLOP/s, latency reduction vs MAC reduction
   (target at 10x: latency reduction >= 0.7 x MAC reduction; FlattenedConv2d >= 2x faster
   than dense);
   "runs": what the layer's forward ran after its one-time measurement (``kernel_for``):
   'planar' / 'nhwc' (a fused C kernel, convgap.kernels.cpu) or 'steps' (torch);
2. convgap's contraction path vs left-to-right order, both as torch steps (convgap.einsum on
   the same factors, interleaved): "steps ms" and "left ms";
3. tltorch ``FactorizedConv`` (``implementation="factorized"``) where tensorly-torch is
   importable (a bench-only install; convgap does not depend on it);
4. planning time of ``einsum_path`` for 2-6 operands (target <= 10 ms).

On CUDA every sample is a synchronised eager call (host launch overhead included); with
``--graphs`` (the default there) dense and each layer are also timed as CUDA graphs
(timing.compare_graphs: 20 calls per graph, replays between CUDA events), the kernels'
time on the device alone: "graph ms", "graph dense ms", "graph speedup".

    python benchmarks/tensorial.py [--threads 2] [--batch 1 8] [--layout nchw|channels_last]
                                   [--device cuda [--no-graphs]] [--malloc retain|default]

On CPU the whole run is under one malloc policy (default 'retain', as benchmarks/
algorithms.py): under glibc's default a layer timed right after the dense conv page-faults
on memory the dense conv's freed output returned to the kernel (376 faults per call and
3.3x the time measured once on a Tucker layer), so each variant's time would depend on its
neighbour in the round; see convgap.allocator.

Prints tables and writes benchmarks/results/tensorial.json (tensorial_channels_last.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
SPECS = [(128, 28), (256, 14), (512, 7)]  # resnet50 layer2-4 3x3 convs: channels @ size
FAMILIES = ["cp", "tucker", "tt", "tr", "rcp"]
COMPRESSIONS = [5, 10]
PLAN_EXPRESSIONS = [
    ("bshw,oshw->bohw|hw", [(8, 256, 14, 14), (256, 256, 3, 3)]),
    ("bshw,sk,akhw,oa->bohw|hw", [(8, 256, 14, 14), (256, 64), (64, 64, 3, 3), (256, 64)]),
    ("bshw,sr,rh,rw,or->bohw|hw", [(8, 256, 14, 14), (256, 64), (64, 3), (64, 3), (256, 64)]),
    ("bshw,zsa,ahc,cwd,doz->bohw|hw", [(8, 256, 14, 14), (8, 256, 8), (8, 3, 8), (8, 3, 8),
                                       (8, 256, 8)]),
    ("bshw,zsa,ahc,cwd,dey,eoz->boyhw|hw",
     [(8, 256, 14, 14), (8, 256, 8), (8, 3, 8), (8, 3, 8), (8, 8, 2), (8, 256, 8)]),
]


def tltorch_conv(c: int, compression: float, factorization: str):
    try:
        import tltorch
    except ImportError:
        return None
    rank = 1.0 / compression  # tltorch: a float rank is the fraction of dense parameters
    try:
        layer = tltorch.FactorizedConv.from_conv(
            nn.Conv2d(c, c, 3, padding=1, bias=False), rank=rank,
            factorization=factorization, implementation="factorized", decompose_weights=False)
    except Exception as exc:  # pragma: no cover - depends on the bench-only install
        return f"failed: {type(exc).__name__}: {exc}"
    return layer


def measure(layer, dense, x, cfg, timing, device="cpu"):
    """(dense median s, layer median s, speedup): the speedup is the median of the per-round
    ratios (each round runs both back to back, so the shared machine's drifts cancel)."""
    with torch.no_grad():
        t_dense, t_layer = timing.compare([lambda: dense(x), lambda: layer(x)], cfg, device)
    paired = timing.paired_ratio(t_dense, t_layer)
    return t_dense.median, t_layer.median, paired


def measure_graphs(layer, dense, x, timing, device) -> dict:
    """Device-only times of dense and layer (CUDA graphs of 20 calls, 50 interleaved
    rounds), as row fields."""
    cfg = timing.TimingConfig(warmup=2, min_repeats=15, max_repeats=50, min_time=0.05)
    with torch.no_grad():
        try:
            t_dense, t_layer = timing.compare_graphs(
                [lambda: dense(x), lambda: layer(x)], cfg, device)
        except RuntimeError as exc:  # a layer that cannot be captured keeps its eager time
            return {"graph_error": f"{type(exc).__name__}: {exc}"[:200]}
    return {"graph_dense_s": t_dense.median, "graph_s": t_layer.median,
            "graph_speedup": timing.paired_ratio(t_dense, t_layer)}


def run_spec(c: int, size: int, batch: int, cfg, console, layout: str = "nchw",
             device: str = "cpu", graphs: bool = False) -> dict:
    from convgap import timing
    from convgap.layers import FlattenedConv2d, TensorialConv2d
    torch.manual_seed(0)
    dense = nn.Conv2d(c, c, 3, padding=1, bias=False).eval().to(device)
    x = torch.randn(batch, c, size, size, device=device)
    if layout == "channels_last":  # dense and factorized layers both get NHWC maps
        x = x.contiguous(memory_format=torch.channels_last)
        dense = dense.to(memory_format=torch.channels_last)
    dense_macs = batch * c * c * 9 * size * size
    dense_params = dense.weight.numel()
    rows = []
    for comp in COMPRESSIONS:
        for fam in FAMILIES:
            layer = TensorialConv2d(c, c, 3, fam, compression=comp, padding=1,
                                    bias=False).eval().to(device)
            info = layer.path(tuple(x.shape))
            t_dense, t_layer, speedup = measure(layer, dense, x, cfg, timing, device)
            # convgap's path vs left-to-right, same factors, interleaved
            from convgap.einsum import einsum
            xi = layer._input(x)
            args = layer._conv_args()
            with torch.no_grad():
                t_best, t_left = timing.compare(
                    [lambda: einsum(layer.expression, xi, *layer.factors, **args),
                     lambda: einsum(layer.expression, xi, *layer.factors, path="left",
                                    **args)], cfg, device)
            left_macs = info.naive_macs
            row = {"variant": fam, "target_compression": comp, "ranks": list(layer.ranks),
                   "runs": layer.kernel_for(x),
                   "params": layer.weight_params, "macs": info.macs, "dense_s": t_dense,
                   "s": t_layer, "speedup": speedup, "path": info.path, "left_macs": left_macs,
                   "path_s": t_best.median, "left_s": t_left.median}
            tl = tltorch_conv(c, comp, fam) if fam in ("cp", "tucker", "tt") else None
            if isinstance(tl, nn.Module):
                tl.eval().to(device)
                _, t_tl, _ = measure(tl, dense, x, cfg, timing, device)
                row["tltorch_s"] = t_tl
            elif isinstance(tl, str):
                row["tltorch"] = tl
            if graphs:
                row.update(measure_graphs(layer, dense, x, timing, device))
            rows.append(row)
    flat = FlattenedConv2d(c, c, 3, padding=1, bias=False).eval().to(device)
    t_dense, t_flat, speedup = measure(flat, dense, x, cfg, timing, device)
    rows.append({"variant": "flattened", "target_compression": None, "ranks": None,
                 "runs": flat.kernel_for(x),
                 "params": flat.weight_params, "macs": flat.macs(tuple(x.shape)),
                 "dense_s": t_dense, "s": t_flat, "speedup": speedup})
    if graphs:
        rows[-1].update(measure_graphs(flat, dense, x, timing, device))
    for r in rows:
        r["param_reduction"] = dense_params / r["params"]
        r["mac_reduction"] = dense_macs / r["macs"]
        r["speedup_of_medians"] = r["dense_s"] / r["s"]
        r["gflops"] = 2 * r["macs"] / r["s"] / 1e9
        r["dense_gflops"] = 2 * dense_macs / r["dense_s"] / 1e9
        r["speedup_over_mac_reduction"] = r["speedup"] / r["mac_reduction"]
        if "graph_speedup" in r:
            r["graph_speedup_over_mac_reduction"] = r["graph_speedup"] / r["mac_reduction"]
    return {"channels": c, "size": size, "batch": batch, "dense_params": dense_params,
            "dense_macs": dense_macs, "rows": rows}


def plan_times() -> list[dict]:
    from convgap.einsum import clear_cache, einsum_path
    out = []
    for expr, shapes in PLAN_EXPRESSIONS:
        samples = []
        for _ in range(20):
            clear_cache()
            t0 = time.perf_counter()
            info = einsum_path(expr, *shapes, padding=1)
            samples.append(time.perf_counter() - t0)
        out.append({"expression": expr, "operands": len(shapes),
                    "plan_ms": 1e3 * statistics.median(samples), "macs": info.macs,
                    "left_macs": info.naive_macs})
    return out


def print_tables(results, plans, console) -> None:
    for r in results:
        t = Table(title=f"resnet50 3x3 {r['channels']}->{r['channels']} @ {r['size']}x"
                        f"{r['size']}, batch {r['batch']} (dense: {r['dense_params']:,} "
                        f"params, {r['dense_macs'] / 1e6:.0f}M MACs, "
                        f"{1e3 * r['rows'][0]['dense_s']:.3g} ms)", title_justify="left")
        graphs = any("graph_s" in row for row in r["rows"])
        for col in ("variant", "x", "ranks", "runs", "params", "MACs", "ms", "dense ms",
                    "GFLOP/s", "param cut", "MAC cut", "speedup", "speedup/MAC cut",
                    "steps ms", "left ms", "left MACs", "tltorch ms") + (
                        ("graph ms", "graph dense ms", "graph speedup") if graphs else ()):
            t.add_column(col, justify="left" if col in ("variant", "ranks", "runs")
                         else "right")
        for row in r["rows"]:
            extra = ((f"{1e3 * row['graph_s']:.3g}", f"{1e3 * row['graph_dense_s']:.3g}",
                      f"{row['graph_speedup']:.2f}x") if "graph_s" in row
                     else ("err",) * 3) if graphs else ()
            t.add_row(row["variant"], str(row["target_compression"] or "-"),
                      str(row["ranks"] or "-"), row.get("runs") or "-",
                      f"{row['params']:,}",
                      f"{row['macs'] / 1e6:.1f}M", f"{1e3 * row['s']:.3g}",
                      f"{1e3 * row['dense_s']:.3g}", f"{row['gflops']:.0f}",
                      f"{row['param_reduction']:.1f}x", f"{row['mac_reduction']:.1f}x",
                      f"{row['speedup']:.2f}x", f"{row['speedup_over_mac_reduction']:.2f}",
                      f"{1e3 * row['path_s']:.3g}" if "path_s" in row else "-",
                      f"{1e3 * row['left_s']:.3g}" if "left_s" in row else "-",
                      f"{row['left_macs'] / 1e6:.1f}M" if "left_macs" in row else "-",
                      f"{1e3 * row['tltorch_s']:.3g}" if "tltorch_s" in row else
                      ("err" if "tltorch" in row else "n/a"), *extra)
        console.print(t)
    t = Table(title="planning time (einsum_path, cold cache, median of 20)",
              title_justify="left")
    for col in ("expression", "operands", "ms", "MACs", "left-to-right MACs"):
        t.add_column(col, justify="left" if col == "expression" else "right")
    for p in plans:
        t.add_row(p["expression"], str(p["operands"]), f"{p['plan_ms']:.2f}",
                  f"{p['macs']:,}", f"{p['left_macs']:,}")
    console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--layout", default="nchw", choices=("nchw", "channels_last"),
                    help="memory layout of the input maps (and the dense weight)")
    ap.add_argument("--device", default="cpu",
                    help="'cpu' or 'cuda[:N]' (cpu); on CUDA fp32 runs with IEEE products "
                         "everywhere (TF32 off in cuDNN and matmul), so dense and factorized "
                         "layers do the same arithmetic")
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="on CUDA, also time dense and each layer as CUDA graphs (device "
                         "time without launch overhead; default on for CUDA)")
    ap.add_argument("--malloc", default="retain", choices=("retain", "default"),
                    help="CPU malloc policy for the whole run (retain)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default: results/tensorial.json, or "
                         "tensorial_channels_last.json for --layout channels_last)")
    args = ap.parse_args()
    on_cpu = torch.device(args.device).type == "cpu"
    if args.graphs and torch.device(args.device).type != "cuda":
        ap.error("--graphs needs a CUDA device")
    graphs = torch.device(args.device).type == "cuda" and args.graphs is not False
    if not on_cpu:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    import convgap
    from convgap import allocator, timing
    if on_cpu and allocator.available():
        allocator.set_policy(args.malloc)
    cfg = timing.TimingConfig(warmup=3, min_repeats=15, max_repeats=200, min_time=0.3)
    console = Console(width=240)
    start = time.time()
    results = []
    try:
        import tltorch  # noqa: F401
        tl_version = getattr(tltorch, "__version__", "?")
    except ImportError:
        tl_version = None
        console.print("[dim]tltorch not importable: its column stays n/a (install "
                      "tensorly-torch in a bench-only environment to compare)[/dim]")
    if args.out is None:
        args.out = RESULTS / ("tensorial" + ("" if on_cpu else "_cuda")
                              + ("" if args.layout == "nchw" else f"_{args.layout}") + ".json")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(plans) -> None:  # after every spec: a run cut short keeps what it measured
        args.out.write_text(json.dumps({
            "benchmark": "tensorial", "threads": args.threads, "batches": args.batch,
            "dtype": "float32", "layout": args.layout, "torch": torch.__version__,
            "tltorch": tl_version, "convgap": convgap.__version__,
            "python": platform.python_version(), "cpu": convgap.hardware.device_name("cpu"),
            "device": args.device, "device_name": convgap.hardware.device_name(args.device),
            "malloc": allocator.policy() if on_cpu else None,
            "seconds": time.time() - start, "results": results, "planning": plans},
            indent=1, default=str))
    with timing.threads(args.threads):
        plans = plan_times()
        for batch in args.batch:
            for c, size in SPECS:
                console.print(f"[dim]{c} ch @ {size}, batch {batch} ...[/dim]")
                results.append(run_spec(c, size, batch, cfg, console, args.layout,
                                        args.device, graphs))
                write(plans)
    print_tables(results, plans, console)
    console.print(f"{args.device}, {args.threads} threads, fp32, layout {args.layout}"
                  + (f", malloc policy {allocator.policy()}" if on_cpu else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
