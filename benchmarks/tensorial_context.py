"""Benchmark: how much a fused factorized layer's latency depends on what ran just before it.

benchmarks/tensorial.py times the dense conv and the factorized layer interleaved, so the
layer often runs right after 0.5-4 ms of the dense conv at full FMA load. This script times
the same layer (CP, 10x compression, on its fused kernel) after each of several preludes,
each prelude and the layer interleaved in one run (median of the layer's samples):

- alone: the layer after itself;
- dense: the dense 3x3 conv on the same input (the tensorial benchmark's situation);
- dense, small input x7: seven dense convs on one image of the batch (about as long as
  the batched one, with a footprint that stays in L2): compute load without memory traffic;
- copy 32 MB: a copy that flushes the caches, no arithmetic;
- tiny op: a torch op of a few microseconds (the dispatch alone).

    python benchmarks/tensorial_context.py [--channels 128] [--size 28] [--batch 8]
                                           [--threads 2] [--family cp] [--layout ...]

Writes benchmarks/results/tensorial_context.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--family", default="cp")
    ap.add_argument("--compression", type=float, default=10.0)
    ap.add_argument("--layout", default="channels_last", choices=("nchw", "channels_last"))
    ap.add_argument("--out", type=Path, default=RESULTS / "tensorial_context.json")
    args = ap.parse_args()
    import convgap
    from convgap import allocator, timing
    from convgap.layers import TensorialConv2d
    if allocator.available():
        allocator.set_policy("retain")
    torch.manual_seed(0)
    c, s, b = args.channels, args.size, args.batch
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    x = torch.randn(b, c, s, s).contiguous(memory_format=fmt)
    x1 = x[:1].clone().contiguous(memory_format=fmt)
    dense = nn.Conv2d(c, c, 3, padding=1, bias=False).eval().to(memory_format=fmt)
    layer = TensorialConv2d(c, c, 3, args.family, compression=args.compression, padding=1,
                            bias=False).eval()
    big = torch.randn(8 * 1024 * 1024)
    big_out = torch.empty_like(big)
    preludes = {
        "alone": None,
        "dense": lambda: dense(x),
        "dense, small input x7": lambda: [dense(x1).sum() for _ in range(7)],
        "copy 32 MB": lambda: big_out.copy_(big),
        "tiny op": lambda: torch.ones(1).add_(1),
    }
    cfg = timing.TimingConfig(warmup=5, min_repeats=40, max_repeats=400, min_time=0.5)
    rows = []
    with timing.threads(args.threads), torch.no_grad():
        layer(x)  # its one-time measurement (fused kernel or steps)
        for name, prelude in preludes.items():
            fns = [lambda: layer(x)] if prelude is None else [prelude, lambda: layer(x)]
            t = timing.compare(fns, cfg)
            rows.append({"prelude": name, "layer_s": t[-1].median,
                         "prelude_s": None if prelude is None else t[0].median})
    alone = rows[0]["layer_s"]
    table = Table(title=f"{args.family} {args.compression:g}x on {c}@{s}, batch {b}, "
                        f"{args.layout}, {args.threads} threads, runs "
                        f"{layer.kernel_for(x)}")
    for col in ("before the layer", "prelude ms", "layer ms", "vs alone"):
        table.add_column(col, justify="left" if col == "before the layer" else "right")
    for r in rows:
        table.add_row(r["prelude"], "-" if r["prelude_s"] is None else
                      f"{1e3 * r['prelude_s']:.3f}", f"{1e3 * r['layer_s']:.3f}",
                      f"{r['layer_s'] / alone:.2f}x")
    Console(width=160).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "tensorial_context", "threads": args.threads, "batch": b,
        "channels": c, "size": s, "family": args.family, "compression": args.compression,
        "layout": args.layout, "runs": layer.kernel_for(x), "torch": torch.__version__,
        "convgap": convgap.__version__, "python": platform.python_version(),
        "cpu": convgap.hardware.device_name("cpu"), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
