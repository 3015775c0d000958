"""The ``convgap`` command line.

``convgap analyze MODEL [MODEL ...]``: the efficiency-gap report (terminal table, JSON, HTML).
``convgap roofs``: measured peak FLOP/s and bandwidth of this device (cached).
``convgap tune MODEL``: the fastest correct convolution algorithm per layer (cached).
``convgap factorize MODEL``: factorized convolutions; params, MACs, latency before and after
(with ``--data``, validation accuracy too, and after ``--finetune`` epochs of distillation).
``convgap fuse MODEL``: whole residual blocks as fused kernels; per block the layer-wise and
fused time against the fused-block roofline, and the whole model before and after.
``convgap train MODEL --data ... --out DIR``: train (or fine-tune, or distil into) a model;
writes DIR/checkpoint.pt (resumable), DIR/weights.pt (the state_dict) and DIR/log.json, and
runs the same under ``torchrun`` (DistributedDataParallel).
``convgap evaluate MODEL --weights FILE --data ...``: loss, top-1 and top-5 on a dataset.
``convgap dynamic MODEL --weights STATIC.pt --data ... --out DIR``: make a trained model
dynamic (spatial, channel or layer skipping), train it under a latency or FLOPs budget with
distillation, and report accuracy, density per block and latency against the static model.
``convgap calibrate [--quick]``: fit this device's latency predictor (cached).
``convgap predict MODEL [--measure]``: predicted latency per layer and model, without running
it; with ``--measure``, against measurement.
``convgap models``: the names in the model zoo.

Every user error prints one line ``convgap: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

from . import allocator, config, data, hardware, models, predict, timing, train
from .analysis import Report, analyze
from .analysis.analyze import DTYPES, parse_dtype
from .ops.layouts import LAYOUTS, memory_format
from .analysis.render import tables
from .cache import write_atomic
from .count import check_input
from .errors import ConvgapError
from .progress import make_progress
from .transforms import Comparison, changes, compare, factorize, fuse, swap
from .train.checkpoint import check_writable
from .train.optim import OPTIMIZERS, SCHEDULES
from .transforms.fuse import fused_blocks

__all__ = ["main", "build_parser"]


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def _nonnegative(text: str) -> int:
    return _integer(text, 0, "an integer >= 0")


def _device_options(p: argparse.ArgumentParser) -> None:
    """Where and how every command runs."""
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]' (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="data type of weights and activations (default: float32)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for torch (default: torch's current setting)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _model_options(p: argparse.ArgumentParser, many: bool, malloc: str, what: str,
                   sized_by_data: bool = False) -> None:
    """The model and its input, shared by the commands that run a model: ``many`` takes
    several models, batch sizes and layouts (analyze), else one of each; ``malloc``: the
    default policy, to ``what`` under; ``sized_by_data``: the command takes ``--data``,
    whose image size is the default input size. Adds the device options too."""
    p.add_argument("models" if many else "model", nargs="+" if many else None, metavar="MODEL",
                   help="zoo name (see `convgap models`) or package.module:factory")
    p.add_argument("--batch", type=_positive, nargs="+" if many else None,
                   default=[1] if many else 1, help="batch size(s) (1)")
    p.add_argument("--image-size", type=_positive, default=None if sized_by_data else 224,
                   help="input H = W (224; with --data, the data's image size)"
                   if sized_by_data else "input H = W (224)")
    p.add_argument("--channels", type=_positive, default=3, help="input channels (3)")
    p.add_argument("--layout", nargs="+" if many else None, default=["nchw"] if many else "nchw",
                   choices=LAYOUTS, help="memory layout(s) of the input and the model's "
                                         "weights (nchw)")
    p.add_argument("--num-classes", type=_positive, default=None,
                   help="classes of the model: zoo models (default 1000" +
                        ("; with --data, the data's" if sized_by_data else "") +
                        "), or passed to a package.module:factory that takes num_classes "
                        "(an error otherwise)")
    p.add_argument("--weights", type=Path, default=None,
                   help="state_dict file for the (single) model, loaded with weights_only")
    p.add_argument("--malloc", default=malloc, choices=("asis", "default", "retain"),
                   help=f"CPU malloc policy to {what} under: 'retain' keeps freed memory for "
                        "reuse (no page faults on large activations), 'default' is glibc's, "
                        f"'asis' leaves the process as it is (default: {malloc})")
    _device_options(p)


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
    _model_options(a, many=True, malloc="asis", what="measure")
    a.add_argument("--out", type=Path, default=None,
                   help="directory for index.html, PNG plots and report.json")
    a.add_argument("--json", type=Path, default=None, help="also write the report JSON here")
    a.add_argument("--top", type=_positive, default=10, help="layers shown per run (10)")
    a.add_argument("--blocks", action="store_true", help="also print the block table")
    a.add_argument("--no-malloc-cost", action="store_true",
                   help="skip timing the whole model again with freed memory retained")
    a.add_argument("--no-per-layer", action="store_true",
                   help="time only whole models (faster; no layer or block latencies)")
    a.add_argument("--predict", action="store_true",
                   help="also the latency predictor's model and layer times, and its error "
                        "(calibrates first if needed: `convgap calibrate`)")

    r = sub.add_parser("roofs", help="measured peak FLOP/s and memory bandwidth",
                       description="Measure (or read from the cache) the roofs of a device.")
    r.add_argument("--refresh", action="store_true", help="re-measure even if cached")
    _device_options(r)

    t = sub.add_parser("tune", help="choose the fastest correct algorithm per convolution",
                       description="Time every supported convolution algorithm on each layer's "
                                   "real input, keep the fastest correct one (cached), and "
                                   "compare the tuned model with the original.")
    _model_options(t, many=False, malloc="retain", what="tune and compare")
    t.add_argument("--algos", nargs="+", default=["auto"], metavar="NAME",
                   help="'auto' (every registered algorithm) or the candidate names to try")
    t.add_argument("--json", type=Path, default=None, help="write the comparison as JSON")

    f = sub.add_parser("factorize", help="factorize convolutions; params, MACs, latency "
                       "before and after",
                       description="Decompose the model's dense convolutions (default: every "
                                   "non-1x1 conv with groups=1) into factorized layers run by "
                                   "conv_einsum on their optimal path (or, in CPU fp32 "
                                   "inference, by a fused C kernel, and on a CUDA GPU by a "
                                   "fused Triton kernel, where that measures faster), and "
                                   "time each layer and the whole model before and after. "
                                   "With --data, also the validation accuracy before and "
                                   "after, and after --finetune EPOCHS of fine-tuning with "
                                   "distillation from the original model.")
    _model_options(f, many=False, malloc="retain", what="time", sized_by_data=True)
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
    f.add_argument("--keep-slower", action="store_true",
                   help="keep factorized layers that measure slower than the dense ones "
                        "(default: such layers are left dense, and listed)")
    f.add_argument("--json", type=Path, default=None, help="write the comparison as JSON")
    f.add_argument("--data", default=None, metavar="SPEC", help="validation accuracy (and "
                   "fine-tuning) on 'shapes[:key=value,...]' or an image folder, as for "
                   "`convgap train`; the input size and class count default to the data's")
    f.add_argument("--finetune", type=_nonnegative, default=0, metavar="EPOCHS",
                   help="with --data: fine-tune the factorized model for EPOCHS epochs, "
                        "distilling from the original (0)")
    f.add_argument("--lr", type=float, default=None,
                   help="fine-tuning peak learning rate (1e-3 for adamw, 0.01 for sgd)")
    f.add_argument("--batch-size", type=_positive, default=None,
                   help="fine-tuning and evaluation images per batch (64)")
    f.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help="fine-tuning optimizer (adamw)")
    f.add_argument("--out", type=Path, default=None,
                   help="with --finetune: folder for the fine-tuned weights.pt and log.json "
                        "(the accuracies and the per-epoch history)")

    u = sub.add_parser("fuse", help="run whole residual blocks as fused kernels; per block "
                       "layer-wise vs fused time and the fused-block roofline",
                       description="Fold batch-norm, recognise residual blocks by what they "
                                   "compute (inverted residual, MBConv, ResNet basic and "
                                   "bottleneck, ConvFirst, ConvNeXt, conv + BN + act), run "
                                   "each as one fused module where it is exact and measures "
                                   "faster, and time the whole model before and after.")
    _model_options(u, many=False, malloc="retain", what="measure")
    u.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="block module names to fuse (default: every matched block)")
    u.add_argument("--patterns", nargs="+", default=None, metavar="NAME",
                   help="block patterns to use (default: all registered)")
    u.add_argument("--json", type=Path, default=None, help="write the rows as JSON")

    n = sub.add_parser("train", help="train a model on a dataset (one process or torchrun)",
                       description="Train MODEL on --data, validating after every epoch; "
                                   "write OUT/checkpoint.pt after each epoch (continue it "
                                   "with --resume), OUT/weights.pt (the state_dict) and "
                                   "OUT/log.json at the end, and print the per-epoch table. "
                                   "Under torchrun the same command trains in every process "
                                   "(DistributedDataParallel; --batch-size is the global "
                                   "batch).")
    _data_options(n)
    n.add_argument("--epochs", type=_positive, required=True, help="epochs to train")
    n.add_argument("--batch-size", type=_positive, required=True,
                   help="images per optimizer step, over all processes")
    n.add_argument("--lr", type=float, required=True, help="peak learning rate")
    n.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="(sgd)")
    n.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    n.add_argument("--weight-decay", type=float, default=None,
                   help="(default: 5e-4 for sgd, 1e-2 for adamw)")
    n.add_argument("--schedule", default="cosine", choices=SCHEDULES,
                   help="learning rate after the warm-up (cosine: down to 0 at the end)")
    n.add_argument("--warmup", type=float, default=0.0,
                   help="epochs of linear warm-up (a fraction is rounded to steps; 0)")
    n.add_argument("--no-augment", action="store_true",
                   help="no random crop (4 pixels) and flip of the training images")
    n.add_argument("--teacher", default=None, metavar="MODEL",
                   help="distil from this model (needs --teacher-weights)")
    n.add_argument("--teacher-weights", type=Path, default=None, metavar="FILE",
                   help="the teacher's state_dict")
    n.add_argument("--kd-alpha", type=float, default=0.5,
                   help="weight of the distillation term, 0..1 (0.5)")
    n.add_argument("--kd-temperature", type=float, default=4.0, help="softening T (4)")
    n.add_argument("--weights", type=Path, default=None,
                   help="initial weights (state_dict file) of the model")
    n.add_argument("--out", type=Path, required=True,
                   help="folder for checkpoint.pt, weights.pt and log.json")
    n.add_argument("--resume", action="store_true",
                   help="continue OUT/checkpoint.pt (without it, an existing checkpoint is "
                        "an error: nothing is overwritten)")
    n.add_argument("--workers", type=int, default=0, help="data loading processes (0)")
    n.add_argument("--seed", type=int, default=0, help="seed of the data order and "
                   "augmentation (0); the model's initial weights are seeded with it too")
    n.add_argument("--sync-batchnorm", action="store_true",
                   help="under torchrun on GPUs: batch-norm statistics over the global batch")

    e = sub.add_parser("evaluate", help="loss, top-1 and top-5 of a model on a dataset",
                       description="Evaluate MODEL with --weights on the validation split "
                                   "of --data (or --split).")
    _data_options(e)
    e.add_argument("--weights", type=Path, required=True,
                   help="state_dict file (weights.pt or checkpoint.pt of convgap train)")
    e.add_argument("--split", default="val", choices=("val", "train", "all"),
                   help="which images: val (default), train, or all (a folder's every "
                        "image; for shapes, both splits)")
    e.add_argument("--batch-size", type=_positive, default=256, help="(256)")

    y = sub.add_parser("dynamic", help="make a trained model dynamic and train it under a "
                       "latency budget; accuracy, density and latency against the static one",
                       description="Wrap MODEL's residual blocks with maskers (LAUDNet: "
                                   "spatial tiles, channel groups or whole blocks), train "
                                   "under a latency (measured here) or FLOPs budget with "
                                   "distillation from the static model, then evaluate it "
                                   "as deployed (sparse execution) and time both models. "
                                   "Writes OUT/weights.pt and OUT/log.json. Runs under "
                                   "torchrun too.")
    _data_options(y)
    y.add_argument("--weights", type=Path, required=True,
                   help="the trained static model's state_dict")
    y.add_argument("--mode", default="spatial", choices=("spatial", "channel", "layer"),
                   help="(spatial)")
    y.add_argument("--target", type=float, default=0.5,
                   help="fraction of the dynamic blocks' cost to keep (0.5)")
    y.add_argument("--budget", default="latency", choices=("latency", "predicted", "flops"),
                   help="what the target counts: latency measured here, latency from the "
                        "device's predictor (convgap calibrate), or MACs (latency)")
    y.add_argument("--granularity", nargs="+", default=["auto"], metavar="S",
                   help="spatial tile side: 'auto' (timed per stage), 'predict' (from the "
                        "device's predictor), one int, or one per stage (auto)")
    y.add_argument("--groups", type=_positive, default=4,
                   help="channel mode: keep bits per block (4)")
    y.add_argument("--epochs", type=_positive, required=True, help="epochs to train")
    y.add_argument("--batch-size", type=_positive, default=64, help="(64)")
    y.add_argument("--lr", type=float, default=None, help="(1e-3 for adamw, 0.01 for sgd)")
    y.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="(adamw)")
    y.add_argument("--out", type=Path, required=True,
                   help="folder for weights.pt and log.json")
    y.add_argument("--seed", type=int, default=0, help="(0)")

    c = sub.add_parser("calibrate", help="fit this device's latency predictor "
                       "(micro-benchmarks of random networks; cached)",
                       description="Record the operators of random networks at batch 1 and "
                                   "8 in both layouts, time each alone and each network "
                                   "whole, and fit one latency model per operator kind "
                                   "(cached per device, threads, dtype, malloc policy and "
                                   "torch version).")
    c.add_argument("--quick", action="store_true",
                   help="fewer calibration networks (a few minutes on 2 cores)")
    c.add_argument("--refresh", action="store_true", help="calibrate even if cached")
    _device_options(c)

    q = sub.add_parser("predict", help="predicted latency per layer and model, without "
                       "running the model",
                       description="Predict the model's latency from its operators' shapes "
                                   "with the device's calibration (`convgap calibrate`, run "
                                   "first if there is none); with --measure, also time it "
                                   "whole (as `analyze` does) and each layer inside the "
                                   "run, and show the errors.")
    _model_options(q, many=True, malloc="asis", what="measure")
    q.add_argument("--measure", action="store_true",
                   help="also measure the model and each layer, and show the errors")
    q.add_argument("--density", type=float, default=None,
                   help="dynamic models: the share of mask cells every dynamic block keeps "
                        "(default: as forced on the model)")
    q.add_argument("--top", type=_positive, default=10,
                   help="layers shown per run, by predicted time (10)")
    q.add_argument("--json", type=Path, default=None, help="write the predictions as JSON")

    sub.add_parser("models", help="list the model zoo")
    return parser


def _data_options(p: argparse.ArgumentParser) -> None:
    """The model and the dataset of ``train`` and ``evaluate``, and where they run."""
    p.add_argument("model", metavar="MODEL",
                   help="zoo name (see `convgap models`) or package.module:factory")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="'shapes' (generated) with options as shapes:key=value,... "
                        "(num_classes, image_size, train_size, val_size, seed, cache), or a "
                        "folder with one sub-folder of images per class (split 90/10 into "
                        "train and val)")
    p.add_argument("--image-size", type=_positive, default=None,
                   help="image side in pixels (default: shapes' own, 64 for a folder)")
    p.add_argument("--num-classes", type=_positive, default=None,
                   help="classes of the model (default: the data's; a "
                        "package.module:factory gets num_classes only when this is given)")
    p.add_argument("--device", default=None,
                   help="'cpu' or 'cuda[:N]' (default: this process's GPU if there is one)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for torch (default: torch's current setting)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _load(spec: str, args: argparse.Namespace) -> nn.Module:
    """Model ``spec`` (zoo name or package.module:factory) with ``--num-classes`` and
    ``--weights`` applied."""
    net = models.load(spec, num_classes=args.num_classes)
    if args.weights is not None:
        models.load_weights(net, args.weights)
    return net


def _model_and_input(args: argparse.Namespace, image_size: int | None = None,
                     classes: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    """The one model of tune / factorize, in eval mode on ``--device`` in ``--dtype`` with
    its weights in ``--layout``, and a seeded random input of the requested shape in that
    layout. ``image_size`` and ``classes`` (a dataset's) stand in for ``--image-size`` and
    ``--num-classes`` when those are not given."""
    dtype = parse_dtype(args.dtype)
    dev = hardware.check_device(args.device)
    net = _load(args.model, args) if classes is None else \
        _classifier(args.model, args.weights, classes, args)
    size = args.image_size or image_size or 224
    shape = check_input(net, (args.batch, args.channels, size, size))
    fmt = memory_format(args.layout)
    net = net.eval().to(device=dev, dtype=dtype, memory_format=fmt)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
    return net, x.contiguous(memory_format=fmt)


def _cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    if args.weights is not None and len(args.models) != 1:
        raise ConvgapError("--weights applies to one model; analyze one model at a time")
    dtype = parse_dtype(args.dtype)
    hardware.check_device(args.device)
    # load everything first: bad names fail before any timing
    nets = [(spec.split(":")[-1], _load(spec, args)) for spec in args.models]
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
                        allocation=not args.no_malloc_cost, predict=args.predict))
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


def _report(result: Comparison, title: str, args: argparse.Namespace,
            console: Console, recovery: train.Recovery | None = None) -> None:
    """Print a comparison's table, summary and the layers left as they are, and the
    accuracies of ``recovery``; write the comparison's JSON with ``--json`` (with the
    accuracies under ``"accuracy"``)."""
    console.print(result.table(title=f"{title} {result.input_shape} {result.layout} "
                                     f"{args.dtype}, {result.threads} threads"))
    console.print(result.summary())
    for name, reason in result.left.items():
        console.print(f"left as it is: {name}: {reason}")
    if recovery is not None:
        console.print(_accuracy_table(recovery, args))
    if args.json is not None:
        if recovery is None:
            console.print(f"JSON: {result.to_json(args.json)}")
        else:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(
                {**result.to_dict(), "accuracy": recovery.to_dict()}, indent=1))
            console.print(f"JSON: {args.json}")


def _accuracy_table(recovery: train.Recovery, args: argparse.Namespace) -> Table:
    """One row per stage of ``recovery``: validation top-1, top-5, loss, and top-1 against
    the original's (percentage points)."""
    epochs = len(recovery.history.epochs)
    t = Table(title=f"accuracy on {args.data} ({recovery.original.images} validation "
                    "images)", title_justify="left")
    for col in ("model", "val top-1", "val top-5", "val loss", "top-1 change"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for stage, ev in recovery.stages():
        name = f"{stage} ({epochs} epoch{'s' * (epochs != 1)}, distilled)" \
            if stage == "fine-tuned" else stage
        change = "" if stage == "original" else \
            f"{100 * (ev.top1 - recovery.original.top1):+.1f} pt"
        t.add_row(name, f"{ev.top1:.2%}", f"{ev.top5:.2%}", f"{ev.loss:.4f}", change)
    return t


def _cmd_tune(args: argparse.Namespace, console: Console) -> int:
    net, x = _model_and_input(args)
    candidates = None if args.algos == ["auto"] else args.algos
    with timing.threads(args.threads):
        tuned = swap(net, "auto", x, candidates=candidates, quiet=args.quiet,
                     malloc=_policy(args))
    result = compare(net, tuned, x, threads=args.threads, quiet=args.quiet,
                     malloc=_policy(args))
    _report(result, f"convgap tune {args.model}", args, console)
    return 0


def _cmd_factorize(args: argparse.Namespace, console: Console) -> int:
    tuning = {"--lr": args.lr, "--batch-size": args.batch_size, "--optimizer": args.optimizer,
              "--out": args.out}
    if args.data is None and args.finetune:
        raise ConvgapError("--finetune trains on a dataset: give --data "
                           "shapes[:key=value,...] or an image folder")
    given = [name for name, value in tuning.items() if value is not None]
    if given and not args.finetune:
        raise ConvgapError(f"{', '.join(given)} set{'s' * (len(given) == 1)} up fine-tuning: "
                           "give --finetune EPOCHS (and --data)")
    if args.data is not None and args.dtype != "float32":
        raise ConvgapError("--data evaluates and fine-tunes in float32: drop --dtype")
    if args.out is not None:
        for name in ("weights.pt", "log.json"):
            check_writable(args.out / name, name.split(".")[0])
    train_set = val_set = classes = size = None
    if args.data is not None:
        train_set, val_set, classes = _datasets(args, augment=True)
        size = val_set[0][0].shape[-1]
    net, x = _model_and_input(args, size, classes)
    compression = args.compression
    if args.factorization != "flattened" and args.rank is None and compression is None:
        compression = 10.0
    rank = None if args.rank is None else (args.rank[0] if len(args.rank) == 1 else args.rank)
    with timing.threads(args.threads):
        fact = factorize(net, args.factorization, x, layers=args.layers, quiet=args.quiet,
                         compression=compression, rank=rank, rank_multiple=args.rank_multiple,
                         keep="all" if args.keep_slower else "faster")
    made = changes(fact)
    if not any(c.transform == "factorize" for c in made):
        raise ConvgapError("no layer was factorized: " + "; ".join(
            f"{c.name}: {c.reason}" for c in made) + " (--keep-slower keeps slower layers)")
    recovery = None
    if args.data is not None:
        with timing.threads(args.threads):
            recovery = train.finetune(
                net, fact, train_set, val_set, epochs=args.finetune,
                batch_size=args.batch_size or 64, lr=args.lr,
                optimizer=args.optimizer or "adamw", device=args.device, quiet=args.quiet,
                log=None if args.out is None else args.out / "log.json")
    result = compare(net, fact, x, threads=args.threads, quiet=args.quiet,
                     malloc=_policy(args))
    what = args.factorization + (f", {compression:g}x" if compression else "") + \
        (f", rank {rank}" if rank else "")
    _report(result, f"convgap factorize {args.model} ({what})", args, console, recovery)
    if args.out is not None:
        buffer = io.BytesIO()
        torch.save(fact.state_dict(), buffer)
        write_atomic(args.out / "weights.pt", lambda fh: fh.write(buffer.getbuffer()))
        write_atomic(args.out / "log.json",
                     lambda fh: fh.write(json.dumps(recovery.to_dict(), indent=1).encode()))
        console.print(f"weights: {args.out / 'weights.pt'}\nlog: {args.out / 'log.json'}")
    return 0


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{1e3 * t:.3g}"


def _cmd_fuse(args: argparse.Namespace, console: Console) -> int:
    net, x = _model_and_input(args)
    dtype = parse_dtype(args.dtype)
    with timing.threads(args.threads):
        fused = fuse(net, x, layers=args.layers, patterns=args.patterns, quiet=args.quiet,
                     malloc=_policy(args))
        roof = hardware.roofs(args.device, dtype, threads=args.threads)
        rows = fused_blocks(fused, roof)
        with torch.no_grad():
            before, after = timing.compare([lambda: net(x), lambda: fused(x)],
                                           config.MODEL_COMPARE, x.device.type)
    t = Table(title=f"convgap fuse {args.model} {tuple(x.shape)} {args.layout} {args.dtype}, "
                    f"{torch.get_num_threads() if args.threads is None else args.threads} "
                    f"threads (ms; roofline: the block as one kernel)", title_justify="left")
    for col in ("block", "pattern", "layer-wise", "fused", "speedup", "fused roofline",
                "fused / roofline", "efficiency"):
        t.add_column(col, justify="left" if col in ("block", "pattern") else "right")
    for r in rows:
        t.add_row(r.name or "(whole network)", r.pattern, _ms(r.layerwise_s), _ms(r.fused_s),
                  f"{r.layerwise_s / r.fused_s:.2f}x" if r.fused_s and r.layerwise_s else "-",
                  _ms(r.roofline_s), f"{r.of_roofline:.2f}" if r.of_roofline else "-",
                  f"{r.efficiency:.0%}" if r.efficiency else "-")
    console.print(t)
    if any(r.pattern == "network" for r in rows):
        console.print("network: layer-wise = the model with its blocks fused, fused = the "
                      "whole network as one oneDNN plan (the faster runs)")
    ratio = timing.paired_ratio(after, before)
    console.print(f"whole model: {_ms(before.median)} ms -> {_ms(after.median)} ms "
                  f"(paired ratio {ratio:.3f}, {1 / ratio:.2f}x); {len(rows)} blocks fused")
    left = [c for c in changes(fused) if c.transform == "left" and c.reason]
    for c in left:
        console.print(f"left as it is: {c.name}: {c.reason}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": args.model, "input_shape": list(x.shape), "layout": args.layout,
            "before_s": before.median, "after_s": after.median, "ratio": ratio,
            "blocks": [dict(asdict(r), efficiency=r.efficiency) for r in rows]},
            indent=1, default=str))
        console.print(f"JSON: {args.json}")
    return 0


