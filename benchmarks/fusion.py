"""Benchmark: every block of every zoo model, layer by layer against fused (issue 18).

For every zoo model (``--models``) at every batch (``--batch``), 224x224, fp32, on CPU under
``--threads`` threads, one fresh process per (model, batch) under the malloc policy
``--malloc`` (as benchmarks/peers.py): ``convgap.fuse(net, x, quiet=True)``, then per block
convgap's count finds in the original model (``convgap.count``'s block rows, first call of
each), on the input the block got in the original model's forward pass:

- layer-wise ms: the original block module, run as it is (each layer its own kernel);
- fused ms: the module ``fuse`` put at the block's qualified name (a ``Fused...`` module),
  timed interleaved with the original (``convgap.timing.compare``); ratio = median of the
  per-round paired ratios fused / layer-wise; error = max|fused - original| / max|original|
  on that input;
- fused roofline ms: the block's waterline, max(FLOPs / peak, fused bytes / bandwidth) with
  fused bytes = block input + weights + block output (``BlockCount.fused_bytes``) and the
  roofs of ``convgap.hardware.roofs("cpu", torch.float32)`` under ``--threads``; the issue's
  target is fused ms within 1.5x of it.

A ``Fused...`` module at a name that is not one of count's blocks (a stem, a head) gets a
row too, its roofline from counting the original module at that name on its input. Blocks
``fuse`` left as they are show their layer-wise time only. The whole model, original and
fused, is timed the same way. Without ``convgap.fuse`` the script stops with a message.

    python benchmarks/fusion.py [--models ...] [--batch 1 8] [--threads 2]
                                [--malloc retain|default] [--rounds 15] [--min-time 0.25]
                                [--keep-cache] [--refresh-roofs] [--out PATH]

Prints a table per (model, batch) and writes benchmarks/results/fusion.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

ROUNDS, MIN_TIME = 15, 0.25


def is_fused(m) -> bool:
    return type(m).__name__.startswith("Fused")


def time_pair(orig, fused, args, cfg) -> dict:
    """Layer-wise and fused ms of one block on its captured ``args``, interleaved, the paired
    ratio fused / layer-wise and the fused module's error; layer-wise only without one."""
    from convgap import timing
    from convgap.choice import relative_error
    if fused is None:
        return {"layerwise_ms": timing.measure(lambda: orig(*args), cfg).median_ms}
    a, b = timing.compare([lambda: orig(*args), lambda: fused(*args)], cfg)
    return {"layerwise_ms": a.median_ms, "fused_ms": b.median_ms,
            "fused_over_layerwise": timing.paired_ratio(b, a),
            "error": relative_error(fused(*args), orig(*args))}


def run_one(name: str, batch: int, args) -> dict:
    """Fuse one zoo model and time its blocks against the original's; this process only."""
    import convgap
    from convgap import timing
    from convgap.count import run_trace
    from convgap.transforms.eligible import first_inputs
    policy = peers.set_malloc(args.malloc)
    cfg = peers.timing_config(args.rounds, args.min_time)
    with timing.threads(args.threads) as n_threads, torch.no_grad():
        net, x = peers.zoo_input(name, batch)
        t0 = time.perf_counter()
        fused = convgap.fuse(copy.deepcopy(net), x, quiet=True)
        fuse_s = time.perf_counter() - t0
        tr = run_trace(net, x, capture=True)
        fused_mods = dict(fused.named_modules())
        rows = []
        for bc, call in zip(tr.counts.blocks, tr.block_calls):
            if "#" in bc.name:  # a module called twice: its first call stands for it
                continue
            there = fused_mods.get(bc.name)
            row = {"block": bc.name, "kind": bc.kind, "type": bc.type,
                   "fused_type": type(there).__name__ if there is not None else None,
                   "flops": bc.flops, "fused_bytes": bc.fused_bytes}
            row.update(time_pair(call.module, there if is_fused(there) else None,
                                 call.inputs, cfg))
            rows.append(row)
        # Fused modules elsewhere (stem, head): their roofline from counting the original
        counted = {r["block"] for r in rows}
        extra = {net.get_submodule(n): n for n, m in fused_mods.items()
                 if is_fused(m) and n not in counted}
        inputs = first_inputs(extra, lambda: net(x))[0] if extra else {}
        for orig, n in extra.items():
            c = run_trace(orig, inputs[n][0]).counts
            row = {"block": n, "kind": "other", "type": type(orig).__name__,
                   "fused_type": type(fused_mods[n]).__name__, "flops": c.flops,
                   "fused_bytes": c.min_bytes}
            row.update(time_pair(orig, fused_mods[n], inputs[n], cfg))
            rows.append(row)
        whole = time_pair(net, fused, (x,), cfg)
    return {"model": name, "batch": batch, "threads": n_threads, "malloc": policy,
            "fuse_s": fuse_s, "whole": whole, "blocks": rows, "error": None}


