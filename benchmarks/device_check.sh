#!/usr/bin/env bash
# The GPU checks of issues 3 and 4 as ONE command, for a session that is lent a GPU machine
# (an H200 with torch, numpy, matplotlib, pyyaml, tqdm; no data, no package registry).
# About 5 minutes there. Prepare here, once per session (needs pip's registry):
#
#   grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl gymnasium==1.4.0 farama-notifications==0.0.6
#
# then call the device tool's run with
#   command: bash benchmarks/device_check.sh      carry: [".whl"]      timeout_s: 540
# and give the machine back. Everything printed is also written under $OUT (or benchmarks/out/device).
#
# 1. correctness on the GPU (benchmarks/device_check.py): batched executor == NOSOptimizer,
#    grouped training == one by one, the bf16 + channels_last path;
# 2. child training speed, naive loop vs grouped network (issue 4's GPU goals: >= 25x the
#    naive loop, <= 0.3 s per "paper" candidate), on random CIFAR-shaped images;
# 3. the batched rule compiler on the GPU (benchmarks/rule_throughput.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/out/device}
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
  python3 -c "import gymnasium" 2>/dev/null || { echo "gymnasium is missing: carry it as .whl (see this file's header)" >&2; exit 1; }
fi
export PYTHONUNBUFFERED=1
status=0
run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; status=1; }
}
# DEVICE=cpu bash benchmarks/device_check.sh: the dry run here, at small sizes
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then SIZES=(--quick); RULE_SIZES=(--quick); else SIZES=(--groups 7 112 448 896); RULE_SIZES=(); fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true) | tee "$OUT_DIR/gpu.txt"
run device_check 150 python3 benchmarks/device_check.py --device "$DEVICE"
run child_throughput 240 python3 benchmarks/child_throughput.py --device "$DEVICE" --random-data --only trainer "${SIZES[@]}"
run rule_throughput 120 python3 benchmarks/rule_throughput.py --device "$DEVICE" "${RULE_SIZES[@]}"
exit $status