SHAPES_OPTIONS = ("num_classes", "image_size", "train_size", "val_size", "seed", "cache")


def _datasets(args: argparse.Namespace, augment: bool):
    """(train, val, class count) of ``--data``: the generated shapes or an image folder,
    the training images randomly cropped and flipped when ``augment``."""
    spec = args.data
    transform = data.augment() if augment else None
    if spec == "shapes" or spec.startswith("shapes:"):
        options: dict[str, int] = {}
        for item in filter(None, spec.partition(":")[2].split(",")):
            key, eq, value = item.partition("=")
            if key not in SHAPES_OPTIONS or not eq:
                raise ConvgapError(f"bad --data option {item!r}: write shapes:key=value,... "
                                   f"with keys {', '.join(SHAPES_OPTIONS)}")
            try:
                options[key] = int(value)
            except ValueError:
                raise ConvgapError(f"--data option {key} must be an integer, got "
                                   f"{value!r}") from None
        if args.image_size is not None:
            if options.get("image_size", args.image_size) != args.image_size:
                raise ConvgapError(f"--image-size {args.image_size} and image_size="
                                   f"{options['image_size']} in --data disagree; give one")
            options["image_size"] = args.image_size
        options["cache"] = bool(options.get("cache", 0))
        train_set, val_set = data.shapes(**options, transform=transform)
    else:
        size = args.image_size or 64
        train_set = data.image_folder(spec, size, split="train", transform=transform)
        val_set = data.image_folder(spec, size, split="val")
    return train_set, val_set, len(train_set.classes)


