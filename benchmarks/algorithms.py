"""Benchmark: per-layer convolution algorithm choice (CPU, or a CUDA GPU with --device cuda).

For resnet50, mobilenet_v2 and convnext_tiny at batch 1 and 8 (224x224, fp32, NCHW input;
``--device``, ``--dtype`` and ``--batch`` change that):
1. swap(model, "auto") in a fresh tuning cache: for every distinct conv spec (and every
   nn.Linear spec: pointwise convolutions on channels-last maps, as in ConvNeXt), each
   algorithm's median time, the choice and its speedup over torch (from the tuner);
2. an independent check: each distinct layer's chosen algorithm, called as the swapped
   AlgoConv2d / AlgoLinear, re-timed against the plain layer it replaced (both through
   Module.__call__), interleaved; the ratio is the median of the per-round
   paired ratios over at least 0.25 s of samples (target: never > 5% slower);
3. whole models, interleaved in one run: eager NCHW, eager channels_last, auto, and
   torch.compile with inductor freezing; each ratio against eager NCHW is the median of
   the per-round paired ratios (this machine drifts 10-15% between minutes: ratios of
   separate medians read a 1.15x win as a 0.91x loss once);
4. with ``--twice``: each model tuned a second time from another empty cache, and both
   tuned models timed in the same interleaved rounds (run 1 / run 2 isolates what the
   choices change from the machine's drift; target within 5%), each against both eager
   layouts (target <= 1.0), and against eager channels_last given the same NCHW input as
   auto (its conversion inside the timed call; the "eager CL" column gets it converted).

On CPU everything runs under one malloc policy (``--malloc``, default 'retain': freed
memory is reused, so nothing page-faults; under glibc's default a layer's time depends on
the heap's history, see convgap.allocator). On CUDA, fp32 runs with torch's defaults
(cuDNN may multiply in TF32, and the implicit-GEMM kernel follows the same switch) unless
``--no-tf32``; every sample is synchronised, so host launch overhead is part of the time.

    python benchmarks/algorithms.py [--threads 2] [--batch 1 8] [--models ...] [--no-compile]
                                    [--malloc retain|default] [--device cuda]
                                    [--dtype float32|float16|bfloat16] [--no-tf32]
                                    [--twice] [--out PATH]

Prints tables and writes benchmarks/results/algorithms.json (algorithms_cuda_<dtype>.json
on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
LAYER_CHECK = None  # set in main (needs convgap.timing)


def distinct_layers(tuned):
    """One (AlgoConv2d, its captured input) per distinct spec key, in forward order."""
    from convgap.algorithms import AlgoConv2d, AlgoLinear
    seen, out, handles = set(), [], []

    def hook(m, args):
        key = m.tuning["spec_key"]
        if key not in seen:
            seen.add(key)
            out.append((m, args[0].detach().clone(memory_format=torch.preserve_format)))
    for m in tuned.modules():
        if isinstance(m, (AlgoConv2d, AlgoLinear)):
            handles.append(m.register_forward_pre_hook(hook))
    return out, handles


def run_model(name, batch, threads, do_compile, console, malloc, device="cpu",
              dtype=torch.float32, twice=False):
    from convgap import models, timing
    from convgap.transforms import swap

    if twice:  # both tunings of each model start from an empty cache
        os.environ["CONVGAP_CACHE"] = tempfile.mkdtemp(prefix="convgap-bench-")
    # the re-check must resolve 5% on layers of 0.1-0.3 ms: many paired samples
    cfg_layer = timing.TimingConfig(warmup=5, min_repeats=30, max_repeats=600, min_time=0.25)
    cfg_model = timing.TimingConfig(warmup=2, min_repeats=15, max_repeats=30, min_time=2.0)
    with timing.threads(threads), torch.no_grad():
        net = models.create(name).eval().to(device=device, dtype=dtype)
        x = torch.randn(batch, 3, 224, 224).to(device=device, dtype=dtype)
        t0 = time.time()
        tuned = swap(net, "auto", x, quiet=True, malloc=malloc)
        tune_s = time.time() - t0
        second = None
        if twice:  # a second tuning from another empty cache, timed beside the first
            os.environ["CONVGAP_CACHE"] = tempfile.mkdtemp(prefix="convgap-bench-")
            second = swap(net, "auto", x, quiet=True, malloc=malloc)
        layers, handles = distinct_layers(tuned)
        tuned(x)
        for h in handles:
            h.remove()
        rows = []
        for m, xin in layers:
            tun = m.tuning
            # what the user had: nn.Conv2d / nn.Linear sharing the parameters
            plain = m.to_linear() if hasattr(m, "to_linear") else m.to_conv2d()
            chosen, ref = timing.compare([lambda: m(xin), lambda: plain(xin)], cfg_layer,
                                         device)
            # paired ratios (the two calls of one round share the machine's state), median
            paired = timing.paired_ratio(chosen, ref)
            rows.append({
                "spec": tun["spec"], "layout": tun["layout"], "times": tun["times"],
                "rejected": tun["rejected"], "errors": tun["errors"], "choice": m.algorithm,
                "speedup_tuner": tun["times"]["torch"] / tun["times"][m.algorithm],
                "recheck_chosen_s": chosen.median, "recheck_torch_s": ref.median,
                "recheck_ratio_of_medians": chosen.median / ref.median,
                "recheck_samples": len(chosen.samples), "recheck_ratio": paired})
        counts = _counts(tuned)
        cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        xcl = x.contiguous(memory_format=torch.channels_last)
        fns = {"eager_nchw": lambda: net(x), "eager_channels_last": lambda: cl(xcl),
               "auto": lambda: tuned(x)}
        if second is not None:
            fns["auto_2"] = lambda: second(x)
            # eager channels_last given the same NCHW input as auto: the conversion inside
            # the timed call, as auto pays it (above, the input arrives converted for free)
            fns["eager_channels_last_nchw_in"] = lambda: cl(x)
        compile_s = None
        if do_compile:
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True
            compiled = torch.compile(copy.deepcopy(net))
            t0 = time.time()
            compiled(x)
            compile_s = time.time() - t0
            fns["compile_freezing"] = lambda: compiled(x)
        timings = timing.compare(list(fns.values()), cfg_model, device)
        whole = {k: t.median for k, t in zip(fns, timings)}
        speedup = {k: timing.paired_ratio(timings[0], t) for k, t in zip(fns, timings)}
        by = dict(zip(fns, timings))
        # auto / each eager layout, and the two tunings against each other (paired ratios)
        auto_vs = {}
        for a in [a for a in ("auto", "auto_2") if a in by]:
            for k in ("eager_nchw", "eager_channels_last", "eager_channels_last_nchw_in"):
                if k not in by:
                    continue
                auto_vs[f"{a}/{k}"] = timing.paired_ratio(by[a], by[k])
        if "auto_2" in by:
            auto_vs["auto/auto_2"] = timing.paired_ratio(by["auto"], by["auto_2"])
        cl_nchw_in = (timing.paired_ratio(by["eager_channels_last_nchw_in"],
                                          by["eager_channels_last"])
                      if "eager_channels_last_nchw_in" in by else None)
    return {"model": name, "batch": batch, "threads": threads, "device": device,
            "dtype": str(dtype).removeprefix("torch."), "tune_s": tune_s,
            "compile_s": compile_s, "choices": counts, "layers": rows, "whole_s": whole,
            "whole_speedup": speedup, "whole_samples": len(timings[0].samples),
            "auto_ratios": auto_vs, "whole_cl_nchw_in": cl_nchw_in,
            "choices_2": _counts(second) if second is not None else None,
            "runs": _runs(tuned), "runs_2": _runs(second) if second else None}


def _counts(tuned):
    """How many layers run each algorithm ('linear ' before nn.Linear ones)."""
    from convgap.transforms import choices
    counts = {}
    for c in choices(tuned):
        if c.algorithm is None:
            continue
        key = ("linear " if (c.spec or "").startswith("linear") else "") + c.algorithm
        counts[key] = counts.get(key, 0) + 1
    return counts


def _runs(tuned):
    """What each layer runs, in module order: two tunings that agree here made the same
    choices (the tuning records say where a layer was tuned, not what it runs)."""
    from convgap.transforms import choices
    return [c.algorithm for c in choices(tuned)]


def print_tables(results, console):
    algos = []
    for r in results:
        for row in r["layers"]:
            for a in row["times"]:
                if a not in algos:
                    algos.append(a)
    for r in results:
        where = (f"{r['threads']} threads" if r.get("device", "cpu") == "cpu"
                 else f"{r['device']} {r['dtype']}")
        t = Table(title=f"{r['model']} batch {r['batch']}, {where}: distinct "
                        "conv specs (median ms; tuner) and the re-check", title_justify="left")
        t.add_column("spec")
        t.add_column("in")
        for a in algos:
            t.add_column(a, justify="right")
        for col in ("choice", "speedup", "re-check chosen/torch"):
            t.add_column(col, justify="right")
        for row in r["layers"]:
            cells = [f"{1e3 * row['times'][a]:.3g}" if a in row["times"] else "-"
                     for a in algos]
            flag = " !" if row["recheck_ratio"] > 1.05 else ""
            t.add_row(row["spec"], row["layout"], *cells, row["choice"],
                      f"{row['speedup_tuner']:.2f}x", f"{row['recheck_ratio']:.3f}{flag}")
        console.print(t)
    t = Table(title="whole models (median ms, interleaved; speedup = median over rounds of "
                    "eager NCHW / variant)",
              title_justify="left")
    for col in ("model", "batch", "eager NCHW", "eager CL", "auto", "compile+freezing",
                "auto speedup", "CL speedup", "compile speedup", "worst layer re-check",
                "choices"):
        t.add_column(col, justify="left" if col in ("model", "choices") else "right")
    for r in results:
        w, sp = r["whole_s"], r["whole_speedup"]
        comp = w.get("compile_freezing")
        t.add_row(r["model"], str(r["batch"]), f"{1e3 * w['eager_nchw']:.1f}",
                  f"{1e3 * w['eager_channels_last']:.1f}", f"{1e3 * w['auto']:.1f}",
                  f"{1e3 * comp:.1f}" if comp else "-", f"{sp['auto']:.2f}x",
                  f"{sp['eager_channels_last']:.2f}x",
                  f"{sp['compile_freezing']:.2f}x" if comp else "-",
                  f"{max(row['recheck_ratio'] for row in r['layers']):.3f}",
                  ", ".join(f"{k} {v}" for k, v in sorted(r["choices"].items(),
                                                          key=lambda kv: -kv[1])))
    console.print(t)
    if any(r.get("auto_ratios", {}).get("auto/auto_2") for r in results):
        print_twice(results, console)


def print_twice(results, console):
    """Two tunings from empty caches, timed interleaved with both eager layouts."""
    t = Table(title="two tunings from empty caches (median ms, interleaved; ratios are "
                    "medians of per-round paired ratios; targets: run 1 / run 2 within "
                    "5%, auto / eager <= 1.0)", title_justify="left")
    for col in ("model", "batch", "eager NCHW", "eager CL", "auto run 1", "auto run 2",
                "run 1 / run 2", "run 1 / NCHW", "run 1 / CL", "run 2 / NCHW",
                "run 2 / CL", "CL NCHW-in / CL", "run 1 / CL NCHW-in",
                "run 2 / CL NCHW-in", "same choices"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        w, q = r["whole_s"], r["auto_ratios"]
        if "auto_2" not in w:
            continue
        t.add_row(r["model"], str(r["batch"]), f"{1e3 * w['eager_nchw']:.2f}",
                  f"{1e3 * w['eager_channels_last']:.2f}", f"{1e3 * w['auto']:.2f}",
                  f"{1e3 * w['auto_2']:.2f}", f"{q['auto/auto_2']:.3f}",
                  *(f"{q[k]:.3f}" for k in ("auto/eager_nchw", "auto/eager_channels_last",
                                            "auto_2/eager_nchw",
                                            "auto_2/eager_channels_last")),
                  f"{r['whole_cl_nchw_in']:.3f}",
                  f"{q['auto/eager_channels_last_nchw_in']:.3f}",
                  f"{q['auto_2/eager_channels_last_nchw_in']:.3f}",
                  "yes" if r["runs"] == r["runs_2"] else "no")
    console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2", "convnext_tiny"])
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile+freezing")
    ap.add_argument("--twice", action="store_true",
                    help="tune each model a second time from another empty cache and time "
                         "both tunings interleaved with eager NCHW and channels_last "
                         "(reproducibility; implies a fresh cache)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use the normal tuning cache (default: a fresh one, so it measures)")
    ap.add_argument("--malloc", default="retain", choices=("retain", "default"),
                    help="malloc policy for the whole run (retain)")
    ap.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]' (cpu)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--no-tf32", action="store_true",
                    help="CUDA fp32: IEEE products everywhere (torch's default allows TF32 "
                         "in cuDNN convolutions)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default: results/algorithms.json on CPU, "
                         "results/algorithms_cuda_<dtype>.json on a GPU)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    on_cpu = torch.device(args.device).type == "cpu"
    if args.out is None:
        args.out = RESULTS / ("algorithms.json" if on_cpu and args.dtype == "float32" else
                              f"algorithms_{torch.device(args.device).type}_{args.dtype}.json")
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.keep_cache and args.twice:
        ap.error("--twice tunes from empty caches: drop --keep-cache")
    if not args.keep_cache:
        os.environ["CONVGAP_CACHE"] = tempfile.mkdtemp(prefix="convgap-bench-")
    import convgap
    from convgap import algorithms, allocator
    if allocator.available():
        allocator.set_policy(args.malloc)
    console = Console(width=220)
    results = []
    start = time.time()
    for name in args.models:
        for batch in args.batch:
            console.print(f"[dim]{name} batch {batch} ...[/dim]")
            results.append(run_model(name, batch, args.threads, not args.no_compile, console,
                                     args.malloc, args.device, dtype, args.twice))
    print_tables(results, console)
    dev_name = convgap.hardware.device_name(args.device)
    where = (f"threads {args.threads}, malloc policy {allocator.policy()}" if on_cpu else
             f"{dev_name}, cuDNN TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}")
    console.print(f"{where}, {args.dtype}, 224x224")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "algorithms", "threads": args.threads, "batches": args.batch,
        "device": args.device, "device_name": dev_name, "dtype": args.dtype,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if not on_cpu else None,
        "image_size": 224, "layout_in": "nchw",
        "malloc": allocator.policy(),
        "algorithms": algorithms.names(), "torch": torch.__version__,
        "convgap": convgap.__version__, "python": platform.python_version(),
        "cpu": convgap.hardware.device_name("cpu"), "seconds": time.time() - start,
        "results": results}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
