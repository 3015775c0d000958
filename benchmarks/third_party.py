"""Check convgap on third-party-style CNNs it was not written against.

For every model of ``benchmarks/third_party_models.py`` (eval mode, random weights drawn
after ``torch.manual_seed(0)``, one seeded input of batch ``--batch`` at ``--size``):

- sane: the model itself: output shape (batch, classes), two eval forwards identical, and
  every TensorFlow-SAME conv's output size ceil(input / stride);
- count: ``convgap.count(model, shape).macs`` against torch's ``FlopCounterMode`` total
  FLOPs / 2 on the same input;
- blocks: how many block rows ``count`` found, by kind;
- swap torch: ``convgap.swap(model, "torch", x)``: max|y - ref| / max|ref| against the
  original model's output;
- swap auto: ``convgap.swap(model, "auto", x, quiet=True)``: the same error, and the swapped
  model's time over the original's (median of per-round paired ratios, timed interleaved
  with ``convgap.timing.compare``, under ``torch.no_grad``; below 1 is faster), and the
  algorithms chosen;
- skipped: layers swap left alone (``choices()`` rows without an algorithm, or whose
  fallback says why a subclass was skipped), beside the model's Conv2d / Linear subclasses
  that override ``forward`` (the layers a swap must not replace);
- factorize: ``convgap.factorize(model, "tucker", compression=4)``: output shape as the
  original's, and the (lossy) relative error;
- onnx ts / onnx dynamo: the auto-swapped model exported by ``torch.onnx.export``
  (TorchScript exporter, opset 17; and the dynamo exporter) into memory, run by ONNX
  Runtime, relative error against the eager swapped model.

Every check is isolated: a failure prints its error in the table (the traceback's last
lines go to the JSON and below the table) and the harness goes on.

    .venv/bin/python benchmarks/third_party.py [--models a,b] [--batch 1] [--threads 2]
                                               [--size 64] [--fresh-cache] [--out FILE]

Prints a table and writes benchmarks/results/third_party.json.
"""

from __future__ import annotations

import os

# numpy's OpenBLAS (tensorly's SVDs inside factorize): single-threaded unless set otherwise.
# Multi-threaded on a shared 2-core machine its threads spin: a 160x1440 SVD took 600 ms
# against 29 ms on one thread here, and factorize(tucker) on resnet_d 70-110 s. Must be set
# before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import collections
import contextlib
import datetime
import io
import json
import logging
import math
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
import third_party_models as tpm  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOL = 1e-4  # DESIGN.md: exact transforms within 1e-4 max relative error (fp32)
SPEED_CONFIG = dict(warmup=3, min_repeats=15, max_repeats=40, min_time=0.2)


