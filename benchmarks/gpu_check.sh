#!/usr/bin/env bash
# Check convgap on a CUDA GPU and run the GPU benchmarks, in one call (the lent GPU's time
# is short): the GPU tests of the open issues' kernels, the roofs, the fused block kernels
# and whole fused models (issue 18), the sparse tile kernels of dynamic blocks against the
# dense blocks (issue 20), the other GPU tests, per-layer algorithm choice on resnet50
# (fp16), the Triton kernel against cuDNN, and analyze (the factorized layers:
# gpu_tensorial.sh). Steps run in order
# of value, each under its own time limit; a failing step does not stop the next.
#
#   OUT=results_dir bash benchmarks/gpu_check.sh
#
# Uses the python3 on PATH with this checkout's src/ on PYTHONPATH (no install needed where
# torch, triton, rich, matplotlib and pytest are present; wheels in .whl/ are installed
# first, see gpu_common.sh). Writes logs and JSON to $OUT and prints a compact summary last.
set -u
source "$(dirname "$0")/gpu_common.sh" gpu_check
BATCH=${BATCH:-32}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu BATCH=1 checks the plumbing without a GPU

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv,noheader | tee -a "$LOG"
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" \
    | tee -a "$LOG"

# the kernels of the open issues first: their GPU tests, the roofs (the efficiency
# denominators), issue 18's fused blocks, issue 20's sparse tiles; then everything else
NEW="block_kernels or sparse_tile or grouped_conv or replays_in_a_cuda_graph"
step "pytest tests/test_gpu.py -k '$NEW'" 150 \
    $PY -m pytest tests/test_gpu.py -k "$NEW" -q -s -p no:cacheprovider -o addopts="" -rfE
grep -E "passed|failed|error|skipped" "$LOG" | tail -n 3
for dt in bfloat16 float16 float32; do
    step "roofs $dt" 40 $PY -m convgap.cli roofs --device "$DEVICE" --dtype $dt
done
cp "$CONVGAP_CACHE/roofs.json" "$OUT/roofs.json" 2>/dev/null
step "fused block kernels (issue 18) b$BATCH" 240 \
    $PY benchmarks/gpu_blocks.py --batch "$BATCH" --dtypes bfloat16 float16 float32 \
    --blocks convfirst inverted_residual --out "$OUT/gpu_blocks.json"
step "fused ConvFirst b256 bf16 (cuDNN / Triton grouped conv)" 150 \
    $PY benchmarks/gpu_blocks.py --batch 256 --dtypes bfloat16 --blocks convfirst \
    --models convfirst --out "$OUT/gpu_blocks_b256.json"
step "sparse tile kernels (issue 20's kernel table) b8 b$BATCH" 240 \
    $PY benchmarks/gpu_dynamic.py --device "$DEVICE" --batch 8 "$BATCH" --granularities 4 7 \
    --densities 1.0 0.5 0.25 --out "$OUT/gpu_dynamic.json"
grep -A 16 "^best granularity" "$LOG" | tail -n 16
grep -A 40 "^CUDA graphs" "$LOG" | tail -n 40
step "pytest tests/test_gpu.py, the rest" 300 \
    $PY -m pytest tests/test_gpu.py -k "not ($NEW)" -q -s -p no:cacheprovider -o addopts="" -rfE
grep -E "passed|failed|error|skipped" "$LOG" | tail -n 3
step "algorithms resnet50 b$BATCH float16" 180 \
    $PY benchmarks/algorithms.py --device "$DEVICE" --dtype float16 --batch "$BATCH" \
    --models resnet50 --no-compile --out "$OUT/algorithms_cuda_float16.json"
step "implicit_gemm kernel vs cuDNN, fp16 b128" 120 \
    $PY benchmarks/implicit_gemm.py --out "$OUT/implicit_gemm_cuda.json"
step "analyze resnet50 mobilenet_v2 b$BATCH float16" 70 \
    $PY -m convgap.cli analyze resnet50 mobilenet_v2 --device "$DEVICE" --dtype float16 \
    --batch "$BATCH" --layout nchw channels_last --quiet --json "$OUT/analyze_cuda.json"

$PY - "$OUT" <<'EOF'
"""Compact summary of what the steps wrote (the call's reply carries only the tail)."""
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
roofs = load("roofs.json") or {}
for key, r in roofs.items():
    print(f"roof {r['dtype']}: {r['peak_flops'] / 1e12:.1f} TFLOP/s, "
          f"{r['bandwidth'] / 1e12:.2f} TB/s  {r['details']['gemm_flops_by_n']}")
for name in ("algorithms_cuda_float16.json", "algorithms_cuda_float32.json"):
    d = load(name)
    if not d:
        continue
    for r in d["results"]:
        print(f"\n{name}: {r['model']} b{r['batch']} {r['dtype']} tune {r['tune_s']:.0f}s "
              f"whole ms {({k: round(1e3 * v, 2) for k, v in r['whole_s'].items()})} "
              f"speedup {({k: round(v, 3) for k, v in r['whole_speedup'].items()})} "
              f"choices {r['choices']}")
        algos = sorted({a for row in r["layers"] for a in row["times"]})
        print("spec | " + " | ".join(algos) + " | choice | re-check")
        for row in r["layers"]:
            t = " | ".join(f"{1e3 * row['times'][a]:.3g}" if a in row["times"] else "-"
                           for a in algos)
            print(f"{row['spec']} | {t} | {row['choice']} | {row['recheck_ratio']:.3f}")
d = load("implicit_gemm_cuda.json")
if d:
    names = list(d["rows"][0]["ms"]) if d["rows"] else []
    print("\nimplicit_gemm (ms, CUDA events): shape | " + " | ".join(names))
    for r in d["rows"]:
        print(r["shape"], "|", " | ".join(f"{r['ms'][n]:.4f}" for n in names))
for d in (load("gpu_blocks.json"), load("gpu_blocks_b256.json")):
  if d:
    print(f"\ngpu_blocks b{d['batch']} ({d['device']}): block | dtype | torch ms | fused ms | "
          "eff torch | eff fused | speedup | err")
    for r in d["rows"]:
        if "error" in r:
            print(r["block"], "|", r["dtype"], "| ERROR", r["error"][:200])
            continue
        print(f"{r['block']} | {r['dtype']} | {r['ms']['torch']:.4f} | {r['ms']['fused']:.4f}"
              f" | {r['efficiency']['torch']:.1%} | {r['efficiency']['fused']:.1%} | "
              f"{r['speedup']:.2f} | {r['rel_err']:.1e}")
        for k, v in r.get("parts_ms", {}).items():
            print(f"    {k}: {v:.4f} ms")
    for r in d.get("models", []):
        print(r["model"], r["dtype"], r.get("ms"), r.get("speedup"), r.get("rel_err"),
              r.get("error", ""))
d = load("analyze_cuda.json")
if d:
    for run in d.get("runs", []):
        t = run["total"]
        print(f"analyze {run['model']} b{run['batch']} {run['layout']} {run['dtype']}: "
              f"{1e3 * t['measured_s']:.2f} ms, ideal {1e3 * t['ideal_s']:.3f} ms, "
              f"roofline {1e3 * t['roofline_s']:.3f} ms, "
              f"efficiency {t['ideal_s'] / t['measured_s']:.1%}")
EOF
