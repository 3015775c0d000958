"""Benchmark: convgap against what users pick instead, side by side (issue 18).

For every zoo model (``--models``) at every batch (``--batch``), 224x224, fp32, on CPU under
``--threads`` threads, one fresh process per (model, batch) (this script re-invoked with
``--one MODEL BATCH``), every process under the one malloc policy ``--malloc``:

- eager NCHW: the zoo model as created (eval, seeded weights);
- eager CL: model and input in ``channels_last``; and "CL NCHW-in", the same model fed the
  NCHW input (the conversion inside the timed call, as convgap's variants get it);
- swap auto: ``convgap.swap(net, "auto", x, quiet=True)``;
- fuse: ``convgap.swap(convgap.fuse(net, x, quiet=True), "auto", x, quiet=True)``, skipped
  (with a note) where this convgap has no ``fuse``;
- compile: ``torch.compile`` with inductor freezing (``--no-compile`` skips it);
- ORT: ONNX Runtime, CPU provider, all graph optimizations, ``threads`` intra-op threads,
  1 inter-op thread, sequential execution, on the file ``torch.onnx.export`` writes (the
  default, torch.export-based exporter: it exports every zoo model);
- OV: OpenVINO on that ONNX file, ``INFERENCE_PRECISION_HINT`` f32, ``INFERENCE_NUM_THREADS``
  threads, ``PERFORMANCE_HINT`` LATENCY; the compiled model's properties are read back and
  recorded, and a precision other than f32 fails the variant (OpenVINO otherwise runs bf16
  where the CPU has it, silently).

All variants of one process are timed interleaved (``convgap.timing.compare``, round robin,
every other round reversed); per variant: median ms, the median of per-round paired time
ratios against eager NCHW and against the fastest fp32 peer (compile, ORT, OV; below 1 is
faster), the output error against eager NCHW (max|y - ref| / max|ref|, by
``convgap.choice.relative_error``), and the computational efficiency: ideal latency /
measured, ideal = FLOPs / peak FLOP/s, FLOPs = 2 x ``convgap.count(model, shape).macs``,
peak from ``convgap.hardware.roofs("cpu", torch.float32)`` under ``--threads`` (measured
once and cached in the normal convgap cache; ``--refresh-roofs`` measures again: a peak
measured on a busy machine reads low). Each engine keeps its own thread pool's defaults
(ONNX Runtime's intra-op threads spin a while after a run, as torch's OpenMP threads and
OpenVINO's TBB workers do), so a variant's first call after another engine's shares the
two cores with that engine's spinning threads: right after an ONNX Runtime call a fused
efficientnet_b0 at batch 1 took 9.8 ms instead of 4.7, ONNX Runtime after it 5.6 instead
of 3.7. Each sample therefore follows ``--settle`` seconds (0.2) of untimed calls of the
same variant (``TimingConfig.settle``): every engine is timed in its steady state, as it
runs when deployed alone; rounds stay interleaved for the machine's drifts.
A variant that fails to build is reported with its error and left out of the timing.

swap and fuse tune in a fresh convgap cache shared by the run's processes (``--keep-cache``:
the normal one), as benchmarks/algorithms.py does. ONNX Runtime and OpenVINO come with the
benchmark-only extra: ``pip install -e '.[bench]'``.

    python benchmarks/peers.py [--models ...] [--batch 1 8] [--threads 2]
                               [--malloc retain|default] [--rounds 15] [--min-time 2.0]
                               [--settle 0.2] [--no-compile] [--keep-cache]
                               [--refresh-roofs] [--out PATH]

Prints a table per run and writes benchmarks/results/peers.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny",
          "convfirst"]
SIZE = 224
PEERS = ("compile", "ort", "ov")  # the fp32 engines users pick instead of convgap
LABELS = {"eager_nchw": "eager NCHW", "eager_cl": "eager CL", "eager_cl_nchw_in": "CL NCHW-in",
          "swap_auto": "swap auto", "fuse": "fuse", "compile": "compile", "ort": "ORT",
          "ov": "OV"}


# -- shared with benchmarks/fusion.py --------------------------------------------------------
def has_fuse() -> bool:
    import convgap
    return hasattr(convgap, "fuse")


def zoo_input(name: str, batch: int):
    """The zoo model ``name`` (eval, weights seeded) and a seeded (batch, 3, 224, 224) input."""
    from convgap import models
    torch.manual_seed(0)
    net = models.create(name).eval()
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return net, x


def set_malloc(policy: str) -> str:
    """Put this process under the malloc ``policy``; returns the policy in force."""
    from convgap import allocator
    if allocator.available():
        allocator.set_policy(policy)
    return allocator.policy()


def run_isolated(script: Path, name: str, batch: int, argv: list[str],
                 env: dict | None = None) -> dict:
    """Run ``script --one name batch *argv`` in a fresh Python process and return the JSON
    it writes (its ``--out``); a process that fails returns {'error', 'traceback'}."""
    with tempfile.TemporaryDirectory(prefix="convgap-peers-") as tmp:
        out = Path(tmp) / "one.json"
        cmd = [sys.executable, str(script), "--one", name, str(batch), *argv, "--out", str(out)]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        if proc.returncode == 0 and out.exists():
            return json.loads(out.read_text())
        tail = proc.stdout.strip().splitlines()[-12:]
        return {"model": name, "batch": batch, "error": f"exit {proc.returncode}",
                "traceback": tail}


def child_env(keep_cache: bool) -> dict:
    """The environment of the run's processes: a fresh convgap cache unless ``keep_cache``."""
    env = dict(os.environ)
    if not keep_cache:
        env["CONVGAP_CACHE"] = tempfile.mkdtemp(prefix="convgap-bench-")
    import convgap
    src = str(Path(convgap.__file__).resolve().parents[1])  # the convgap this process runs
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def timing_config(rounds: int, min_time: float, settle: float = 0.0):
    """benchmarks/algorithms.py's whole-model budget, ``rounds`` / ``min_time`` adjustable;
    ``settle``: seconds of untimed calls before each sample (see the top)."""
    from convgap import timing
    return timing.TimingConfig(warmup=2, min_repeats=rounds, max_repeats=max(rounds, 30),
                               min_time=min_time, settle=settle)


