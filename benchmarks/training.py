"""Benchmark: training on generated data, its throughput, fine-tuning after factorization,
and torchrun (issue 19).

On CPU under ``--threads`` threads (2), the zoo's resnet18 with 10 classes on
``convgap.data.shapes`` at 64x64 (cached; random crop and flip on the training images):

1. **curve** -- ``convgap.train.fit`` (``--optimizer``: SGD with momentum 0.9 or AdamW;
   ``--lr``, one epoch of warm-up
   (a quarter of the run if shorter) then cosine, ``--batch`` images a step) for ``--epochs`` epochs on ``--train-size``
   images, validated on ``--val-size``: per epoch the validation top-1, the training images
   per second and the wall time since the start; the first epoch at >= 90% and when.
   The trained weights are kept for part 4 (``--out``'s directory, ``training_resnet18.pt``).
2. **throughput** -- one epoch of ``fit`` on ``--loop-size`` images against a plain
   hand-written PyTorch loop over the same model, data, DataLoader and batch (forward,
   cross-entropy, backward, SGD step), each followed by one pass over the same validation
   images: wall seconds of each, ``--rounds`` rounds interleaved (fit then loop, loop then
   fit, ...), the median of the per-round ratios fit / loop (target: within 5%).
3. **data** -- images per second ``shapes`` makes (uncached, one process, image by image)
   against the images per second training consumes (part 1's median).
4. **factorize** -- the trained model factorized (Tucker and CP, compression 10, every
   dense non-1x1 conv but the stem (``--factorize-stem`` includes it), ``keep='all'``), validation top-1 before, right after factorizing
   and after ``--finetune`` epochs (on ``--finetune-size`` images) of fit with
   distillation from the original
   (``convgap.train.finetune``), with params, MACs (``convgap.count``) and
   latency (batch 1, 64x64, inference, interleaved with the original: the paired ratio).
5. **torchrun** -- one epoch of ``fit`` on ``--loop-size`` images in one process (``--threads``
   threads) against ``torchrun --nproc_per_node 2`` (one thread each), the same global
   batch: training images per second of each.

    python benchmarks/training.py [--parts curve throughput data factorize torchrun]
                                  [--threads 2] [--epochs 8] [--train-size 20000] ...

Prints a table per part and writes benchmarks/results/training.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
PARTS = ("curve", "throughput", "data", "factorize", "torchrun")
SIZE, CLASSES = 64, 10


def datasets(train_size: int, val_size: int, seed: int = 0):
    from convgap import data
    return data.shapes(CLASSES, SIZE, train_size, val_size, seed, transform=data.augment(),
                       cache=True)


def new_model():
    from convgap import models
    torch.manual_seed(0)
    return models.create("resnet18", num_classes=CLASSES)


def curve(args, console) -> dict:
    from convgap import train
    train_set, val_set = datasets(args.train_size, args.val_size)
    model = new_model()
    start = time.perf_counter()
    hist = train.fit(model, train_set, val_set, epochs=args.epochs, batch_size=args.batch,
                     lr=args.lr, optimizer=args.optimizer, warmup=min(1, args.epochs / 4),
                     quiet=True)
    total = time.perf_counter() - start
    rows, elapsed = [], 0.0
    for r in hist.epochs:
        elapsed += r.seconds
        rows.append({"epoch": r.epoch, "val_top1": r.val_top1, "train_loss": r.train_loss,
                     "images_per_s": r.images_per_s, "elapsed_s": elapsed})
    first = next((r for r in rows if r["val_top1"] >= 0.9), None)
    weights = args.out.parent / "training_resnet18.pt"
    torch.save(model.state_dict(), weights)
    from rich.table import Table
    t = Table(title=f"resnet18 on shapes ({args.train_size} train / {args.val_size} val, "
                    f"{SIZE}x{SIZE}, batch {args.batch}, {args.optimizer} lr {args.lr})")
    for c in ("epoch", "val top-1", "train loss", "images/s", "elapsed s"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["epoch"]), f"{r['val_top1']:.3f}", f"{r['train_loss']:.3f}",
                  f"{r['images_per_s']:.0f}", f"{r['elapsed_s']:.0f}")
    console.print(t)
    console.print(f"first epoch at >= 90%: {first['epoch'] if first else 'none'}"
                  + (f" after {first['elapsed_s']:.0f} s" if first else "")
                  + f"; total {total:.0f} s (data made at construction not included: "
                  f"see part 3)")
    return {"rows": rows, "first_at_90": first, "seconds": total, "weights": str(weights)}


def plain_loop(model, loader, val_loader, lr: float) -> None:
    """The hand-written reference: what a PyTorch user writes."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        for x, y in val_loader:
            F.cross_entropy(model(x), y)