def add_rooflines(r: dict, roof) -> None:
    """Each row's fused-block roofline (ms) and fused ms / roofline."""
    for row in r["blocks"]:
        row["roofline_ms"] = 1e3 * roof.roofline_latency(row["flops"], row["fused_bytes"])
        row["bound"] = roof.bound(row["flops"], row["fused_bytes"])
        if "fused_ms" in row:
            row["fused_over_roofline"] = row["fused_ms"] / row["roofline_ms"]


def print_table(r: dict, console) -> None:
    from rich.table import Table
    w = r["whole"]
    title = (f"{r['model']} batch {r['batch']}: whole model {w['layerwise_ms']:.3g} ms "
             f"layer-wise, {w['fused_ms']:.3g} ms fused ({w['fused_over_layerwise']:.2f}x, "
             f"error {w['error']:.1e}); per block, median ms")
    t = Table(title=title, title_justify="left")
    for c in ("block", "kind", "fused as", "layer-wise", "fused", "fused / layer-wise",
              "roofline", "bound", "fused / roofline", "error"):
        t.add_column(c, justify="left" if c in ("block", "kind", "fused as", "bound")
                     else "right")
    for row in r["blocks"]:
        fused = "fused_ms" in row
        over = row.get("fused_over_roofline")
        t.add_row(row["block"], row["kind"], row["fused_type"] if fused else
                  f"[dim]not fused ({row['fused_type']})[/dim]",
                  f"{row['layerwise_ms']:.3g}", f"{row['fused_ms']:.3g}" if fused else "-",
                  f"{row['fused_over_layerwise']:.2f}" if fused else "-",
                  f"{row['roofline_ms']:.3g}", row["bound"],
                  ("-" if over is None else
                   f"{over:.2f}" + (" [red]![/red]" if over > 1.5 else "")),
                  f"{row['error']:.1e}" if fused else "-")
    console.print(t)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=peers.MODELS)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", default="retain", choices=("retain", "default"),
                    help="malloc policy of every process (retain)")
    ap.add_argument("--rounds", type=int, default=ROUNDS,
                    help=f"at least this many interleaved rounds per block ({ROUNDS})")
    ap.add_argument("--min-time", type=float, default=MIN_TIME,
                    help=f"and at least this many seconds of samples each ({MIN_TIME})")
    ap.add_argument("--keep-cache", action="store_true",
                    help="fuse in the normal convgap cache (default: a fresh one)")
    ap.add_argument("--refresh-roofs", action="store_true",
                    help="measure the roofs again (and cache them) instead of reading them")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.rounds < 1 or args.min_time < 0:
        ap.error("--rounds must be >= 1 and --min-time >= 0")
    return args


def main() -> None:
    args = parse_args()
    if not peers.has_fuse():
        sys.exit("benchmarks/fusion.py: this convgap has no convgap.fuse (issue 18), so there "
                 "is nothing fused to time; run it on a tree that has fuse")
    if args.one:
        result = run_one(args.one[0], int(args.one[1]), args)
        args.out.write_text(json.dumps(result, default=str))
        return
    from rich.console import Console
    from convgap import hardware, timing
    out = args.out or peers.RESULTS / "fusion.json"
    policy = peers.set_malloc(args.malloc)
    console = Console(width=200)
    with timing.threads(args.threads):
        roof = hardware.roofs("cpu", torch.float32, refresh=args.refresh_roofs)
    env = peers.child_env(args.keep_cache)
    argv = ["--threads", str(args.threads), "--malloc", args.malloc, "--rounds",
            str(args.rounds), "--min-time", str(args.min_time)]
    results, start = [], time.time()
    for name in args.models:
        for batch in args.batch:
            console.print(f"[dim]{name} batch {batch} ...[/dim]")
            r = peers.run_isolated(Path(__file__).resolve(), name, batch, argv, env)
            if r.get("error"):
                console.print(f"[red]{name} batch {batch}: {r['error']}[/red]\n"
                              + "\n".join(r.get("traceback", [])))
            else:
                add_rooflines(r, roof)
                print_table(r, console)
            results.append(r)
    cpu = hardware.device_name("cpu")
    console.print(f"{cpu}, {args.threads} threads, malloc policy {policy}, fp32, "
                  f"{peers.SIZE}x{peers.SIZE}; roofs {roof.peak_flops / 1e9:.0f} GFLOP/s, "
                  f"{roof.bandwidth / 1e9:.0f} GB/s (measured {roof.measured_at})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "fusion", "cpu": cpu, "threads": args.threads, "batches": args.batch,
        "malloc": policy, "dtype": "float32", "image_size": peers.SIZE,
        "timing": {"rounds": args.rounds, "min_time": args.min_time},
        "fresh_cache": not args.keep_cache, "peak_flops": roof.peak_flops,
        "bandwidth": roof.bandwidth, "versions": peers.versions(),
        "seconds": time.time() - start, "results": results}, indent=1, default=str))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