def _classifier(spec: str, weights: Path | None, classes: int,
                args: argparse.Namespace) -> nn.Module:
    """Model ``spec`` for ``classes`` data classes (``--num-classes`` overrides; a
    ``module:factory`` gets num_classes only from ``--num-classes``), with ``weights``."""
    wanted = args.num_classes if args.num_classes is not None or ":" in spec else classes
    net = models.load(spec, num_classes=wanted)
    if weights is not None:
        models.load_weights(net, weights)
    return net


def _main_process() -> bool:
    """Whether this is the process that prints and writes (rank 0 under torchrun)."""
    return os.environ.get("RANK", "0") == "0"


def _cmd_train(args: argparse.Namespace, console: Console) -> int:
    out = args.out
    ckpt, weights, log = out / "checkpoint.pt", out / "weights.pt", out / "log.json"
    for path, what in ((ckpt, "checkpoint"), (weights, "weights"), (log, "log")):
        check_writable(path, what)
    if ckpt.exists() and not args.resume:
        raise ConvgapError(f"{ckpt} exists: pass --resume to continue it, or choose another "
                           "--out (nothing was overwritten)")
    if (args.teacher is None) != (args.teacher_weights is None):
        raise ConvgapError("--teacher and --teacher-weights go together: a teacher needs its "
                           "trained weights")
    train_set, val_set, classes = _datasets(args, augment=not args.no_augment)
    torch.manual_seed(args.seed)  # the model's initial weights
    net = _classifier(args.model, args.weights, classes, args)
    teacher = None if args.teacher is None else _classifier(
        args.teacher, args.teacher_weights, classes, args)
    with timing.threads(args.threads):
        history = train.fit(
            net, train_set, val_set, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, optimizer=args.optimizer, schedule=args.schedule, warmup=args.warmup,
            weight_decay=args.weight_decay, momentum=args.momentum, teacher=teacher,
            kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature, checkpoint=ckpt,
            resume=args.resume, device=args.device, workers=args.workers, seed=args.seed,
            log=log, quiet=args.quiet, sync_batchnorm=args.sync_batchnorm)
    if not _main_process():
        return 0
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    write_atomic(weights, lambda fh: fh.write(buffer.getbuffer()))
    t = Table(title=f"convgap train {args.model} on {args.data} ({len(train_set)} train, "
                    f"{len(val_set)} val images, {classes} classes)", title_justify="left")
    for col in ("epoch", "train loss", "train top-1", "val loss", "val top-1", "images/s",
                "lr", "seconds"):
        t.add_column(col, justify="right")
    for r in history.epochs:
        t.add_row(str(r.epoch), f"{r.train_loss:.4f}", f"{r.train_top1:.2%}",
                  f"{r.val_loss:.4f}", f"{r.val_top1:.2%}", f"{r.images_per_s:,.0f}",
                  f"{r.lr:.3g}", f"{r.seconds:.1f}")
    console.print(t)
    console.print(f"weights: {weights}\ncheckpoint: {ckpt}\nlog: {log}")
    return 0


