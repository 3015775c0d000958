"""Benchmark (GPU): the fused Triton block kernels (convgap.kernels.triton.blocks) against
the layer-wise torch reference, at the zoo's block shapes.

Blocks: every distinct inverted residual of mobilenet_v2 and every ConvFirst stage (56, 28,
14 and 7 pixels square), with the shapes read off the zoo models at 224x224 (forward
pre-hooks on their blocks). Batch norm is taken as folded: random weights and biases, the
block's activations (ReLU6; SiLU). For each dtype and shape, timed with CUDA events
(``triton.testing.do_bench``, median; no Python dispatch in the number):
- torch: the layer-wise block as eager PyTorch runs it with folded batch norm: F.conv2d
  (cuDNN) on channels_last inputs and weights, in-place activations and residual add;
- fused: the one Triton kernel (autotuned at its first call, not timed), weights stored in
  the layouts the kernels read fastest.
Each fused output is checked against the torch one first (relative error). Efficiency is
the block's useful FLOPs (multiply-adds x 2 of its convolutions) / time / peak, the peak
from ``convgap.hardware.roofs("cuda", dtype)`` (measured GEMM rate, cached), else the H200
datasheet's dense rates (:data:`H200_PEAK`); with ``--tf32`` float32 uses the datasheet's
TF32 rate.

    python benchmarks/gpu_blocks.py [--batch 32] [--dtypes float32 bfloat16 float16]
        [--blocks inverted_residual convfirst] [--tf32] [--out FILE]

Then whole zoo models (``--models``, at ``--model-dtypes``): eager PyTorch (channels_last,
cuDNN) against ``convgap.fuse(net, x)`` (each block verified and kept only where it
measures faster on this device), timed in interleaved rounds (``convgap.timing.compare``,
wall time per call, synchronized), with the fused model's error.

Needs a CUDA GPU (exits with a message otherwise). Prints a table and writes
benchmarks/results/gpu_blocks_cuda.json after every shape (a cut run keeps its rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
# NVIDIA H200 SXM datasheet, dense (no sparsity), FLOP/s
H200_PEAK = {"float32": 67e12, "tf32": 494.5e12, "bfloat16": 989.5e12, "float16": 989.5e12}


def zoo_shapes(model_name: str, kind: str) -> list[dict]:
    """The distinct blocks of ``kind`` in the zoo model at a 1x3x224x224 input, in order:
    inverted residuals as {C, R (None: no expansion), O, k, stride, H, residual}, ConvFirst
    blocks as {C, E, GW, k, H}."""
    from convgap import models
    model = models.create(model_name).eval()
    found: list[dict] = []

    def hook(block, args):
        x = args[0]
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        if kind == "inverted_residual":
            dw = next(m for m in convs if m.groups > 1)
            shape = {"C": x.shape[1], "R": dw.in_channels if len(convs) == 3 else None,
                     "O": convs[-1].out_channels, "k": dw.kernel_size[0],
                     "stride": dw.stride[0], "H": x.shape[2],
                     "residual": bool(block.use_res_connect)}
        else:
            shape = {"C": x.shape[1], "E": convs[1].out_channels,
                     "GW": convs[0].in_channels // convs[0].groups,
                     "k": convs[0].kernel_size[0], "H": x.shape[2]}
        if shape not in found:
            found.append(shape)
    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if getattr(m, "block_kind", None) == kind]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for h in handles:
        h.remove()
    return found


def fast(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """``t``'s values stored with its dims laid out in ``order`` (last fastest), same shape:
    how the kernels read a weight best."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return t.permute(order).contiguous().permute(inverse)


def inverted_residual_case(s: dict, n: int, dtype: torch.dtype):
    """(torch reference, fused call, useful FLOPs, name) of one inverted residual."""
    from convgap.kernels.triton import blocks
    c, o, k, st, h = s["C"], s["O"], s["k"], s["stride"], s["H"]
    r, pad, dev = s["R"] or c, k // 2, "cuda"
    x = torch.randn(n, c, h, h, device=dev).to(dtype).contiguous(
        memory_format=torch.channels_last)
    a = (torch.randn(c, r, device=dev) / c ** 0.5).to(dtype) if s["R"] else None
    bias1 = torch.randn(r, device=dev).to(dtype) if s["R"] else None
    d = (torch.randn(r, k, k, device=dev) / k).to(dtype)
    b = (torch.randn(o, r, device=dev) / r ** 0.5).to(dtype)
    bias2, bias = torch.randn(r, device=dev).to(dtype), torch.randn(o, device=dev).to(dtype)
    cl = torch.channels_last
    a4 = None if a is None else a.t()[..., None, None].contiguous(memory_format=cl)
    d4, b4 = d[:, None].contiguous(memory_format=cl), b[..., None, None].contiguous(
        memory_format=cl)

    def reference():
        t = x if a4 is None else F.relu6(F.conv2d(x, a4, bias1), inplace=True)
        u = F.relu6(F.conv2d(t, d4, bias2, st, pad, groups=r), inplace=True)
        y = F.conv2d(u, b4, bias)
        return y.add_(x) if s["residual"] else y

    d_fast, b_fast = fast(d, (1, 2, 0)), fast(b, (1, 0))

    def fused():
        return blocks.inverted_residual(x, a, bias1, d_fast, bias2, b_fast, bias, stride=st,
                                        padding=pad, act="relu6", residual=s["residual"])
    oh = (h + 2 * pad - k) // st + 1
    flops = 2 * n * (h * h * c * r * bool(s["R"]) + oh * oh * r * (k * k + o))
    name = (f"IR {c}-{s['R'] or '-'}-{o} k{k} s{st} @{h}" + (" +x" if s["residual"] else ""))
    return reference, fused, flops, name, {}