# -- the variants: (the callable timed, one returning its output as a tensor, facts) -------
def build_swap(net, x, malloc):
    import convgap
    auto = convgap.swap(net, "auto", x, quiet=True, malloc=malloc)
    return (lambda: auto(x)), (lambda: auto(x)), {}


def build_fuse(net, x, malloc):
    import convgap
    fused = convgap.fuse(copy.deepcopy(net), x, quiet=True)
    both = convgap.swap(fused, "auto", x, quiet=True, malloc=malloc)
    kinds = {}
    for m in both.modules():
        if type(m).__name__.startswith("Fused"):
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    return (lambda: both(x)), (lambda: both(x)), {"fused_modules": kinds}


def build_compile(net, x):
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    compiled = torch.compile(copy.deepcopy(net))
    compiled(x)  # compiles
    return (lambda: compiled(x)), (lambda: compiled(x)), {}


def export_onnx(net, x, path: Path) -> None:
    """``torch.onnx.export`` (default exporter) of ``net`` on ``x`` to ``path``, quietly."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=True, verbose=False)


def build_ort(onnx_path: Path, x, threads: int):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    run = lambda: sess.run(None, feed)[0]  # noqa: E731
    return run, (lambda: torch.from_numpy(run())), {"providers": sess.get_providers(),
                                                    "version": ort.__version__}


def build_ov(onnx_path: Path, x, threads: int):
    import openvino as ov
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
    props = {k: compiled.get_property(k) for k in config}
    props = {k: v.get_type_name() if isinstance(v, ov.Type) else str(v)
             for k, v in props.items()}
    if props["INFERENCE_PRECISION_HINT"] != "f32":
        raise RuntimeError(f"OpenVINO compiled with precision {props['INFERENCE_PRECISION_HINT']}"
                           ", not the f32 asked for")
    req = compiled.create_infer_request()
    feed = {0: x.numpy()}

    def run():
        req.infer(feed, share_inputs=True, share_outputs=True)

    def output():
        run()
        return torch.from_numpy(req.get_output_tensor(0).data.copy())
    return run, output, {"properties": props, "version": ov.__version__}


def build_variants(net, x, onnx_path: Path, args) -> tuple[dict, dict]:
    """Every variant that builds, name -> (timed callable, output callable); and per variant
    its facts (build seconds and what the builder reports, or its error or a note).
    ``onnx_path``: where the ONNX file for ORT and OV goes."""
    cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    built = {"eager_nchw": ((lambda: net(x)), (lambda: net(x))),
             "eager_cl": ((lambda: cl(xcl)), (lambda: cl(xcl))),
             "eager_cl_nchw_in": ((lambda: cl(x)), (lambda: cl(x)))}
    facts = {}
    steps = {"swap_auto": lambda: build_swap(net, x, args.malloc)}
    if has_fuse():
        steps["fuse"] = lambda: build_fuse(net, x, args.malloc)
    else:
        facts["fuse"] = {"note": "skipped: this convgap has no fuse"}
    if not args.no_compile:
        steps["compile"] = lambda: build_compile(net, x)
    steps["onnx_export"] = lambda: (export_onnx(net, x, onnx_path), None, {})
    steps["ort"] = lambda: build_ort(onnx_path, x, args.threads)
    steps["ov"] = lambda: build_ov(onnx_path, x, args.threads)
    for name, step in steps.items():
        if name in ("ort", "ov") and "error" in facts.get("onnx_export", {}):
            facts[name] = {"error": "no ONNX file"}
            continue
        t0 = time.perf_counter()
        try:
            fn, out, info = step()
        except Exception as exc:  # noqa: BLE001 -- a peer that fails is a finding
            facts[name] = {"error": traceback.format_exception_only(exc)[-1].strip(),
                           "traceback": traceback.format_exc().splitlines()[-8:]}
            print(f"  {name}: {facts[name]['error']}", file=sys.stderr)
            continue
        facts[name] = dict(info, build_s=round(time.perf_counter() - t0, 3))
        if fn is not None:
            built[name] = fn, out
    return built, facts


def run_one(name: str, batch: int, args) -> dict:
    """Build and time every variant of one (model, batch); this process only."""
    import convgap
    from convgap import timing
    from convgap.choice import relative_error
    policy = set_malloc(args.malloc)
    cfg = timing_config(args.rounds, args.min_time, args.settle)
    with timing.threads(args.threads) as n_threads, torch.no_grad(), \
            tempfile.TemporaryDirectory(prefix="convgap-peers-") as tmp:
        net, x = zoo_input(name, batch)
        ref = net(x)
        flops = convgap.count(net, tuple(x.shape)).flops
        built, facts = build_variants(net, x, Path(tmp) / "model.onnx", args)
        errors = {k: relative_error(out(), ref) for k, (_, out) in built.items()}
        names = list(built)
        timings = timing.compare([built[k][0] for k in names], cfg)
        by = dict(zip(names, timings))
    peers = [k for k in PEERS if k in by]
    fastest = min(peers, key=lambda k: by[k].median) if peers else None
    return {
        "model": name, "batch": batch, "threads": n_threads, "malloc": policy,
        "flops": flops, "ms": {k: t.median_ms for k, t in by.items()},
        "samples": len(timings[0].samples),
        "vs_eager": {k: timing.paired_ratio(t, by["eager_nchw"]) for k, t in by.items()},
        "fastest_peer": fastest,
        "vs_fastest_peer": ({k: timing.paired_ratio(t, by[fastest]) for k, t in by.items()}
                            if fastest else {}),
        "error": None, "errors": errors, "variants": facts}


# -- the parent: one process per (model, batch), then tables ---------------------------------
def add_efficiency(r: dict, peak_flops: float) -> None:
    """Computational efficiency (ideal / measured) of every timed variant of ``r``."""
    ideal_s = r["flops"] / peak_flops
    r["ideal_ms"] = 1e3 * ideal_s
    r["efficiency"] = {k: r["ideal_ms"] / ms for k, ms in r["ms"].items()}


def _ms(r, k):
    return f"{r['ms'][k]:.3g}" if k in r.get("ms", {}) else "-"


def print_tables(results: list[dict], console) -> None:
    from rich.table import Table
    cols = list(LABELS)
    t = Table(title="whole models (median ms, interleaved; ratios: median of per-round "
                    "paired time ratios, below 1 is faster; eff = ideal / measured)",
              title_justify="left")
    for c in ("model", "batch", *(LABELS[k] for k in cols), "fastest peer", "fuse / peer",
              "auto / peer", "eff fuse", "eff peer", "worst error"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for r in results:
        if r.get("error"):
            t.add_row(r["model"], str(r["batch"]), f"[red]{r['error']}[/red]")
            continue
        peer, q, eff = r["fastest_peer"], r["vs_fastest_peer"], r["efficiency"]
        worst = max(r["errors"], key=r["errors"].get)
        t.add_row(r["model"], str(r["batch"]), *(_ms(r, k) for k in cols),
                  f"{LABELS[peer]} {r['ms'][peer]:.3g}" if peer else "-",
                  f"{q['fuse']:.2f}" if "fuse" in q else "-",
                  f"{q['swap_auto']:.2f}" if "swap_auto" in q else "-",
                  f"{eff['fuse']:.0%}" if "fuse" in eff else "-",
                  f"{eff[peer]:.0%}" if peer else "-",
                  f"{r['errors'][worst]:.1e} {LABELS[worst]}")
    console.print(t)
    t = Table(title="per variant: time / eager NCHW, output error vs eager NCHW, "
                    "efficiency", title_justify="left")
    t.add_column("model")
    t.add_column("batch", justify="right")
    for k in cols:
        t.add_column(LABELS[k], justify="right")
    for r in results:
        if r.get("error"):
            continue
        cells = []
        for k in cols:
            if k not in r["ms"]:
                cells.append(r["variants"].get(k, {}).get("error") or "-")
                continue
            cells.append(f"{r['vs_eager'][k]:.2f}x {r['errors'][k]:.0e} "
                         f"{r['efficiency'][k]:.0%}")
        t.add_row(r["model"], str(r["batch"]), *cells)
    console.print(t)
    notes = sorted({f"{LABELS.get(k, k)}: {v.get('note') or v.get('error')}"
                    for r in results if not r.get("error")
                    for k, v in r["variants"].items() if v.get("note") or v.get("error")})
    for n in notes:
        console.print(f"[yellow]{n}[/yellow]")
    for r in results:
        if r.get("error"):
            console.print(f"[red]{r['model']} batch {r['batch']}:[/red] "
                          + "\n".join(r.get("traceback", [])))


def parse_args(argv=None, description=None):
    ap = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", default="retain", choices=("retain", "default"),
                    help="malloc policy of every process (retain)")
    ap.add_argument("--rounds", type=int, default=15,
                    help="at least this many interleaved rounds (15)")
    ap.add_argument("--min-time", type=float, default=2.0,
                    help="and at least this many seconds of samples per variant (2.0)")
    ap.add_argument("--settle", type=float, default=0.2,
                    help="seconds of untimed calls of a variant before each of its samples "
                         "(0.2; 0: the variants strictly alternate)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile+freezing")
    ap.add_argument("--keep-cache", action="store_true",
                    help="tune in the normal convgap cache (default: a fresh one)")
    ap.add_argument("--refresh-roofs", action="store_true",
                    help="measure the roofs again (and cache them) instead of reading them")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.min_time < 0 or args.settle < 0:
        ap.error("--rounds must be >= 1, --min-time and --settle >= 0")
    return args


def child_argv(args) -> list[str]:
    """The flags a (model, batch) process needs from the parent's."""
    out = ["--threads", str(args.threads), "--malloc", args.malloc, "--rounds",
           str(args.rounds), "--min-time", str(args.min_time), "--settle", str(args.settle)]
    return out + (["--no-compile"] if getattr(args, "no_compile", False) else [])


