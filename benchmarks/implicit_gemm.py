"""Benchmark (GPU): the Triton implicit-GEMM convolution against cuDNN, per K-loop variant
and block-config set, on resnet50's convolution shapes.

For each shape (NHWC input and weight, fp16 by default) it times, with CUDA events
(``triton.testing.do_bench``, median; no Python dispatch in the number):
- cuDNN: ``F.conv2d`` on channels_last input and weight (torch's default algorithm choice);
- the implicit-GEMM kernel, autotuned over a config set, with the per-tap K loop and with
  the flat K loop, for the base configs, the Hopper-leaning ones (BLOCK_K 64, deeper
  pipelines, wider tiles) and both (the library's :data:`GPU_CONFIGS`).
Each variant's output is checked against cuDNN first (relative error).

    python benchmarks/implicit_gemm.py [--batch 128] [--dtype float16] [--out FILE]

Prints a table and writes benchmarks/results/implicit_gemm_cuda.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
OLD = None  # --before: an older kernel module
# (C, O, kernel, stride, H): resnet50 convs at 224x224 input
SHAPES = [(64, 64, 3, 1, 56), (128, 128, 3, 1, 28), (256, 256, 3, 1, 14),
          (1024, 256, 1, 1, 14)]

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--out", type=Path, default=RESULTS / "implicit_gemm_cuda.json")
    ap.add_argument("--before", type=Path, default=None,
                    help="an older copy of kernels/triton/implicit_gemm.py to time beside")
    args = ap.parse_args()
    global OLD
    if args.before is not None:
        import importlib.util
        spec_ = importlib.util.spec_from_file_location("old_implicit_gemm", args.before)
        OLD = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(OLD)
    import triton
    from triton.testing import do_bench

    from convgap.algorithms import ConvSpec
    from convgap.kernels.triton import implicit_gemm as ig
    dtype = getattr(torch, args.dtype)
    start = time.time()
    sets = {"library": ig.BASE_CONFIGS, "hopper": ig.HOPPER_CONFIGS, "all": ig.GPU_CONFIGS}
    all_configs = ig.GPU_CONFIGS
    rows = []
    for c, o, k, s, h in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(args.batch, c, h, h, device="cuda").to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(o, c, k, k, device="cuda") / (c * k * k) ** 0.5).to(dtype)
        wc = w.contiguous(memory_format=torch.channels_last)
        pad = k // 2
        spec = ConvSpec(c, o, (k, k), (s, s), (pad, pad), (1, 1), 1, False,
                        tuple(x.shape), args.dtype, "cuda", "channels_last")
        ref = F.conv2d(x, wc, None, s, pad)
        ms = {"cudnn": do_bench(lambda: F.conv2d(x, wc, None, s, pad), return_mode="median")}
        err = {}
        packed = ig.pack_weight(w, 1)
        if OLD is not None:  # the kernel as it was before this change, same configs
            def run_old():
                return OLD.conv2d_implicit_gemm(x, packed, None, spec, flat_k=False)
            y = run_old()
            err["before/per-tap"] = float((y.float() - ref.float()).abs().max()
                                          / ref.float().abs().max())
            ms["before/per-tap"] = do_bench(run_old, return_mode="median")
        for set_name, configs in sets.items():
            ig.GPU_CONFIGS = configs
            ig._KERNELS.clear()  # a fresh autotuner over this set
            for flat in (False, True):
                name = f"{set_name}/{'flat' if flat else 'per-tap'}"

                def run(flat=flat):
                    return ig.conv2d_implicit_gemm(x, packed, None, spec, flat_k=flat)
                y = run()  # autotunes
                err[name] = float((y.float() - ref.float()).abs().max()
                                  / ref.float().abs().max())
                ms[name] = do_bench(run, return_mode="median")
        ig.GPU_CONFIGS = all_configs
        ig._KERNELS.clear()
        flops = 2 * args.batch * o * c * k * k * (h // s) ** 2
        rows.append({"shape": f"{c}->{o} k{k} s{s} @{args.batch}x{c}x{h}x{h}", "ms": ms,
                     "tflops": {n: flops / t / 1e9 for n, t in ms.items()}, "rel_err": err})
        print(rows[-1]["shape"], {n: round(t, 4) for n, t in ms.items()}, flush=True)
        write(args, sets, rows, start, triton)  # after every shape: a cut run keeps its rows
    names = list(rows[0]["ms"])
    print("\nshape | " + " | ".join(names) + "  (ms, CUDA events, median; TFLOP/s below)")
    for r in rows:
        print(r["shape"], "|", " | ".join(f"{r['ms'][n]:.4f}" for n in names))
        print(" " * len(r["shape"]), "|", " | ".join(f"{r['tflops'][n]:.0f}" for n in names))
    worst = max(e for r in rows for e in r["rel_err"].values())
    print(f"worst relative error against cuDNN: {worst:.2e}")
    print(f"wrote {args.out}")


def write(args, sets, rows, start, triton) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "implicit_gemm", "batch": args.batch, "dtype": args.dtype,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "seconds": time.time() - start,
        "configs": {k: [list(c) for c in v] for k, v in sets.items()}, "rows": rows},
        indent=1))


if __name__ == "__main__":
    main()
