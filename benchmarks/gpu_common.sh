# Sourced by the GPU scripts (gpu_check.sh, gpu_tensorial.sh): `source gpu_common.sh NAME`.
# Moves to the checkout's root; sets OUT (default /tmp/convgap-gpu, created), PY (python3,
# or $PYTHON), LOG ($OUT/NAME.log), a fresh CONVGAP_CACHE (roofs and tuning measured
# here) and PYTHONPATH (this checkout's src/ and tests/, after installing any wheels
# carried in .whl/ into /tmp/site, e.g. tensorly); defines step NAME LIMIT_S CMD...,
# which runs CMD under a time limit with its output in the log and one status line out.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/convgap-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/$1.log"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CONVGAP_CACHE="$(mktemp -d)"

step() {  # step NAME LIMIT_S CMD...: full output to the log, its tail to stdout
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "=== $name (limit ${limit}s)" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: rc=$rc, $(($(date +%s) - t0)) s" | tee -a "$LOG"
}