def _cmd_evaluate(args: argparse.Namespace, console: Console) -> int:
    train_set, val_set, classes = _datasets(args, augment=False)
    chosen = {"val": val_set, "train": train_set,
              "all": torch.utils.data.ConcatDataset([train_set, val_set])}[args.split]
    net = _classifier(args.model, args.weights, classes, args)
    with timing.threads(args.threads):
        result = train.evaluate(net, chosen, batch_size=args.batch_size,
                                device=args.device or ("cuda" if torch.cuda.is_available()
                                                       else "cpu"))
    console.print(f"convgap evaluate {args.model} ({args.weights}) on {args.data}, "
                  f"{args.split}: {result.images} images")
    console.print(f"loss {result.loss:.4f}  top-1 {result.top1:.2%}  top-5 {result.top5:.2%}")
    return 0


def _cmd_dynamic(args: argparse.Namespace, console: Console) -> int:
    from . import dynamic
    weights, log = args.out / "weights.pt", args.out / "log.json"
    for path, what in ((weights, "weights"), (log, "log")):
        check_writable(path, what)
    if not 0.0 < args.target <= 1.0:
        raise ConvgapError(f"--target must be in (0, 1], got {args.target}")
    gran = args.granularity
    if gran in (["auto"], ["predict"]):
        gran = gran[0]
    else:
        try:
            gran = [int(g) for g in gran]
        except ValueError:
            raise ConvgapError(f"--granularity: 'auto', 'predict' or integers, got "
                               f"{gran}") from None
        gran = gran[0] if len(gran) == 1 else gran
    train_set, val_set, classes = _datasets(args, augment=True)
    static = _classifier(args.model, args.weights, classes, args).eval()
    with timing.threads(args.threads):
        result = dynamic.train_dynamic(
            static, train_set, val_set, epochs=args.epochs, mode=args.mode,
            target=args.target, budget=args.budget, granularity=gran, groups=args.groups,
            batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
            device=args.device, seed=args.seed, quiet=args.quiet)
        if not _main_process():
            return 0
        net = result.model.cpu().eval()
        x = torch.stack([val_set[0][0]])
        with torch.no_grad():
            a, b = timing.compare([lambda: static.cpu()(x), lambda: net(x)],
                                  config.MODEL_COMPARE)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    write_atomic(weights, lambda fh: fh.write(buffer.getbuffer()))
    blocks = dynamic.dynamic_blocks(net)
    summary = {
        "model": args.model, "mode": args.mode, "target": args.target, "budget": args.budget,
        "groups": args.groups, "granularity": {n: b.granularity() for n, b in blocks.items()},
        "static_top1": result.static.top1, "dynamic_top1": result.dynamic.top1,
        "density": result.density, "mean_density": result.mean_density,
        "static_ms": a.median_ms, "dynamic_ms": b.median_ms,
        "latency_ratio": timing.paired_ratio(b, a),
        "history": [asdict(r) for r in result.history.epochs]}
    write_atomic(log, lambda fh: fh.write(json.dumps(summary, indent=1).encode()))
    t = Table(title=f"convgap dynamic {args.model} ({args.mode}, target {args.target} of "
                    f"the {args.budget}) on {args.data}", title_justify="left")
    for col in ("block", "granularity", "density mean", "density std"):
        t.add_column(col, justify="right")
    for n, (mean, std) in result.density.items():
        t.add_row(n, str(blocks[n].granularity() or "-"), f"{mean:.2f}", f"{std:.2f}")
    console.print(t)
    console.print(f"val top-1: static {result.static.top1:.2%}, dynamic "
                  f"{result.dynamic.top1:.2%}; mean density {result.mean_density:.2f}")
    console.print(f"latency at batch 1: static {a.median_ms:.3g} ms, dynamic "
                  f"{b.median_ms:.3g} ms (paired ratio {summary['latency_ratio']:.2f})")
    console.print(f"weights: {weights}\nlog: {log}\n(load: make_dynamic(model, "
                  f"'{args.mode}', granularity=<log.json's>, groups={args.groups}) then "
                  "load_state_dict)")
    return 0