def versions() -> dict:
    import convgap
    out = {"torch": torch.__version__, "convgap": convgap.__version__,
           "python": platform.python_version()}
    for mod in ("onnxruntime", "openvino", "onnx", "onnxscript"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def main() -> None:
    args = parse_args()
    if args.one:
        result = run_one(args.one[0], int(args.one[1]), args)
        args.out.write_text(json.dumps(result, default=str))
        return
    from rich.console import Console
    from convgap import hardware, timing
    out = args.out or RESULTS / "peers.json"
    policy = set_malloc(args.malloc)
    console = Console(width=240)
    if not has_fuse():
        console.print("[yellow]this convgap has no fuse: the 'fuse' variant is skipped[/yellow]")
    console.print(f"[dim]roofs (cpu, float32, {args.threads} threads) ...[/dim]")
    with timing.threads(args.threads):
        roof = hardware.roofs("cpu", torch.float32, refresh=args.refresh_roofs)
    env = child_env(args.keep_cache)
    results, start = [], time.time()
    for name in args.models:
        for batch in args.batch:
            console.print(f"[dim]{name} batch {batch} ...[/dim]")
            r = run_isolated(Path(__file__).resolve(), name, batch, child_argv(args), env)
            if not r.get("error"):
                add_efficiency(r, roof.peak_flops)
            results.append(r)
    print_tables(results, console)
    if any(e > 1 for r in results for e in r.get("efficiency", {}).values()):
        console.print("[yellow]an efficiency above 100%: the cached peak "
                      f"({roof.peak_flops / 1e9:.0f} GFLOP/s, measured {roof.measured_at}) is "
                      "below what a variant reached; measure it on a quiet machine with "
                      "--refresh-roofs[/yellow]")
    cpu = hardware.device_name("cpu")
    console.print(f"{cpu}, {args.threads} threads, batch {' '.join(map(str, args.batch))}, "
                  f"malloc policy {policy}, fp32, {SIZE}x{SIZE}, peak "
                  f"{roof.peak_flops / 1e9:.0f} GFLOP/s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "peers", "cpu": cpu, "threads": args.threads, "batches": args.batch,
        "malloc": policy, "dtype": "float32", "image_size": SIZE,
        "timing": {"rounds": args.rounds, "min_time": args.min_time, "settle": args.settle},
        "fresh_cache": not args.keep_cache, "onnx_exporter": "torch.onnx.export(dynamo=True)",
        "peak_flops": roof.peak_flops, "bandwidth": roof.bandwidth,
        "has_fuse": has_fuse(), "versions": versions(), "seconds": time.time() - start,
        "results": results}, indent=1, default=str))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
