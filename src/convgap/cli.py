"""The ``convgap`` command line.

``convgap analyze MODEL [MODEL ...]``: the efficiency-gap report (terminal table, JSON, HTML).
``convgap roofs``: measured peak FLOP/s and bandwidth of this device (cached).
``convgap tune MODEL``: the fastest correct convolution algorithm per layer (cached).
``convgap factorize MODEL``: factorized convolutions; params, MACs, latency before and after.
``convgap models``: the names in the model zoo.

Every user error prints one line ``convgap: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import hardware, models, timing
from .analysis import Report, analyze
from .analysis.analyze import DTYPES, LAYOUTS, parse_dtype
from .analysis.render import tables
from .errors import ConvgapError
from .progress import make_progress

__all__ = ["main", "build_parser"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]' (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="data type of weights and activations (default: float32)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for torch (default: torch's current setting)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _num_classes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-classes", type=_positive, default=None,
                   help="classes of the model: zoo models (default 1000), or passed to a "
                        "package.module:factory that takes num_classes (an error otherwise)")


def _malloc(p: argparse.ArgumentParser, default: str, what: str) -> None:
    p.add_argument("--malloc", default=default, choices=("asis", "default", "retain"),
                   help=f"CPU malloc policy to {what} under: 'retain' keeps freed memory for "
                        "reuse (no page faults on large activations), 'default' is glibc's, "
                        f"'asis' leaves the process as it is (default: {default})")


def _policy(args: argparse.Namespace) -> str | None:
    return None if args.malloc == "asis" else args.malloc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convgap",
        description="Show where a CNN's latency departs from what its arithmetic costs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    a = sub.add_parser("analyze", help="efficiency-gap report per layer, block and model",
                       description="Count, time and compare every layer, block and model "
                                   "against the measured roofs of the device.")
    a.add_argument("models", nargs="+", metavar="MODEL",
                   help="zoo name (see `convgap models`) or package.module:factory")
    a.add_argument("--batch", type=_positive, nargs="+", default=[1], help="batch sizes")
    a.add_argument("--image-size", type=_positive, default=224, help="input H = W (224)")
    a.add_argument("--channels", type=_positive, default=3, help="input channels (3)")
    a.add_argument("--layout", nargs="+", default=["nchw"], choices=LAYOUTS,
                   help="memory layouts to measure (default: nchw)")
    _num_classes(a)
    a.add_argument("--weights", type=Path, default=None,
                   help="state_dict file for the (single) model, loaded with weights_only")
    a.add_argument("--out", type=Path, default=None,
                   help="directory for index.html, PNG plots and report.json")
    a.add_argument("--json", type=Path, default=None, help="also write the report JSON here")
    a.add_argument("--top", type=_positive, default=10, help="layers shown per run (10)")
    a.add_argument("--blocks", action="store_true", help="also print the block table")
    _malloc(a, default="asis", what="measure")
    a.add_argument("--no-malloc-cost", action="store_true",
                   help="skip timing the whole model again with freed memory retained")
    a.add_argument("--no-per-layer", action="store_true",
                   help="time only whole models (faster; no layer or block latencies)")
    _common(a)

    r = sub.add_parser("roofs", help="measured peak FLOP/s and memory bandwidth",
                       description="Measure (or read from the cache) the roofs of a device.")
    r.add_argument("--refresh", action="store_true", help="re-measure even if cached")
    _common(r)

    t = sub.add_parser("tune", help="choose the fastest correct algorithm per convolution",
                       description="Time every supported convolution algorithm on each layer's "
                                   "real input, keep the fastest correct one (cached), and "
                                   "compare the tuned model with the original.")
    t.add_argument("model", metavar="MODEL", help="zoo name or package.module:factory")
    t.add_argument("--batch", type=_positive, default=1, help="batch size (1)")
    t.add_argument("--image-size", type=_positive, default=224, help="input H = W (224)")
    t.add_argument("--channels", type=_positive, default=3, help="input channels (3)")
    t.add_argument("--layout", default="nchw", choices=LAYOUTS, help="input layout (nchw)")
    _num_classes(t)
    t.add_argument("--weights", type=Path, default=None, help="state_dict file for MODEL")
    t.add_argument("--algos", nargs="+", default=["auto"], metavar="NAME",
                   help="'auto' (every registered algorithm) or the candidate names to try")
    t.add_argument("--json", type=Path, default=None, help="write the decisions as JSON")
    _malloc(t, default="retain", what="tune and compare")
    _common(t)

    f = sub.add_parser("factorize", help="factorize convolutions; params, MACs, latency "
                       "before and after",
                       description="Decompose the model's dense convolutions (default: every "
                                   "non-1x1 conv with groups=1) into factorized layers run by "
                                   "conv_einsum on their optimal path (or, in CPU fp32 "
                                   "inference, by a fused C kernel, and on a CUDA GPU by a "
                                   "fused Triton kernel, where that measures faster), and "
                                   "time each layer and the whole model before and after.")
    f.add_argument("model", metavar="MODEL", help="zoo name or package.module:factory")
    f.add_argument("--factorization", "-f", default="cp",
                   help="cp, tucker, tt, tr, rcp or flattened (cp)")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--compression", type=float, default=None,
                   help="dense / factorized weight parameters per layer (default 10)")
    g.add_argument("--rank", type=_positive, nargs="+", default=None,
                   help="rank(s) instead of --compression (one int, or one per bond)")
    f.add_argument("--rank-multiple", type=_positive, default=8, metavar="N",
                   help="with --compression, round CP/Tucker/TT ranks >= 2N down to a "
                        "multiple of N (vector-friendly channel counts; 1: off; default 8)")
    f.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="module names to factorize (default: dense non-1x1 convs)")
    f.add_argument("--batch", type=_positive, default=1, help="batch size (1)")
    f.add_argument("--image-size", type=_positive, default=224, help="input H = W (224)")
    f.add_argument("--channels", type=_positive, default=3, help="input channels (3)")
    _num_classes(f)
    f.add_argument("--weights", type=Path, default=None, help="state_dict file for MODEL")
    f.add_argument("--layout", default="nchw", choices=LAYOUTS,
                   help="memory layout of the input and the model's weights (nchw)")
    f.add_argument("--keep-slower", action="store_true",
                   help="keep factorized layers that measure slower than the dense ones "
                        "(default: such layers are left dense, and listed)")
    f.add_argument("--json", type=Path, default=None, help="write the comparison as JSON")
    _malloc(f, "retain", "time")
    _common(f)

    sub.add_parser("models", help="list the model zoo")
    return parser


def _cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    if args.weights is not None and len(args.models) != 1:
        raise ConvgapError("--weights applies to one model; analyze one model at a time")
    dtype = parse_dtype(args.dtype)
    hardware.check_device(args.device)
    nets = []
    for spec in args.models:  # load everything first: bad names fail before any timing
        net = models.load(spec, num_classes=args.num_classes)
        if args.weights is not None:
            models.load_weights(net, args.weights)
        nets.append((spec.split(":")[-1], net))
    reports = []
    progress = make_progress(args.quiet)
    with progress:
        for name, net in nets:
            for batch in args.batch:
                for layout in args.layout:
                    shape = (batch, args.channels, args.image_size, args.image_size)
                    reports.append(analyze(
                        net, shape, device=args.device, dtype=dtype, layout=layout,
                        threads=args.threads, name=name, per_layer=not args.no_per_layer,
                        progress=progress, malloc=_policy(args),
                        allocation=not args.no_malloc_cost))
    report = Report.combine(reports)
    console.print(tables(report, top=args.top, blocks=args.blocks))
    if args.json is not None:
        console.print(f"JSON: {report.to_json(args.json)}")
    if args.out is not None:
        console.print(f"report: {report.save_html(args.out)}")
    return 0


def _cmd_roofs(args: argparse.Namespace, console: Console) -> int:
    dtype = parse_dtype(args.dtype)
    with make_progress(args.quiet) as progress:
        task = progress.add_task("measuring roofs" if args.refresh else "roofs", total=None)
        roof = hardware.roofs(args.device, dtype, threads=args.threads, refresh=args.refresh)
        progress.update(task, total=1, completed=1)
    t = Table(title=f"roofs of {roof.device_name} ({roof.device}, {roof.threads} threads, "
                    f"{roof.dtype}, torch {roof.torch_version})", title_justify="left")
    t.add_column("roof")
    t.add_column("value", justify="right")
    t.add_row("peak GEMM", f"{roof.peak_flops / 1e9:.1f} GFLOP/s")
    t.add_row("stream bandwidth", f"{roof.bandwidth / 1e9:.1f} GB/s")
    t.add_row("ridge point", f"{roof.ridge:.1f} FLOP/byte")
    t.add_row("measured at", roof.measured_at)
    console.print(t)
    return 0


def _cmd_tune(args: argparse.Namespace, console: Console) -> int:
    from .transforms.tune import tune_model
    dtype = parse_dtype(args.dtype)
    hardware.check_device(args.device)
    net = models.load(args.model, num_classes=args.num_classes)
    if args.weights is not None:
        models.load_weights(net, args.weights)
    candidates = None if args.algos == ["auto"] else args.algos
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    result = tune_model(net, shape, candidates=candidates, device=args.device, dtype=dtype,
                        layout=args.layout, threads=args.threads, quiet=args.quiet,
                        malloc=_policy(args))
    console.print(result.table(title=f"convgap tune {args.model} {shape} {args.layout} "
                                     f"{args.dtype}, {result.threads} threads"))
    console.print(result.summary())
    if args.json is not None:
        console.print(f"JSON: {result.to_json(args.json)}")
    return 0


def _cmd_factorize(args: argparse.Namespace, console: Console) -> int:
    import json

    import torch

    from .transforms.factorize import compare, factorize
    dtype = parse_dtype(args.dtype)
    dev = hardware.check_device(args.device)
    net = models.load(args.model, num_classes=args.num_classes)
    if args.weights is not None:
        models.load_weights(net, args.weights)
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    net = net.eval().to(device=dev, dtype=dtype, memory_format=fmt)
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
    x = x.contiguous(memory_format=fmt)
    compression = args.compression
    if args.factorization != "flattened" and args.rank is None and compression is None:
        compression = 10.0
    rank = None if args.rank is None else (args.rank[0] if len(args.rank) == 1 else args.rank)
    with timing.threads(args.threads):
        fact = factorize(net, args.factorization, x, compression=compression, rank=rank,
                         layers=args.layers, rank_multiple=args.rank_multiple,
                         keep="all" if args.keep_slower else "faster", quiet=args.quiet)
    left = [r for r in fact.factorized if not r.kept]
    if len(left) == len(fact.factorized):
        raise ConvgapError("no layer was factorized: " + "; ".join(
            f"{r.name}: {r.reason}" for r in left) + " (--keep-slower keeps slower layers)")
    result = compare(net, fact, x, threads=args.threads, quiet=args.quiet,
                     malloc=_policy(args))
    what = args.factorization + (f", {compression:g}x" if compression else "") + \
        (f", rank {rank}" if rank else "")
    malloc = result.extra.get("malloc")
    console.print(result.table(title=f"convgap factorize {args.model} ({what}) {shape} "
                                     f"{args.layout} {args.dtype}, {result.threads} threads"
                                     + (f", malloc {malloc}" if malloc else "")))
    for r in left:
        console.print(f"left dense: {r.name}: {r.reason}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(result.to_dict(), left_dense={
            r.name: r.reason for r in left}), indent=1))
        console.print(f"JSON: {args.json}")
    return 0


def _cmd_models(args: argparse.Namespace, console: Console) -> int:
    for name in models.names():
        console.print(name)
    return 0


COMMANDS = {"analyze": _cmd_analyze, "roofs": _cmd_roofs, "tune": _cmd_tune,
            "factorize": _cmd_factorize, "models": _cmd_models}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``convgap`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.getcwd() not in sys.path:  # let `package.module:factory` find the user's code
        sys.path.insert(0, os.getcwd())
    console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    warnings.simplefilter("default")
    try:
        return COMMANDS[args.command](args, console)
    except ConvgapError as exc:
        print(f"convgap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convgap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