# -- helpers -------------------------------------------------------------------------------
def rel_err(y, ref) -> float:
    """max|y - ref| / max|ref|, in float64."""
    y = torch.as_tensor(y).double()
    ref = torch.as_tensor(ref).double()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def run_check(fn):
    """Run one check (its seconds in 's'); on an exception return {'error', 'traceback'}."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
        if caught:
            out.setdefault("warnings", [f"{w.category.__name__}: {str(w.message)[:300]}"
                                        for w in caught[:5]])
    except Exception as exc:  # noqa: BLE001 -- every failure is a finding to report
        tb = traceback.format_exc().rstrip().splitlines()
        out = {"error": first_line(exc), "traceback": tb[-8:]}
    out["s"] = round(time.perf_counter() - t0, 3)
    return out


def overrides_forward(m: nn.Module) -> bool:
    """A Conv2d / Linear subclass with its own forward (a swap must leave it alone)."""
    for base in (nn.Conv2d, nn.Linear):
        if isinstance(m, base) and type(m) is not base:
            return type(m).forward is not base.forward
    return False


def is_convgap_layer(m: nn.Module) -> bool:
    from convgap.algorithms import AlgoConv2d, AlgoLinear
    return isinstance(m, (AlgoConv2d, AlgoLinear))


def skipped_rows(model: nn.Module) -> list:
    """choices() rows of layers swap left alone: no algorithm, or a fallback saying a
    subclass was skipped (tolerant of both ways of listing them)."""
    from convgap.transforms import choices
    out = []
    for c in choices(model):
        fb = (getattr(c, "fallback", None) or "").lower()
        if getattr(c, "algorithm", None) is None or "subclass" in fb or "skipped" in fb:
            out.append(c)
    return out


def subclass_report(original: nn.Module, swapped: nn.Module) -> dict:
    """Subclass layers of the original, how many swap replaced (wrongly), and the
    skipped rows choices() lists."""
    subs = [n for n, m in original.named_modules() if overrides_forward(m)]
    mods = dict(swapped.named_modules())
    replaced = [n for n in subs if n in mods and is_convgap_layer(mods[n])]
    rows = skipped_rows(swapped)
    return {"subclass_layers": len(subs), "subclass_replaced": replaced,
            "skipped": len(rows), "skipped_names": [c.name for c in rows][:50],
            "skip_reason": (rows[0].fallback if rows else None)}


def algorithm_summary(model: nn.Module) -> str:
    from convgap.transforms import choices
    algos = collections.Counter(c.algorithm for c in choices(model) if c.algorithm is not None)
    return ", ".join(f"{a} {n}" for a, n in algos.most_common())


# -- the checks ----------------------------------------------------------------------------
def check_sane(name, model, x, ref, num_classes):
    problems = []
    if tuple(ref.shape) != (x.shape[0], num_classes):
        problems.append(f"output shape {tuple(ref.shape)}")
    with torch.no_grad():
        again = model(x)
    if not torch.equal(again, ref):
        problems.append("two eval forwards differ")
    if not torch.isfinite(ref).all():
        problems.append("non-finite output")
    same = [m for m in model.modules() if isinstance(m, tpm.Conv2dSame)]
    calls = []
    hooks = [m.register_forward_hook(
        lambda m, a, o: calls.append((tuple(a[0].shape[-2:]), tuple(o.shape[-2:]), m.stride)))
        for m in same]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    bad = [c for c in calls if c[1] != tuple(math.ceil(i / s) for i, s in zip(c[0], c[2]))]
    if bad:
        problems.append(f"SAME conv sizes {bad[:2]}")
    out = {"ok": not problems, "problems": problems, "output_shape": list(ref.shape)}
    if same:
        out["same_convs"] = {"calls": len(calls),
                             "stride2": sum(1 for c in calls if c[2][0] == 2),
                             "bad": len(bad)}
    return out


def check_count(model, x):
    import convgap
    counts = convgap.count(model, tuple(x.shape))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    torch_macs = counter.get_total_flops() // 2
    kinds = collections.Counter(b.kind for b in counts.blocks)
    summary = f"{len(counts.blocks)}"
    if kinds:
        summary += " (" + ", ".join(f"{k} {n}" for k, n in kinds.most_common()) + ")"
    return {"macs": counts.macs, "torch_macs": torch_macs, "equal": counts.macs == torch_macs,
            "unattributed_macs": counts.unattributed_macs, "blocks": len(counts.blocks),
            "block_kinds": dict(kinds), "blocks_summary": summary,
            "block_types": sorted({b.type for b in counts.blocks})}


def check_swap_torch(model, x, ref):
    import convgap
    swapped = convgap.swap(model, "torch", x)
    with torch.no_grad():
        y = swapped(x)
    return dict(rel_err=rel_err(y, ref), **subclass_report(model, swapped))


def check_swap_auto(model, x, ref, threads, state):
    import convgap
    from convgap import timing
    t0 = time.perf_counter()
    swapped = convgap.swap(model, "auto", x, quiet=True)
    tune_s = time.perf_counter() - t0
    state["auto"] = swapped
    with torch.no_grad():
        y = swapped(x)
    state["auto_out"] = y
    out = dict(rel_err=rel_err(y, ref), tune_s=tune_s, algorithms=algorithm_summary(swapped),
               **subclass_report(model, swapped))
    cfg = timing.TimingConfig(**SPEED_CONFIG)
    with timing.threads(threads), torch.no_grad():
        t_auto, t_orig = timing.compare([lambda: swapped(x), lambda: model(x)], cfg, "cpu")
    out.update(ratio=timing.paired_ratio(t_auto, t_orig), auto_ms=t_auto.median_ms,
               orig_ms=t_orig.median_ms, rounds=len(t_auto.samples))
    return out


def check_factorize(model, x, ref):
    import convgap
    from convgap import ConvgapError
    try:
        fact = convgap.factorize(model, "tucker", compression=4, quiet=True)
    except ConvgapError as exc:
        return {"convgap_error": first_line(exc)}
    with torch.no_grad():
        y = fact(x)
    made = convgap.changes(fact)
    done = [c.name for c in made if c.transform == "factorize"]
    left = {c.name: c.reason for c in made if c.transform == "left"}
    # a Conv2d subclass with its own forward (SAME padding, weight standardization, ...)
    # replaced by a factorized layer loses that computation
    after = dict(fact.named_modules())
    subs = [n for n, m in model.named_modules() if overrides_forward(m)
            and n in after and type(after[n]) is not type(m)]
    out = {"layers": len(done), "left_alone": len(left),
           "left_alone_reason": next(iter(left.values()), None),
           "shape_equal": y.shape == ref.shape, "output_shape": list(y.shape),
           "subclass_factorized": subs}
    if y.shape == ref.shape:
        out["rel_err"] = rel_err(y, ref)
    return out


def check_onnx(state, x, dynamo: bool):
    import onnxruntime as ort
    if "auto" not in state:
        return {"error": "no auto-swapped model (swap auto failed)"}
    model, ref = state["auto"], state["auto_out"]
    buf = io.BytesIO()
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), torch.no_grad():
        if dynamo:
            torch.onnx.export(model, (x,), buf, dynamo=True, verbose=False)
        else:
            torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False,
                              input_names=["x"], output_names=["y"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    y = sess.run(None, feed)[0]
    return {"rel_err": rel_err(torch.from_numpy(y), ref), "bytes": len(buf.getvalue())}


def run_model(name, args):
    torch.manual_seed(0)
    model = tpm.MODELS[name](num_classes=args.classes).eval()
    x = torch.randn(args.batch, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    state: dict = {}
    t0 = time.perf_counter()
    row = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    row["sane"] = run_check(lambda: check_sane(name, model, x, ref, args.classes))
    row["count"] = run_check(lambda: check_count(model, x))
    row["swap_torch"] = run_check(lambda: check_swap_torch(model, x, ref))
    row["swap_auto"] = run_check(lambda: check_swap_auto(model, x, ref, args.threads, state))
    row["factorize"] = run_check(lambda: check_factorize(model, x, ref))
    row["onnx_ts"] = run_check(lambda: check_onnx(state, x, dynamo=False))
    row["onnx_dynamo"] = run_check(lambda: check_onnx(state, x, dynamo=True))
    row["seconds"] = time.perf_counter() - t0
    return row


# -- presentation --------------------------------------------------------------------------
def _err(d: dict, width: int = 38) -> str | None:
    if "error" in d:
        e = d["error"]
        return "[red]ERR " + (e if len(e) <= width else e[:width - 1] + "…") + "[/red]"
    return None


def _fmt_err(v: float, tol: float = TOL) -> str:
    s = f"{v:.1e}"
    return s if v <= tol else f"[red]{s}[/red]"


def cells(row: dict) -> list[str]:
    out = [row["model"]]
    s = row["sane"]
    out.append(_err(s) or ("ok" if s["ok"] else "[red]" + "; ".join(s["problems"]) + "[/red]"))
    c = row["count"]
    out.append(_err(c) or f"{c['macs'] / 1e6:.1f}")
    out.append(_err(c, 12) or ("yes" if c["equal"] else f"[red]no ({c['torch_macs'] / 1e6:.1f})[/red]"))
    out.append(_err(c, 12) or c["blocks_summary"])
    t = row["swap_torch"]
    out.append(_err(t) or _fmt_err(t["rel_err"]))
    a = row["swap_auto"]
    out.append(_err(a) or _fmt_err(a["rel_err"]))
    out.append(_err(a, 12) or f"{a['ratio']:.2f} ({a['orig_ms']:.2f} ms)")
    if "error" in a:
        skip_src = t
    else:
        skip_src = a
    if "error" in skip_src:
        out.append("-")
    else:
        sub, sk, rep = (skip_src["subclass_layers"], skip_src["skipped"],
                        len(skip_src["subclass_replaced"]))
        txt = f"{sk} of {sub} sub"
        if rep:
            txt += f", [red]{rep} replaced[/red]"
        out.append(txt)
    f = row["factorize"]
    if "error" in f:
        out.append(_err(f))
    elif "convgap_error" in f:
        out.append("[yellow]" + f["convgap_error"][:40] + "[/yellow]")
    elif not f["shape_equal"]:
        out.append(f"[red]shape {tuple(f['output_shape'])}[/red]")
    else:
        txt = f"{f['rel_err']:.2f} ({f['layers']} layers"
        txt += f", {f['left_alone']} left)" if f.get("left_alone") else ")"
        if f["subclass_factorized"]:
            txt += f", [red]{len(f['subclass_factorized'])} subclass[/red]"
        out.append(txt)
    for key in ("onnx_ts", "onnx_dynamo"):
        o = row[key]
        out.append(_err(o) or _fmt_err(o["rel_err"], 1e-4))
    return out


HEADERS = ["model", "sane", "MMACs", "count=torch", "blocks", "swap torch err",
           "swap auto err", "auto/orig time", "skipped", "factorize tucker/4 err",
           "onnx ts err", "onnx dynamo err"]


def make_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("model", "blocks", "sane") else "right",
                         overflow="fold")
    for row in rows:
        table.add_row(*cells(row))
    return table


def failures(rows: list[dict]) -> list[tuple[str, str, list[str]]]:
    out = []
    for row in rows:
        for key, val in row.items():
            if isinstance(val, dict) and "traceback" in val:
                out.append((row["model"], key, val["traceback"]))
    return out


def git_state() -> dict:
    """The commit the harness ran on, and whether convgap's source differed from it."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        return {"commit": commit or None, "src_changed": [d[3:] for d in dirty if d.strip()]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(tpm.MODELS),
                   help="comma-separated names (default: all)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--fresh-cache", action="store_true",
                   help="tune swap('auto') in an empty tuning cache (default: convgap's cache)")
    p.add_argument("--out", type=Path, default=RESULTS / "third_party.json")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in tpm.MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(tpm.MODELS)}")
    if args.fresh_cache:
        os.environ["CONVGAP_CACHE"] = tempfile.mkdtemp(prefix="convgap-third-party-")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    logging.getLogger("torch.export").setLevel(logging.ERROR)

    import convgap
    import onnxruntime
    torch.set_num_threads(args.threads)
    try:
        cpu = convgap.hardware.device_name("cpu")
    except Exception:  # noqa: BLE001 -- fall back to /proc/cpuinfo
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), platform.processor())
    console = Console(width=max(200, Console().width), highlight=False)
    err_console = Console(stderr=True, highlight=False)
    start = time.time()
    rows = []
    for i, name in enumerate(names):
        row = run_model(name, args)
        rows.append(row)
        n_err = sum(1 for v in row.values() if isinstance(v, dict) and "error" in v)
        err_console.print(f"[{i + 1}/{len(names)}] {name}: {row['seconds']:.1f} s"
                          + (f", {n_err} check(s) failed" if n_err else ""))
    title = (f"convgap on third-party-style models ({cpu}, {args.threads} threads, batch "
             f"{args.batch}, {args.size}x{args.size}, torch {torch.__version__})")
    console.print(make_table(rows, title))
    console.print(f"errors: max|y - ref| / max|ref| (red above {TOL:g}); auto/orig time: median "
                  "of per-round paired ratios, swapped over original (below 1: faster), with "
                  "the original's median; skipped: layers swap left alone, of the model's "
                  "Conv2d/Linear subclasses overriding forward ('replaced': subclasses swap "
                  "turned into convgap layers); factorize is lossy.")
    fails = failures(rows)
    for model, key, tb in fails:
        console.print(f"[bold]{model} / {key}[/bold]:")
        for line in tb[-3:]:
            console.print("    " + line, markup=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "cpu": cpu, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "convgap": convgap.__version__, "git": git_state(), "python": platform.python_version(),
        "threads": args.threads, "batch": args.batch, "size": args.size,
        "classes": args.classes, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "tuning_cache": "fresh" if args.fresh_cache else "convgap default",
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "speed_config": SPEED_CONFIG, "tolerance": TOL, "seconds": time.time() - start,
        "models": rows,
    }, indent=1, default=str))
    console.print(f"wrote {args.out} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