def _cmd_calibrate(args: argparse.Namespace, console: Console) -> int:
    dtype = parse_dtype(args.dtype)
    cal = predict.calibrate(args.device, dtype, args.threads, quick=args.quick,
                            refresh=args.refresh, quiet=args.quiet)
    t = Table(title=f"latency predictor of {cal.roofs.device_name} ({cal.roofs.threads} "
                    f"threads, {cal.roofs.dtype}; calibrated {cal.measured_at})",
              title_justify="left")
    for col in ("operator kind", "samples", "fit: median |error|"):
        t.add_column(col, justify="right" if col != "operator kind" else "left")
    for kind, st in cal.stats.items():
        if isinstance(st, dict) and "samples" in st:
            err = st.get("median_abs_rel_error")
            t.add_row(kind, str(st["samples"]), "baseline" if err is None else f"{err:.1%}")
    console.print(t)
    w = cal.weights
    console.print(f"one operator call: {cal.overhead_s * 1e6:.1f} us; a whole network: "
                  f"{w.get('ops', 0):.2f} x its operators' predictions + "
                  f"{w.get('op', 0) * 1e6:.1f} us per operator + "
                  f"{w.get('module', 0) * 1e6:.1f} us per module (fit to the calibration "
                  f"networks within {cal.stats.get('network_fit_mape', 0):.1%} mean error; "
                  f"{cal.stats.get('networks_run', '?')} random networks)")
    if cal.stats.get("plans"):
        console.print(f"a whole-network oneDNN plan: its steps' predictions + "
                      f"{cal.plan_overhead_s * 1e6:.1f} us per call "
                      f"({len(cal.stats['plans'])} plans timed)")
    return 0