def convfirst_case(s: dict, n: int, dtype: torch.dtype):
    """(torch reference, fused call, useful FLOPs, name, parts) of one ConvFirst block;
    parts: the fused block with convgap's Triton grouped conv instead of cuDNN's, the fused
    call's two launches alone (the grouped conv on cuDNN, and in Triton; the pointwise MLP
    kernel) and the layer-wise 1x1 pair the MLP kernel replaces."""
    from convgap.kernels.triton import blocks
    c, e, gw, k, h, dev = s["C"], s["E"], s["GW"], s["k"], s["H"], "cuda"
    x = torch.randn(n, c, h, h, device=dev).to(dtype).contiguous(
        memory_format=torch.channels_last)
    w1 = (torch.randn(c, gw, k, k, device=dev) / (k * gw ** 0.5)).to(dtype)
    w2 = (torch.randn(e, c, device=dev) / c ** 0.5).to(dtype)
    w3 = (torch.randn(c, e, device=dev) / e ** 0.5).to(dtype)
    bias1, bias2, bias3 = (torch.randn(m, device=dev).to(dtype) for m in (c, e, c))
    cl = torch.channels_last
    w1c = w1.contiguous(memory_format=cl)
    w2c, w3c = (w[..., None, None].contiguous(memory_format=cl) for w in (w2, w3))

    def grouped():
        return F.conv2d(x, w1c, bias1, padding=k // 2, groups=c // gw)

    def pair(u):
        t = F.silu(F.conv2d(u, w2c, bias2), inplace=True)
        return F.conv2d(t, w3c, bias3).add_(x)

    def reference():
        return pair(grouped())

    def fused():
        return blocks.convfirst(x, w1, bias1, w2, bias2, w3, bias3, act="silu")
    from convgap.kernels.triton import grouped as tg
    w1bd = tg.block_diagonal(w1)

    def fused_triton_gconv():
        return blocks.convfirst(x, w1, bias1, w2, bias2, w3, bias3, act="silu",
                                w1_diagonal=w1bd)
    u = grouped()
    parts = {"whole: fused, Triton grouped conv": fused_triton_gconv,
             "grouped conv (cuDNN)": grouped,
             "grouped conv (Triton)": lambda: tg.grouped_conv(x, w1bd, bias1, (k, k)),
             "1x1 pair, layer-wise": lambda: pair(u),
             "1x1 pair, pointwise_mlp": lambda: blocks.pointwise_mlp(u, w2, bias2, w3, bias3,
                                                                     x, act="silu")}
    flops = 2 * n * h * h * c * (gw * k * k + 2 * e)
    return reference, fused, flops, f"ConvFirst {c}-{e}-{c} g{gw} @{h}", parts


def peak(dtype_name: str, tf32: bool) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for a dtype."""
    if dtype_name == "float32" and tf32:
        return H200_PEAK["tf32"], "H200 datasheet TF32, dense"
    try:
        from convgap.hardware import roofs
        return roofs("cuda", getattr(torch, dtype_name)).peak_flops, \
            "convgap.hardware.roofs (measured GEMM)"
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to the datasheet
        return H200_PEAK[dtype_name], f"H200 datasheet, dense ({type(exc).__name__})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"],
                    choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--blocks", nargs="+", default=["inverted_residual", "convfirst"],
                    choices=("inverted_residual", "convfirst"))
    ap.add_argument("--models", nargs="*", default=["convfirst", "mobilenet_v2",
                                                    "efficientnet_b0"])
    ap.add_argument("--model-dtypes", nargs="*", default=["bfloat16"],
                    choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--tf32", action="store_true",
                    help="float32 products in TF32 on both sides (default: IEEE float32)")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_blocks_cuda.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_blocks.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "the kernels' CPU checks are tests/test_triton_blocks.py")
    import triton
    from triton.testing import do_bench

    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # the kernels follow this switch
    torch.backends.cudnn.allow_tf32 = args.tf32
    cases = {"inverted_residual": (inverted_residual_case, zoo_shapes("mobilenet_v2",
                                                                      "inverted_residual")),
             "convfirst": (convfirst_case, zoo_shapes("convfirst", "convfirst"))}
    start, rows, peaks = time.time(), [], {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        peaks[dtype_name] = peak(dtype_name, args.tf32)
        top = peaks[dtype_name][0]
        print(f"{dtype_name}: peak {top / 1e12:.0f} TFLOP/s ({peaks[dtype_name][1]})",
              flush=True)
        for block in args.blocks:
            make, shapes = cases[block]
            for shape in shapes:
                torch.manual_seed(0)
                reference, fused, flops, name, parts = make(shape, args.batch, dtype)
                row = {"block": name, "dtype": dtype_name, "shape": shape,
                       "gflop": flops / 1e9}
                try:
                    ref = reference()
                    y = fused()  # autotunes
                    row["rel_err"] = float((y.float() - ref.float()).abs().max()
                                           / ref.float().abs().max())
                    row["ms"] = {"torch": do_bench(reference, return_mode="median"),
                                 "fused": do_bench(fused, return_mode="median")}
                    row["efficiency"] = {k: flops / (t * 1e-3) / top
                                         for k, t in row["ms"].items()}
                    row["speedup"] = row["ms"]["torch"] / row["ms"]["fused"]
                    row["parts_ms"], row["parts_err"] = {}, {}
                    for k, f in parts.items():  # each checked where it computes the block
                        if k.startswith("whole"):
                            row["parts_err"][k] = float((f().float() - ref.float()).abs().max()
                                                        / ref.float().abs().max())
                        row["parts_ms"][k] = do_bench(f, return_mode="median")
                except Exception as exc:  # noqa: BLE001 - record it, go on with the next
                    row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                rows.append(row)
                print(summary(row), flush=True)
                write(args, rows, peaks, start, triton, [])
    models = []
    for dtype_name in args.model_dtypes:
        for name in args.models:
            models.append(whole_model(name, args.batch, getattr(torch, dtype_name)))
            print(model_summary(models[-1]), flush=True)
            write(args, rows, peaks, start, triton, models)
    print(f"\nms = CUDA events, median; eff = useful FLOPs / time / peak; batch {args.batch}")
    for row in rows:
        print(summary(row))
    for row in models:
        print(model_summary(row))
    print(f"wrote {args.out}")


def whole_model(name: str, n: int, dtype: torch.dtype) -> dict:
    """A zoo model eager against ``convgap.fuse`` of it, on CUDA at ``dtype``: wall time
    per call, synchronized, interleaved rounds; speedup = 1 / the median paired ratio."""
    import warnings

    from convgap import changes, fuse, models, timing
    row = {"model": name, "dtype": str(dtype).removeprefix("torch."), "batch": n}
    try:
        torch.manual_seed(0)
        cl = torch.channels_last
        net = models.create(name).eval().to("cuda", dtype, memory_format=cl)
        x = torch.randn(n, 3, 224, 224, device="cuda").to(dtype).contiguous(memory_format=cl)
        t0 = time.time()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = fuse(net, x, quiet=True)
            row["fuse_s"] = time.time() - t0
            ref, y = net(x).float(), fused(x).float()
            row["rel_err"] = float((y - ref).abs().max() / ref.abs().max())
            # interleaved rounds (convgap.timing.compare), not one do_bench after the
            # other: back to back, whichever ran first measured up to 1.5x slower on an
            # H200 (clocks rising from idle), models computing the same kernels included
            cfg = timing.TimingConfig(warmup=5, min_repeats=30, max_repeats=300,
                                      min_time=0.5)
            eager, fast = timing.compare([lambda: net(x), lambda: fused(x)], cfg, "cuda")
        row["ms"] = {"eager": eager.median_ms, "fused": fast.median_ms}
        row["speedup"] = 1.0 / timing.paired_ratio(fast, eager)
        row["blocks"] = [{"name": c.name, "transform": c.transform, "runs": c.runs,
                          "reason": getattr(c, "reason", None)}
                         for c in changes(fused) if c.transform in ("fuse", "left")
                         and (c.transform == "left" or c.runs)]
        row["fused_blocks"] = sum(type(m).__name__.startswith("Fused")
                                  for m in fused.modules())
    except Exception as exc:  # noqa: BLE001 - record it, go on with the next
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return row


def model_summary(row: dict) -> str:
    head = f"{row['dtype']:9s} {row['model']:16s} b{row['batch']}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    return (f"{head} eager {row['ms']['eager']:.3f} ms  fuse {row['ms']['fused']:.3f} ms  "
            f"x{row['speedup']:.2f}  ({row['fused_blocks']} fused modules, fuse took "
            f"{row['fuse_s']:.0f} s)  err {row['rel_err']:.1e}")


def summary(row: dict) -> str:
    head = f"{row['dtype']:9s} {row['block']:34s}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    ms, eff = row["ms"], row["efficiency"]
    parts = "".join(f"\n    {k}: {v:.4f} ms" for k, v in row.get("parts_ms", {}).items())
    return (f"{head} torch {ms['torch']:.4f} ms ({eff['torch']:6.1%})  fused "
            f"{ms['fused']:.4f} ms ({eff['fused']:6.1%})  x{row['speedup']:.2f}  "
            f"err {row['rel_err']:.1e}{parts}")


def write(args, rows, peaks, start, triton, models) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "gpu_blocks", "batch": args.batch, "tf32": args.tf32,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "seconds": time.time() - start,
        "peak_flops": {k: {"value": v, "source": s} for k, (v, s) in peaks.items()},
        "rows": rows, "models": models}, indent=1))


if __name__ == "__main__":
    main()
