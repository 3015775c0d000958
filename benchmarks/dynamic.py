"""Benchmark: dynamic networks (issue 20), sparse execution against the static blocks, and
trained dynamic models against the static model.

Parts:

1. **kernels** -- a resnet50 stage-2 and stage-3 bottleneck and a mobilenet_v2 inverted
   residual (their real inputs at 224x224), spatial masks forced at densities 1.0 / 0.75 /
   0.5 / 0.25 / 0.1 and granularities 1 / 2 / 4 / 7, batch 1 and 8, NCHW and
   channels-last: sparse ms, masked ms (dense times the mask), the static block (eager) and
   the block fused by ``convgap.fuse`` where that measured faster; sparse / fastest static
   as the median of per-round paired ratios (all candidates of one block, batch and layout
   in one interleaved run), and the MAC ratio (MACs at the masks / dense, halo included).
2. **e2e** -- a zoo ResNet trained static on ``shapes`` at 128x128, then made dynamic
   (spatial, channel, layer) at targets 0.5 and 0.3 and trained with distillation from it
   under the latency budget: validation top-1, mean density, latency at batch 1 and 8
   against the static model in its fastest convgap form (fused where faster), paired.

Prints the tables and writes benchmarks/results/dynamic.json (``--out``), with the CPU,
threads and batch sizes::

    python benchmarks/dynamic.py [--parts kernels e2e] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

RESULTS = Path(__file__).parent / "results"
PARTS = ("kernels", "e2e")
DENSITIES = (1.0, 0.75, 0.5, 0.25, 0.1)
GRANULARITIES = (1, 2, 4, 7)
TIMED_IMAGES = 16   # validation images per timed call of the end-to-end part
# the best granularity of a density is chosen among those keeping within this of it (a
# 2 x 2 grid keeps 0 tiles at density 0.1)
MAX_DENSITY_GAP = 0.05


def find_blocks():
    """(label, model, block name, input shape at batch 1) of the three kernel-level blocks."""
    from convgap import models
    from convgap.dynamic import make_dynamic, dynamic_blocks
    from convgap.transforms.eligible import first_inputs
    out = []
    for model_name, wanted in (("resnet50", {"layer2.1": "resnet50 stage 2",
                                             "layer3.1": "resnet50 stage 3"}),
                               ("mobilenet_v2", None)):
        net = models.create(model_name).eval()
        dyn = make_dynamic(net, "spatial", granularity=1, check=False, quiet=True)
        blocks = dynamic_blocks(dyn)
        with torch.no_grad():
            inputs, _ = first_inputs({b: n for n, b in blocks.items()},
                                     lambda: dyn(torch.randn(1, 3, 224, 224)))
        if wanted is None:   # mobilenet_v2: the first residual block at 28x28
            name = next(n for n, a in inputs.items() if a[0].shape[-1] == 28)
            wanted = {name: f"mobilenet_v2 {name}"}
        for name, label in wanted.items():
            out.append((label, net, name, tuple(inputs[name][0].shape)))
    return out


def kernels(args, console) -> list[dict]:
    from rich.table import Table
    from convgap import fuse, timing
    from convgap.dynamic import dynamic_blocks, make_dynamic
    cfg = timing.TimingConfig(warmup=2, min_repeats=args.repeats, max_repeats=60,
                              min_time=args.min_time)
    rows = []
    for label, net, name, shape in find_blocks():
        for batch in args.batch:
            for layout in ("nchw", "channels_last"):
                fmt = torch.channels_last if layout == "channels_last" else \
                    torch.contiguous_format
                torch.manual_seed(0)
                x = torch.randn(batch, *shape[1:]).contiguous(memory_format=fmt)
                static = copy.deepcopy(net.get_submodule(name)).eval().to(memory_format=fmt)
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fused = fuse(nn.Sequential(static).eval(), x, quiet=True)
                variants = {}
                for g in GRANULARITIES:
                    if g > shape[-1]:
                        continue
                    dyn = make_dynamic(net, "spatial", granularity=g, layers=[name],
                                       check=False, quiet=True)
                    b = dynamic_blocks(dyn)[name].to(memory_format=fmt)
                    variants[g] = b
                fns = [lambda: static(x), lambda: fused(x)]
                keys = []
                for g, b in variants.items():
                    for d in DENSITIES:
                        def run(b=b, d=d):
                            b.masker.force(d, seed=0)
                            return b(x)
                        fns.append(run)
                        keys.append((g, d))

                def run_masked(b=variants[GRANULARITIES[0]]):
                    b.masker.force(0.5, seed=0)
                    return b.masked(x, b.mask(x))
                fns.append(run_masked)
                with torch.no_grad():
                    res = timing.compare(fns, cfg)
                    st, fu, ma = res[0], res[1], res[-1]
                    fastest = st if st.median <= fu.median else fu
                    for (g, d), r in zip(keys, res[2:-1]):
                        b = variants[g]
                        b.masker.force(d, seed=0)
                        b(x)
                        macs, dense = b.cost_macs()
                        kept = float(b.density().mean())   # whole tiles: near d, or not
                        rows.append({
                            "block": label, "batch": batch, "layout": layout,
                            "granularity": g, "density": d, "kept_density": kept,
                            "mac_ratio": float(macs) / float(dense),
                            "sparse_ms": r.median_ms, "masked_ms": ma.median_ms,
                            "static_ms": st.median_ms, "fused_ms": fu.median_ms,
                            "fastest_static": "fused" if fastest is fu else "eager",
                            "ratio": timing.paired_ratio(r, fastest)})
                console.print(f"{label} batch {batch} {layout}: static {st.median_ms:.3f} ms, "
                              f"fused {fu.median_ms:.3f} ms, masked {ma.median_ms:.3f} ms")
    t = Table(title="sparse block / fastest static block (paired; ms)")
    for c in ("block", "batch", "layout", "S", "density", "kept", "MACs", "sparse",
              "static", "fused", "ratio"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["block"], str(r["batch"]), r["layout"], str(r["granularity"]),
                  f"{r['density']:.2f}", f"{r['kept_density']:.2f}", f"{r['mac_ratio']:.2f}",
                  f"{r['sparse_ms']:.3f}",
                  f"{r['static_ms']:.3f}", f"{r['fused_ms']:.3f}", f"{r['ratio']:.2f}")
    console.print(t)
    best = Table(title="best granularity per block, batch, layout and density "
                       "(targets: <= 0.55 at 0.5, <= 0.30 at 0.25)")
    for c in ("block", "batch", "layout", "density", "best S", "ratio"):
        best.add_column(c, justify="right")
    groups: dict = {}
    for r in rows:   # granularities whose grid cannot hold the density are left out
        if abs(r["kept_density"] - r["density"]) <= MAX_DENSITY_GAP:
            groups.setdefault((r["block"], r["batch"], r["layout"], r["density"]),
                              []).append(r)
    for (blk, batch, layout, d), rs in groups.items():
        r = min(rs, key=lambda r: r["ratio"])
        best.add_row(blk, str(batch), layout, f"{d:.2f}", str(r["granularity"]),
                     f"{r['ratio']:.2f}")
    console.print(best)
    return rows


def latency(static: nn.Module, dyn: nn.Module, val_set, batch: int) -> dict:
    """ms per batch of ``batch`` validation images (the maskers decide from what they see:
    noise would give other masks; one timed call runs TIMED_IMAGES of them) of the static
    model eager and fused, and of the dynamic model as it is and fused (``convgap.fuse``
    folds and fuses what lies outside its dynamic blocks), each in both layouts, all
    interleaved; the ratio of the dynamic model's fastest form to the static model's,
    paired."""
    from convgap import fuse, timing
    cl = torch.channels_last
    xs = [torch.stack([val_set[i][0] for i in range(j, j + batch)])
          for j in range(0, TIMED_IMAGES, batch)]
    xs_cl = [x.contiguous(memory_format=cl) for x in xs]
    static_cl = copy.deepcopy(static).to(memory_format=cl)
    dyn_cl = copy.deepcopy(dyn).to(memory_format=cl)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forms = {"static": (static, xs), "fused": (fuse(static, xs[0], quiet=True), xs),
                 "static_cl": (static_cl, xs_cl),
                 "fused_cl": (fuse(static_cl, xs_cl[0], quiet=True), xs_cl),
                 "dynamic": (dyn, xs), "dynamic_cl": (dyn_cl, xs_cl),
                 "dynamic_fused": (fuse(dyn, xs[0], quiet=True), xs),
                 "dynamic_fused_cl": (fuse(dyn_cl, xs_cl[0], quiet=True), xs_cl)}
        r = timing.compare([lambda m=m, xs=xs: [m(x) for x in xs] for m, xs in forms.values()],
                           timing.TimingConfig(warmup=2, min_repeats=7, max_repeats=30,
                                               min_time=0.5))
    ms = {name: t.median_ms / len(xs) for name, t in zip(forms, r)}
    res = dict(zip(forms, r))
    best_static = min(("static", "fused", "static_cl", "fused_cl"), key=ms.get)
    best_dyn = min(("dynamic", "dynamic_cl", "dynamic_fused", "dynamic_fused_cl"), key=ms.get)
    return {**{f"{k}_ms": v for k, v in ms.items()}, "best_static": best_static,
            "best_dynamic": best_dyn, "fastest_static_ms": ms[best_static],
            "fastest_dynamic_ms": ms[best_dyn],
            "ratio": timing.paired_ratio(res[best_dyn], res[best_static])}


def e2e(args, console) -> dict:
    from rich.table import Table
    from convgap import data, models, train
    from convgap.dynamic import dynamic_blocks, make_dynamic, train_dynamic
    size = args.image_size
    train_set, val_set = data.shapes(args.classes, size, args.train_size, args.val_size, 0,
                                     transform=data.augment(), cache=True)
    weights = RESULTS / f"dynamic_static_{args.model}_{size}.pt"
    torch.manual_seed(0)
    static = models.create(args.model, num_classes=args.classes)
    if weights.exists():
        static.load_state_dict(torch.load(weights, weights_only=True))
        console.print(f"static weights from {weights}")
    else:
        lr = 2e-3
        if args.init is not None:  # trained at another size: a shorter, gentler fine-tune
            static.load_state_dict(torch.load(args.init, weights_only=True))
            console.print(f"static starts from {args.init}")
            lr = 1e-3
        t0 = time.perf_counter()
        hist = train.fit(static, train_set, val_set, epochs=args.static_epochs,
                         batch_size=args.batch_size, lr=lr, optimizer="adamw", warmup=1,
                         quiet=args.quiet)
        console.print(f"static: {hist.epochs[-1].val_top1:.3f} top-1 after "
                      f"{args.static_epochs} epochs ({time.perf_counter() - t0:.0f} s)")
        torch.save(static.state_dict(), weights)
    static.eval()
    results = []
    earlier = {(r["mode"], r["target"]): r for r in
               json.loads(args.out.read_text()).get("e2e", {}).get("rows", [])
               } if args.out.exists() else {}
    for mode, target in args.variants:
        saved = RESULTS / f"dynamic_{args.model}_{size}_{mode}_{target}.pt"
        if args.remeasure:   # the trained model again, its latency measured anew
            row = earlier[(mode, target)]
            # the zoo's ResNets: a stage's first block is its "*.0"
            per_stage = [v for n, v in row["granularity"].items() if n.endswith(".0")]
            dyn = make_dynamic(copy.deepcopy(static), mode,
                               granularity=per_stage if mode == "spatial" else 1,
                               check=False, quiet=True)
            dyn.load_state_dict(torch.load(saved, weights_only=True))
            dyn.eval()
            row["latency"] = {b: latency(static, dyn, val_set, b) for b in args.batch}
            results.append(row)
            console.print(f"{mode} {target} (remeasured): " + ", ".join(
                f"b{b} {v['ratio']:.2f}x" for b, v in row["latency"].items()))
            continue
        t0 = time.perf_counter()
        res = train_dynamic(static, train_set, val_set, epochs=args.epochs, mode=mode,
                            target=target, batch_size=args.batch_size, quiet=args.quiet,
                            granularity=args.granularity)
        dyn = res.model.eval()
        lat = {}
        for batch in args.batch:
            lat[batch] = latency(static, dyn, val_set, batch)
        # to measure again (--remeasure): make_dynamic(static, mode, granularity=the row's)
        # + these weights
        torch.save(dyn.state_dict(), saved)
        row = {"mode": mode, "target": target, "epochs": args.epochs,
               "granularity": {n: b.granularity() for n, b in dynamic_blocks(dyn).items()},
               "static_top1": res.static.top1,
               "dynamic_top1": res.dynamic.top1, "mean_density": res.mean_density,
               "density": res.density, "latency": lat,
               "train_s": time.perf_counter() - t0,
               "history": [vars(e) for e in res.history.epochs]}
        results.append(row)
        console.print(f"{mode} {target}: top-1 {res.static.top1:.3f} -> "
                      f"{res.dynamic.top1:.3f}, density {res.mean_density:.2f}, "
                      + ", ".join(f"b{b} {v['ratio']:.2f}x" for b, v in lat.items()))
    t = Table(title=f"{args.model} on shapes {size}x{size}: dynamic against static "
                    f"(fastest convgap form), latency paired")
    for c in ("mode", "target", "top-1 static", "top-1 dynamic", "density",
              *[f"b{b} static ms" for b in args.batch], *[f"b{b} dynamic ms" for b in args.batch],
              *[f"b{b} ratio" for b in args.batch]):
        t.add_column(c, justify="right")
    for r in results:
        lat = r["latency"]
        t.add_row(r["mode"], f"{r['target']}", f"{r['static_top1']:.3f}",
                  f"{r['dynamic_top1']:.3f}", f"{r['mean_density']:.2f}",
                  *[f"{lat[b]['fastest_static_ms']:.2f}" for b in args.batch],
                  *[f"{lat[b]['fastest_dynamic_ms']:.2f}" for b in args.batch],
                  *[f"{lat[b]['ratio']:.2f}" for b in args.batch])
    console.print(t)
    return {"model": args.model, "image_size": size, "train_size": args.train_size,
            "val_size": args.val_size, "static_epochs": args.static_epochs,
            "epochs": args.epochs, "rows": results}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.05)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--static-epochs", type=int, default=8)
    p.add_argument("--init", type=Path, default=None,
                   help="static weights to start the static training from (e.g. the same "
                        "model trained at another image size by benchmarks/training.py)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--granularity", default="auto")
    p.add_argument("--variants", nargs="*", default=["spatial:0.5", "spatial:0.3",
                                                     "channel:0.5", "layer:0.5"],
                   help="mode:target pairs of part 2")
    p.add_argument("--remeasure", action="store_true",
                   help="e2e: measure the latency of the variants trained earlier (their "
                        "weights in results/, their rows in --out) instead of training")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "dynamic.json")
    args = p.parse_args(argv)
    args.variants = [(v.split(":")[0], float(v.split(":")[1])) for v in args.variants]
    if args.granularity != "auto":
        args.granularity = int(args.granularity)
    return args


def main() -> None:
    from rich.console import Console
    from convgap import hardware
    args = parse()
    torch.set_num_threads(args.threads)
    console = Console(width=200, force_terminal=False)
    cpu = hardware.device_name("cpu")
    console.print(f"{cpu}, {args.threads} threads, fp32, batch {args.batch}")
    out = {"benchmark": "dynamic", "cpu": cpu, "threads": args.threads,
           "batches": args.batch, "torch": torch.__version__}
    if args.out.exists():
        out = {**json.loads(args.out.read_text()), **out}
    if "kernels" in args.parts:
        out["kernels"] = kernels(args, console)
        args.out.write_text(json.dumps(out, indent=1))
    if "e2e" in args.parts:
        new = e2e(args, console)
        old = out.get("e2e", {})
        if (old.get("model"), old.get("image_size")) == (new["model"], new["image_size"]):
            # rows of other variants (or epochs) from an earlier run of the same model kept
            keys = {(r["mode"], r["target"]) for r in new["rows"]}
            new["rows"] = [r for r in old["rows"] if (r["mode"], r["target"]) not in keys
                           ] + new["rows"]
        out["e2e"] = new
        args.out.write_text(json.dumps(out, indent=1))
    console.print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