def _cmd_predict(args: argparse.Namespace, console: Console) -> int:
    dtype = parse_dtype(args.dtype)
    hardware.check_device(args.device)
    nets = [(spec.split(":")[-1], _load(spec, args)) for spec in args.models]
    cal = predict.calibrate(args.device, dtype, args.threads, quiet=args.quiet)
    out = []
    for name, net in nets:
        for batch in args.batch:
            for layout in args.layout:
                shape = check_input(net, (batch, args.channels, args.image_size,
                                          args.image_size))
                model = net.eval().to(dtype=dtype, memory_format=memory_format(layout))
                pred = predict.predict_latency(model, shape, args.device, dtype, layout,
                                               args.threads, density=args.density,
                                               calibration=cal)
                measured = None
                if args.measure:
                    with timing.threads(args.threads), allocator.use(_policy(args)):
                        x = torch.randn(shape).to(dtype=dtype).contiguous(
                            memory_format=memory_format(layout))
                        measured = predict.profile.measure(
                            model, x, pred.ops, [r.name for r in pred.layers])
                console.print(_prediction_table(name, pred, measured, args.top))
                out.append({"model": name, "batch": batch, "layout": layout,
                            "predicted_s": pred.total_s,
                            "measured_s": None if measured is None else measured[0],
                            "layers": [asdict(r) | ({} if measured is None else {
                                "measured_s": measured[1][r.name]}) for r in pred.layers]})
    if args.json is not None:
        write_atomic(args.json, lambda fh: fh.write(json.dumps(out, indent=1).encode()))
        console.print(f"JSON: {args.json}")
    return 0


