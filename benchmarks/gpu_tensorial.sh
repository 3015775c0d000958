#!/usr/bin/env bash
# The factorized layers on a CUDA GPU, in one call (a lent GPU's time is short):
# benchmarks/tensorial.py in IEEE fp32 at batch 8 and 32 (BATCH), NCHW and channels_last
# (LAYOUTS), then their GPU tests (the fused Triton kernel against float64, every family,
# both layouts, half precision, autograd; TEST_K narrows them). Each step runs under its own
# time limit (BENCH_LIMIT, TEST_LIMIT); a failing step does not stop the next. Prints a
# compact table last (the call's reply carries only the tail): eager ms and, from CUDA
# graphs, device-only ms ("graph").
#
#   OUT=results_dir bash benchmarks/gpu_tensorial.sh
#
# Uses the python3 on PATH with this checkout's src/ on PYTHONPATH; tensorly (and, for the
# tltorch column, tensorly-torch) must be importable: wheels in .whl/ are installed first
# (gpu_common.sh).
set -u
source "$(dirname "$0")/gpu_common.sh" gpu_tensorial
BATCH=${BATCH:-8 32}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader \
    | tee -a "$LOG"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$LOG"
for layout in ${LAYOUTS:-nchw channels_last}; do
    # shellcheck disable=SC2086
    step "tensorial $layout b${BATCH// /,}" ${BENCH_LIMIT:-170} \
        $PY benchmarks/tensorial.py --device cuda --batch $BATCH --layout $layout \
        --out "$OUT/tensorial_cuda$([ "$layout" = nchw ] || echo "_$layout").json"
done
step "pytest factorized layers on cuda" ${TEST_LIMIT:-170} \
    $PY -m pytest tests/test_gpu.py -q -x -p no:cacheprovider -o addopts="" -rfE \
    -k "${TEST_K:-factorized or triton_pcp or einsum or graph_timing}"
grep -E "passed|failed|error" "$LOG" | tail -n 2
grep -E "^E " "$LOG" | head -n 12

$PY - "$OUT" <<'EOF'
"""Compact table of what the benchmark wrote: 10x compression and flattened rows."""
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("tensorial_cuda*.json")):
    d = json.loads(path.read_text())
    print(f"\n{path.name}: {d['device_name']}, torch {d['torch']}, tltorch {d['tltorch']}")
    print("spec b | variant x | runs | ms | dense ms | steps ms | tltorch ms | speedup | "
          "MAC cut | ratio | graph ms | graph dense ms | graph speedup | graph ratio")
    for r in d["results"]:
        for row in r["rows"]:
            if row["target_compression"] not in (None, 10):  # 10x and flattened only
                continue
            def ms(key):
                return f"{1e3 * row[key]:.4f}" if row.get(key) else "-"
            print(f"{r['channels']}@{r['size']} b{r['batch']} | {row['variant']} "
                  f"{row['target_compression'] or '-'} | {row['runs']} | {ms('s')} | "
                  f"{ms('dense_s')} | {ms('path_s')} | {ms('tltorch_s')} | "
                  f"{row['speedup']:.2f} | {row['mac_reduction']:.1f} | "
                  f"{row['speedup_over_mac_reduction']:.2f} | {ms('graph_s')} | "
                  f"{ms('graph_dense_s')} | {row.get('graph_speedup', 0):.2f} | "
                  f"{row.get('graph_speedup_over_mac_reduction', 0):.2f}")
EOF
