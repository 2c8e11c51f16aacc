#!/usr/bin/env bash
# One command on a machine with a CUDA GPU, from the repository root:
#   bash bench/gpu_check.sh
# 1. bit-exact CPU vs CUDA fixed point (demo net, resnet18-like; reference and compiled
#    kernels) and one QAT step on CUDA;  2. the bench ratios on CUDA (speed section).
# Results go to $OUT (default ./gpu_check_out): gpu_check.json, bench_cuda.json, logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
python -m bench.gpu_check > "$OUT/gpu_check.json" 2> "$OUT/gpu_check.log"
exact=$?
cat "$OUT/gpu_check.json"
timeout 420 python -m bench --device cuda --json --threads 2 \
  > "$OUT/bench_cuda.json" 2> "$OUT/bench_cuda.log"
bench=$?
python - "$OUT/bench_cuda.json" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
for k in ("fixedpoint_over_float", "fixedpoint_compiled_over_float", "qat_step_over_float",
          "calibration_over_float_eval",
          "doctor_over_forward"):
    print(k, r[k]["value"], r[k]["details"])
PY
echo "bit-exact check exit $exact, bench exit $bench"
[ "$exact" = 0 ] && [ "$bench" = 0 ]
