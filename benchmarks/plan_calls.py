"""Benchmark: what one convolution costs through torch's oneDNN operator and inside a oneDNN
plan (issue 18's per-call overhead; docs/2026-12-04-network-plan.md).

For each conv (3x3 + ReLU, batch 1 or 8), interleaved rounds (:func:`convgap.timing.compare`)
of: torch's ``mkldnn._convolution_pointwise`` on a packed weight (what fused blocks call),
a plan of that one conv (its input and output reorders included), and a plan chaining ten
such convs (per conv). Reports medians in microseconds and the median of per-round ratios
plan / torch. Prints a table and writes benchmarks/results/plan_calls.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(1, 16, 7), (1, 64, 14), (1, 64, 56), (8, 64, 56)]   # (N, C, H=W), C -> C


def main(argv=None) -> int:
    from rich.console import Console
    from rich.table import Table

    from convgap import timing
    from convgap.hardware import device_name
    from convgap.kernels.cpu import plan as cplan
    from convgap.ops import onednn

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chain", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS / "plan_calls.json")
    args = p.parse_args(argv)
    console = Console()
    why = cplan.unavailable()
    if why is not None:
        console.print(f"[red]no oneDNN plan here: {why}[/red]")
        return 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = timing.TimingConfig(warmup=20, min_repeats=30, max_repeats=400, min_time=1.0)
    rows = []
    with torch.no_grad():
        for n, c, h in SHAPES:
            x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
            conv = torch.nn.Conv2d(c, c, 3, padding=1).eval()
            wp = onednn.pack_conv(conv.weight, [1, 1], [1, 1], [1, 1], 1, x.shape)
            out = torch.empty_like(x)

            def plan_of(k: int) -> cplan.Plan:
                pl = cplan.Plan()
                t = pl.input(x.shape, x.stride())
                for _ in range(k):
                    t = pl.conv(t, conv.weight, conv.bias, stride=(1, 1), padding=(1,) * 4,
                                dilation=(1, 1), groups=1, act="relu")
                pl.output(t, out.shape, out.stride())
                pl.finalize()
                return pl
            one, chain = plan_of(1), plan_of(args.chain)
            fns = [lambda: torch.ops.mkldnn._convolution_pointwise(
                       x, wp, conv.bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], ""),
                   lambda: one.run(x, out), lambda: chain.run(x, out)]
            t_torch, t_one, t_chain = timing.compare(fns, cfg)
            per = [s / args.chain for s in t_chain.samples]
            rows.append({"batch": n, "channels": c, "size": h,
                         "torch_us": 1e6 * t_torch.median, "plan_one_us": 1e6 * t_one.median,
                         "plan_per_conv_us": 1e6 * sorted(per)[len(per) // 2],
                         "plan_one_over_torch": timing.paired_ratio(t_one, t_torch)})
    t = Table(title=f"one 3x3 conv + ReLU, {args.threads} threads, fp32, channels-last input "
                    f"(us, medians; ratio: median of per-round ratios)")
    for col in ("batch", "C -> C", "HxW", "torch op", "plan, one conv", "plan, per conv of "
                f"{args.chain}", "one / torch"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["batch"]), str(r["channels"]), f"{r['size']}x{r['size']}",
                  f"{r['torch_us']:.1f}", f"{r['plan_one_us']:.1f}",
                  f"{r['plan_per_conv_us']:.1f}", f"{r['plan_one_over_torch']:.2f}")
    console.print(t)
    cpu = device_name("cpu")
    console.print(f"{cpu}, {args.threads} threads, torch {torch.__version__}, oneDNN plan "
                  f"v{cplan.Plan()._lib.plan_version()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "plan_calls", "cpu": cpu,
                                    "threads": args.threads, "torch": torch.__version__,
                                    "rows": rows}, indent=1))
    console.print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