def _prediction_table(name: str, pred: "predict.Prediction", measured, top: int) -> Table:
    """The model's and its ``top`` slowest-predicted layers' predicted ms, and with
    ``measured`` (:func:`convgap.predict.profile.measure`: whole seconds, seconds per layer
    inside the run) the measured ms and the error."""
    t = Table(title=f"{name} {pred.input_shape} {pred.layout} {pred.dtype}, {pred.threads} "
                    f"threads: predicted" + (" against measured" if measured else "")
                    + (f" (whole network: {pred.path})" if pred.path else ""),
              title_justify="left")
    cols = ["layer", "type", "predicted ms"] + (["measured ms", "error"] if measured else [])
    for col in cols:
        t.add_column(col, justify="left" if col in ("layer", "type") else "right")
    times = {} if measured is None else measured[1]

    def row(label, typ, p, m):
        cells = [label, typ, f"{p * 1e3:.3f}"]
        if measured is not None:
            cells += ["-", "-"] if m is None else [f"{m * 1e3:.3f}", f"{p / m - 1:+.1%}"]
        t.add_row(*cells)

    row("(whole model)", "", pred.total_s, None if measured is None else measured[0])
    for r in sorted(pred.layers, key=lambda r: -r.seconds)[:top]:
        row(r.name, r.type, r.seconds, times.get(r.name))
    return t


def _cmd_models(args: argparse.Namespace, console: Console) -> int:
    for name in models.names():
        console.print(name)
    return 0


COMMANDS = {"analyze": _cmd_analyze, "roofs": _cmd_roofs, "tune": _cmd_tune,
            "factorize": _cmd_factorize, "fuse": _cmd_fuse, "train": _cmd_train,
            "evaluate": _cmd_evaluate, "dynamic": _cmd_dynamic, "calibrate": _cmd_calibrate,
            "predict": _cmd_predict, "models": _cmd_models}


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
