"""Benchmark (GPU): issue 20's kernel table on a CUDA device -- the sparse spatial blocks
against the same blocks run dense.

Blocks: benchmarks/dynamic.py's three (a resnet50 stage-2 and stage-3 bottleneck, the
mobilenet_v2 inverted residual at 28x28), their real inputs' shapes at 224x224, float32,
channels_last, batch ``--batch``. Per block, granularity (``--granularities``, default 2, 4,
7), sparse kernel (``--kernels``: ``convgap.config.SPARSE_CUDA``'s 'triton', the Triton tile
kernels over the kept tiles' index list, and 'gather', the kept pixels' rows through
cuBLAS) and density (``--densities``, default 1.0, 0.75, 0.5, 0.25, 0.1; masks forced,
seeded): the dynamic block in sparse execution (the shortcut, the mask, the sparse body,
the activation after the add), the static block eager (cuDNN) and fused (``convgap.fuse``:
the inverted residual's one Triton kernel where that measures faster) and the dynamic
block's dense body times the mask ('masked'), all of one block in one interleaved run
(``convgap.timing.compare``: wall time per call, synchronized, host overhead included: the
sparse block reads its mask's index list back); ratio = the median of per-round ratios of
sparse over the fastest static form. Each sparse output is checked against the masked
execution first.

    python benchmarks/gpu_dynamic.py [--batch 8 32] [--granularities 2 4 7]
        [--densities ...] [--kernels triton gather] [--device cuda] [--out FILE]

On CUDA the Triton rows are timed a second time captured in CUDA graphs
(``convgap.timing.compare_graphs``: device time, no host dispatch) beside the static block
and the masked body captured the same way: the regime of a whole dynamic model replayed as
one graph, which the tile kernels allow (they read nothing back to the host). ``--tf32``
(default on, torch's default for convolutions) sets TF32 for cuDNN and the Triton kernels
alike.

``--device cpu`` runs the same table on the CPU's tile kernel (a check of the plumbing; the
Triton kernels themselves are checked interpreted by tests/test_triton_tiles.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
from dynamic import DENSITIES, MAX_DENSITY_GAP, RESULTS, find_blocks  # noqa: E402

GRANULARITIES = (2, 4, 7)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def run_block(label, net, name, shape, batch, device, cfg, granularities, kernels,
              densities) -> list[dict]:
    from convgap import config, fuse, timing
    from convgap.dynamic import dynamic_blocks, make_dynamic
    cl = torch.channels_last
    torch.manual_seed(0)
    x = torch.randn(batch, *shape[1:]).to(device).contiguous(memory_format=cl)
    static = copy.deepcopy(net.get_submodule(name)).eval().to(device, memory_format=cl)
    fused = static
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fused = fuse(nn.Sequential(static).eval(), x, quiet=True)
        except Exception as exc:  # noqa: BLE001 - the table keeps the eager block
            print(f"  fuse failed on {device}: {exc}")
    variants = {}
    for g in granularities:
        if g > shape[-1]:
            continue
        dyn = make_dynamic(net, "spatial", granularity=g, layers=[name], check=False,
                           quiet=True)
        variants[g] = dynamic_blocks(dyn)[name].to(device, memory_format=cl).eval()
    first = next(iter(variants.values()))

    def masked():
        first.masker.force(1.0, seed=0)
        return first.masked(x, first.mask(x))
    fns, keys, rows = [lambda: static(x), lambda: fused(x), masked], [], []
    with torch.no_grad():
        for g, b in variants.items():
            for kernel in kernels:
                config.SPARSE_CUDA = kernel
                for d in densities:
                    b.masker.force(d, seed=0)
                    m = b.mask(x)
                    err = _rel(b.sparse(x, m), b.masked(x, m))
                    fns.append(lambda b=b, d=d, k=kernel: (
                        setattr(config, "SPARSE_CUDA", k), b.masker.force(d, seed=0), b(x)))
                    keys.append((g, kernel, d, err, float(m.float().mean())))
        res = timing.compare(fns, cfg, device)
        graphed = (graph_times(fns, keys, cfg, device)
                   if device.type == "cuda" and "triton" in kernels else {})
    st, fu, ma = res[0], res[1], res[2]
    fastest = st if st.median <= fu.median else fu
    for (g, kernel, d, err, kept), r in zip(keys, res[3:]):
        b = variants[g]
        b.masker.force(d, seed=0)
        with torch.no_grad():
            macs, dense = b.cost_macs(b.mask(x), tuple(x.shape[-2:]))
        rows.append({"block": label, "batch": batch, "granularity": g, "kernel": kernel,
                     "density": d, "kept_density": kept,
                     "mac_ratio": float(macs) / float(dense),
                     "sparse_ms": r.median_ms, "static_ms": st.median_ms,
                     "fused_ms": fu.median_ms, "masked_ms": ma.median_ms,
                     "fastest_static": "fused" if fastest is fu else "eager",
                     "ratio": timing.paired_ratio(r, fastest), "error": err,
                     **graphed.get((g, kernel, d), {})})
    print(f"{label} batch {batch}: static {st.median_ms:.3f} ms, fused {fu.median_ms:.3f} "
          f"ms, masked {ma.median_ms:.3f} ms")
    return rows


def graph_times(fns, keys, cfg, device) -> dict:
    """CUDA-graph device times of the static block (eager and fused), the masked body and
    every Triton sparse row (the gather rows read their index lists back and cannot be
    captured): ``{(g, 'triton', d): {graph_sparse_ms, graph_static_ms, graph_ratio}}``, the
    ratio over the faster static form. A static form that cannot be captured is left out."""
    from convgap import timing
    rows = [i for i, k in enumerate(keys) if k[1] == "triton"]
    for static in ([0, 1], [0]):      # eager and fused; eager alone if fused won't capture
        try:
            res = timing.compare_graphs([fns[i] for i in static] + [fns[2]]
                                        + [fns[3 + i] for i in rows], cfg, device, calls=10)
            break
        except RuntimeError as exc:   # e.g. a fused kernel that reads a size back
            print(f"  CUDA graphs with static forms {static}: {exc}")
    else:
        return {}
    fastest = min(res[:len(static)], key=lambda t: t.median)
    out = {}
    for i, r in zip(rows, res[len(static) + 1:]):
        g, kernel, d = keys[i][:3]
        out[(g, kernel, d)] = {"graph_sparse_ms": r.median_ms,
                               "graph_static_ms": fastest.median_ms,
                               "graph_masked_ms": res[len(static)].median_ms,
                               "graph_ratio": timing.paired_ratio(r, fastest)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    p.add_argument("--device", default="cuda")
    p.add_argument("--granularities", type=int, nargs="+", default=list(GRANULARITIES))
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    p.add_argument("--kernels", nargs="+", default=["triton", "gather"],
                   choices=("triton", "gather"), help="config.SPARSE_CUDA values to time")
    p.add_argument("--tf32", choices=("on", "off"), default="on",
                   help="TF32 products in float32 convolutions and matrix products, for "
                        "cuDNN and the Triton kernels alike (on: torch's default for "
                        "convolutions)")
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_dynamic.json")
    args = p.parse_args()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = \
        args.tf32 == "on"
    from convgap import timing
    from convgap.kernels.triton import tiles
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu to check the plumbing")
    if device.type == "cuda" and not tiles.runnable(torch.empty(1, device=device)):
        sys.exit("triton is not available: the sparse tile kernels cannot run")
    cfg = timing.TimingConfig(warmup=3, min_repeats=20, max_repeats=200, min_time=0.2)
    rows, t0 = [], time.time()
    for label, net, name, shape in find_blocks():
        for batch in args.batch:
            rows += run_block(label, net, name, shape, batch, device, cfg,
                              args.granularities, args.kernels, args.densities)
            out = {"benchmark": "gpu_dynamic", "device": str(device),
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else "cpu", "torch": torch.__version__, "tf32": args.tf32, "rows": rows,
                   "seconds": time.time() - t0}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))    # a cut run keeps its rows
    print("block | batch | S | kernel | density | kept | MACs | sparse ms | static ms | "
          "fused ms | masked ms | ratio | error")
    for r in rows:
        print(f"{r['block']} | {r['batch']} | {r['granularity']} | {r['kernel']} | "
              f"{r['density']:.2f} | {r['kept_density']:.2f} | {r['mac_ratio']:.2f} | "
              f"{r['sparse_ms']:.3f} | {r['static_ms']:.3f} | {r['fused_ms']:.3f} | "
              f"{r['masked_ms']:.3f} | {r['ratio']:.2f} | {r['error']:.1e}")
    best: dict = {}
    for r in rows:
        if abs(r["kept_density"] - r["density"]) <= MAX_DENSITY_GAP:
            k = (r["block"], r["batch"], r["kernel"], r["density"])
            if k not in best or r["ratio"] < best[k]["ratio"]:
                best[k] = r
    print("\nbest granularity (targets: <= 0.55 at 0.5, <= 0.30 at 0.25)")
    for (blk, batch, kernel, d), r in best.items():
        print(f"{blk} | b{batch} | {kernel} | d {d:.2f} | S {r['granularity']} | "
              f"{r['ratio']:.2f}")
    graphed = [r for r in rows if "graph_ratio" in r]
    if graphed:
        print("\nCUDA graphs (device time, no host dispatch): block | batch | S | density | "
              "sparse ms | static ms | masked ms | ratio")
        for r in graphed:
            print(f"{r['block']} | {r['batch']} | {r['granularity']} | {r['density']:.2f} | "
                  f"{r['graph_sparse_ms']:.3f} | {r['graph_static_ms']:.3f} | "
                  f"{r['graph_masked_ms']:.3f} | {r['graph_ratio']:.2f}")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
