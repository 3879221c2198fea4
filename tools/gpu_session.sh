#!/usr/bin/env bash
# Everything the kernel's GPU half needs measured, in one call on a lent GPU machine
# (issue 5, section 4; docs/plugin.md "Remaining: the GPU steps"). Run from the repository root:
#
#   bash tools/gpu_session.sh [STEP ...]   # logs and JSON under $OUT (default ./gpu-session-out)
#
# With no STEP, all of them; a device call is limited to 10 minutes, so on the lent machine run
# `env smoke pytest bench` in one call and `resources sanitize` in the next.
#
# Steps, each with its own time limit, each logged whatever the others do:
#   env        nvidia-smi, python, torch, NVRTC and driver versions
#   smoke      tools/kernel_smoke.py: small shapes, every dtype, against the reference
#   pytest     tests/kernel/test_gpu.py (parity, bit-identical reruns, batch invariance, hard
#              gates, agreement with the host run) and tests/kernel/test_host.py
#   bench      tools/bench_kernel.py --json (checks the kernel against the gather baseline
#              before timing each case)
#   resources  tools/kernel_resources.py for the device's own architecture
#   sanitize   kernel_smoke.py under compute-sanitizer memcheck, racecheck and synccheck
# The last lines printed are a one-line-per-step summary. Exit 0 when every step passed.
set -u
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PRISM_DEPLOY_CACHE=${PRISM_DEPLOY_CACHE:-/tmp/prism-deploy-cache}
PY=${PYTHON:-python3}
declare -a SUMMARY=()
STEPS=" ${*:-env smoke pytest bench resources sanitize} "
want() { [[ $STEPS == *" $1 "* ]]; }

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    SUMMARY+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$OUT/$name.log")")
    tail -n 25 "$OUT/$name.log"
    return 0
}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "error: no CUDA GPU visible to $PY's torch: run this on the lent GPU machine" >&2
    exit 2
fi

want env && step env 60 bash -c "date -u; nvidia-smi; $PY - <<'PYEOF'
import sys, torch
from cuda.bindings import driver, nvrtc
print('python', sys.version.split()[0], 'torch', torch.__version__, 'device', torch.cuda.get_device_name())
print('nvrtc', nvrtc.nvrtcVersion()[1:], 'driver CUDA', driver.cuDriverGetVersion()[1])
PYEOF"
want smoke && step smoke 180 "$PY" tools/kernel_smoke.py
want pytest && step pytest 300 "$PY" -m pytest -q -p no:cacheprovider tests/kernel/test_gpu.py tests/kernel/test_host.py
want bench && step bench 300 bash -c "$PY tools/bench_kernel.py --json > '$OUT/bench_kernel.json'"
ARCH=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"sm_{m}{n}")')
want resources && step resources 120 "$PY" tools/kernel_resources.py --arch "$ARCH"
if ! want sanitize; then
    :
elif command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck synccheck; do
        step "sanitize-$tool" 150 compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" tools/kernel_smoke.py
    done
else
    SUMMARY+=("sanitize   skipped: compute-sanitizer not on PATH")
fi

echo
echo "summary (logs in $OUT):"
status=0
for line in "${SUMMARY[@]}"; do
    echo "  $line"
    [[ $line == *"rc=0 "* || $line == *skipped* ]] || status=1
done
exit $status
