#!/usr/bin/env bash
# The CUDA checks, on a machine with a GPU, from the repository root once `make test` has made
# .venv:  bash benchmarks/gpu_check.sh
#
# Runs, each under its own `timeout` (together at most about 9.5 minutes):
#   cuda              torch sees a CUDA device (the other checks are skipped without one)
#   pytest-gpu        the tests marked gpu (tests/test_precision.py: runs of the tiny config in
#                     32 / bf16 / 16-mixed, DNS's projection invariant, device: auto)
#   trainer-overhead  benchmarks/trainer_overhead.py --device cuda (11 rounds)
#   dns-step          benchmarks/dns_step.py --device cuda (5 rounds)
# and prints one line per check on stdout:
#   check <name>: ok|FAILED (<seconds> s) <key number>
# Full logs and the benchmarks' JSON reports go to a fresh directory named on stderr; the
# committed results in benchmarks/results/ are left alone. Exit status: 0 when every check
# is ok, 1 otherwise.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PYTHON:-.venv/bin/python}
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/comodal-gpu-check.XXXXXX") || exit 1
echo "gpu_check: logs and reports in $LOGS" >&2
failed=0

# check NAME LIMIT_S KEY_FUNCTION COMMAND...: run COMMAND under `timeout LIMIT_S` with its
# output in $LOGS/NAME.log; KEY_FUNCTION prints the key number and fails when the check did
# not do what it should even though the command exited 0.
check() {
    local name=$1 limit=$2 key=$3
    shift 3
    local log="$LOGS/$name.log" start=$SECONDS rc number status=ok
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    number=$("$key" "$log" 2>>"$log")
    local keyrc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status=FAILED number="timed out after $limit s"
    elif [ "$rc" -ne 0 ]; then
        status=FAILED number="exit $rc: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-120)"
    elif [ "$keyrc" -ne 0 ]; then
        status=FAILED
    fi
    [ "$status" = ok ] || failed=1
    echo "check $name: $status ($((SECONDS - start)) s) $number"
}

skip() {  # NAME: a check not run because CUDA is missing
    failed=1
    echo "check $1: FAILED (0 s) not run: no CUDA device"
}

key_cuda() {
    tail -n 1 "$1"
}

key_pytest() {  # "N passed, M deselected"; a skipped gpu test means CUDA was not used
    local summary
    summary=$(grep -E ' in [0-9.]+s' "$1" | tail -n 1 | sed -E 's/ in [0-9.]+s.*//; s/^=+ //')
    echo "$summary"
    [[ "$summary" == *passed* && "$summary" != *skipped* && "$summary" != *failed* ]]
}

key_trainer() {
    "$PY" - "$LOGS/trainer_overhead.json" <<'EOF'
import json
import sys

r = json.load(open(sys.argv[1]))["runners"]
print("trainer/plain %.3f per epoch (avalanche/plain %.3f, plain %.2f ms/epoch)"
      % (r["trainer"]["ratio_to_plain"], r["avalanche"]["ratio_to_plain"],
         1e3 * r["plain"]["median_s_per_epoch"]))
EOF
}

key_dns() {
    "$PY" - "$LOGS/dns_step.json" <<'EOF'
import json
import sys

report = json.load(open(sys.argv[1]))
ratios = report["targets"]["step_ratios_d1024"]
speed = report["targets"]["speedups_k_le_d4"]
print("dns/finetune per step at d=1024: max %.3f (%s); low-rank/dense speed-up min %.1fx"
      % (max(ratios.values()), max(ratios, key=ratios.get), min(speed.values())))
EOF
}

check cuda 60 key_cuda "$PY" -c \
    "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0), 'torch', torch.__version__)"
if [ "$failed" -eq 0 ]; then
    check pytest-gpu 210 key_pytest "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
    check trainer-overhead 120 key_trainer "$PY" benchmarks/trainer_overhead.py --device cuda \
        --rounds 11 --out "$LOGS/trainer_overhead.json"
    check dns-step 210 key_dns "$PY" benchmarks/dns_step.py --device cuda --rounds 5 \
        --out "$LOGS/dns_step.json"
else
    skip pytest-gpu
    skip trainer-overhead
    skip dns-step
fi
exit "$failed"