def throughput(args, console) -> dict:
    from torch.utils.data import DataLoader
    from convgap import train
    train_set, val_set = datasets(args.loop_size, args.batch * 2)
    rows = []
    for i in range(args.rounds):
        order = ("fit", "loop") if i % 2 == 0 else ("loop", "fit")
        secs = {}
        for which in order:
            model = new_model()
            start = time.perf_counter()
            if which == "fit":
                train.fit(model, train_set, val_set, epochs=1, batch_size=args.batch,
                          lr=args.lr, schedule="constant", quiet=True)
            else:
                gen = torch.Generator().manual_seed(i)
                plain_loop(model, DataLoader(train_set, args.batch, shuffle=True,
                                             generator=gen),
                           DataLoader(val_set, args.batch), args.lr)
            secs[which] = time.perf_counter() - start
        rows.append({"fit_s": secs["fit"], "loop_s": secs["loop"],
                     "ratio": secs["fit"] / secs["loop"]})
    ratio = statistics.median(r["ratio"] for r in rows)
    n = args.loop_size
    console.print(f"throughput, {n} training images a round: fit "
                  f"{statistics.median(n / r['fit_s'] for r in rows):.0f} images/s, plain "
                  f"loop {statistics.median(n / r['loop_s'] for r in rows):.0f} images/s; "
                  f"fit / loop time, median of {args.rounds} paired rounds: {ratio:.3f} "
                  f"(range {min(r['ratio'] for r in rows):.3f}-"
                  f"{max(r['ratio'] for r in rows):.3f})")
    return {"rounds": rows, "ratio": ratio, "images": n}


def data_rate(args, console, consumed: float | None) -> dict:
    from convgap import data
    train_set, _ = data.shapes(CLASSES, SIZE, 10 ** 6, 1, 1)
    count = args.data_images
    start = time.perf_counter()
    for i in range(count):
        train_set[i]
    made = count / (time.perf_counter() - start)
    line = f"shapes makes {made:.0f} images/s (64x64, uncached, one process)"
    if consumed:
        line += f"; training consumes {consumed:.0f}: {made / consumed:.1f}x"
    console.print(line)
    return {"made_per_s": made, "consumed_per_s": consumed,
            "ratio": made / consumed if consumed else None}


def not_stem(name: str, m: torch.nn.Module) -> bool:
    """factorize's default selection (dense, non-1x1 convs) without the stem: the conv
    reading the image (3 input channels) holds 0.08% of resnet18's weights, and
    factorizing it at 10x cost 50-60 points of accuracy before fine-tuning
    (docs/2026-12-03-training.md)."""
    return (isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) and m.groups == 1
            and m.in_channels > 3)


def factorize_part(args, console, weights: Path) -> dict:
    from convgap import count, factorize, timing, train
    from rich.table import Table
    train_set, val_set = datasets(args.finetune_size, args.val_size)
    original = new_model()
    original.load_state_dict(torch.load(weights, weights_only=True))
    original.eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    cfg = timing.TimingConfig(min_repeats=15, min_time=0.2)
    rows = []
    for what in ("tucker", "cp"):
        fact = factorize(original, what, x, compression=10, keep="all", quiet=True,
                         layers=None if args.factorize_stem else not_stem)
        result = train.finetune(
            original, fact, train_set, val_set, epochs=args.finetune,
            batch_size=args.batch, lr=args.finetune_lr, optimizer=args.finetune_optimizer,
            quiet=True)
        fact.eval()
        with torch.no_grad():
            a, b = timing.compare([lambda: original(x), lambda: fact(x)], cfg)
        rows.append({
            "factorization": what,
            "top1_before": result.original.top1, "top1_factorized": result.factorized.top1,
            "top1_finetuned": result.finetuned.top1,
            "params_before": sum(p.numel() for p in original.parameters()),
            "params_after": sum(p.numel() for p in fact.parameters()),
            "macs_before": count(original, x.shape).macs,
            "macs_after": count(fact, x.shape).macs,
            "ms_before": a.median_ms, "ms_after": b.median_ms,
            "latency_ratio": timing.paired_ratio(b, a)})
    t = Table(title=f"resnet18 factorized at 10x, fine-tuned {args.finetune} epochs with "
                    f"distillation, {args.finetune_optimizer} lr {args.finetune_lr} (val "
                    f"top-1; latency batch 1, {SIZE}x{SIZE})")
    for c in ("factorization", "top-1 before", "factorized", "fine-tuned", "params",
              "MACs (M)", "ms before", "ms after", "after / before"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["factorization"], f"{r['top1_before']:.3f}",
                  f"{r['top1_factorized']:.3f}", f"{r['top1_finetuned']:.3f}",
                  f"{r['params_before'] / 1e6:.2f}M -> {r['params_after'] / 1e6:.2f}M",
                  f"{r['macs_before'] / 1e6:.0f} -> {r['macs_after'] / 1e6:.0f}",
                  f"{r['ms_before']:.2f}", f"{r['ms_after']:.2f}",
                  f"{r['latency_ratio']:.2f}")
    console.print(t)
    return {"rows": rows, "compression": 10, "epochs": args.finetune,
            "lr": args.finetune_lr, "optimizer": args.finetune_optimizer,
            "stem_factorized": args.factorize_stem, "finetune_size": args.finetune_size}


def torchrun_child(args) -> None:
    """One epoch of fit on --loop-size images, run by each torchrun process (or alone);
    rank 0 (or the lone process) writes the history to --child-out."""
    from convgap import train
    train_set, val_set = datasets(args.loop_size, args.batch * 2)
    hist = train.fit(new_model(), train_set, val_set, epochs=1, batch_size=args.batch,
                     lr=args.lr, schedule="constant", quiet=True)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.child_out).write_text(json.dumps(hist.to_dict()))


def torchrun_part(args, console) -> dict:
    out = {}
    base = [sys.executable, str(Path(__file__).resolve()), "--child",
            "--loop-size", str(args.loop_size), "--batch", str(args.batch),
            "--lr", str(args.lr)]
    runs = {"1 process": (base, dict(OMP_NUM_THREADS=str(args.threads)), args.threads),
            "torchrun 2 processes": ([sys.executable, "-m", "torch.distributed.run",
                                      "--nproc_per_node", "2", "--master_port", "29533"]
                                     + base[1:], dict(OMP_NUM_THREADS="1"), 1)}
    for name, (cmd, env, threads) in runs.items():
        path = args.out.parent / "training_child.json"
        subprocess.run(cmd + ["--child-out", str(path), "--threads", str(threads)],
                       env={**os.environ, **env}, check=True)
        rec = json.loads(path.read_text())["epochs"][0]
        path.unlink()
        out[name] = {"images_per_s": rec["images_per_s"], "val_top1": rec["val_top1"],
                     "seconds": rec["seconds"]}
    console.print("torchrun: " + "; ".join(f"{k} {v['images_per_s']:.0f} images/s"
                                           for k, v in out.items()))
    return out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"),
                   help="part 1's optimizer (parts 2 and 5 use SGD, as the plain loop)")
    p.add_argument("--loop-size", type=int, default=2048,
                   help="training images per round of parts 2 and 5")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--data-images", type=int, default=1000)
    p.add_argument("--finetune", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--finetune-optimizer", default="adamw", choices=("sgd", "adamw"))
    p.add_argument("--factorize-stem", action="store_true",
                   help="part 4 factorizes the stem conv too")
    p.add_argument("--finetune-size", type=int, default=16000,
                   help="training images of part 4's fine-tuning")
    p.add_argument("--out", type=Path, default=RESULTS / "training.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        torchrun_child(args)
        return
    from rich.console import Console
    from convgap import hardware
    console = Console(width=200)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results, start = {}, time.time()
    if "curve" in args.parts:
        results["curve"] = curve(args, console)
    if "throughput" in args.parts:
        results["throughput"] = throughput(args, console)
    if "data" in args.parts:
        consumed = None
        if "curve" in results:
            consumed = statistics.median(r["images_per_s"] for r in results["curve"]["rows"])
        results["data"] = data_rate(args, console, consumed)
    if "factorize" in args.parts:
        weights = args.out.parent / "training_resnet18.pt"
        if not weights.exists():
            console.print("[yellow]factorize needs part 1's trained weights: run with "
                          "--parts curve first[/yellow]")
        else:
            results["factorize"] = factorize_part(args, console, weights)
    if "torchrun" in args.parts:
        results["torchrun"] = torchrun_part(args, console)
    cpu = hardware.device_name("cpu")
    console.print(f"{cpu}, {args.threads} threads, fp32, {SIZE}x{SIZE}, batch {args.batch}")
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    merged = {**previous.get("results", {}), **results}
    args.out.write_text(json.dumps({
        "benchmark": "training", "cpu": cpu, "threads": args.threads, "batch": args.batch,
        "image_size": SIZE, "classes": CLASSES, "torch": torch.__version__,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": time.time() - start, "results": merged}, indent=1, default=str))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
