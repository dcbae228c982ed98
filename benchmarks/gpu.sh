#!/usr/bin/env bash
# One prepared run for a lent GPU (under 8 minutes): build, GPU correctness tests, full-size benchmarks,
# JSON + Markdown report in $OUT (the device tool's output folder) or benchmarks/results/DATE-DEVICE.
# The device image has torch, triton, pytest, pytest-benchmark, hypothesis, scikit-build-core, pybind11.
set -uo pipefail
cd "$(dirname "$0")/.."
device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
out=${OUT:-benchmarks/results/$(date +%F)-$device}
mkdir -p "$out"
{
  date -u +"date: %F %T UTC"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
} | tee "$out/environment.txt"

# The extension with its CUDA kernels for this GPU (no downloads: build deps come from the image).
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" TSA_FAST_CUDA=ON \
  timeout 150 python3 -m pip install --quiet --no-build-isolation --no-deps -e . 2>&1 | tail -5 | tee "$out/build.log"

# Worst case, every step at its timeout: 150 + 120 + 60 + 120 + 60 s = 8.5 min; typically far less.
status=0
TSA_FAST_REQUIRE_BACKENDS=triton,cpp,torch timeout 120 python3 -m pytest tests -q -m gpu \
  --junitxml="$out/gpu-tests.xml" 2>&1 | tail -15 | tee "$out/gpu-tests.txt" || status=1
bench() {  # NAME TIMEOUT FILE...: suites with their own JSON (attention autotunes on first use: alone)
  timeout "$2" python3 -m pytest "${@:3}" -q --benchmark-json="$out/$1.json" 2>&1 | tail -20 \
    | tee "$out/$1.txt" || status=1
}
bench losses 60 benchmarks/bench_distillation_loss.py benchmarks/bench_fused_linear_distillation_loss.py
bench attention 120 benchmarks/bench_attention.py
bench attention_transfer 60 benchmarks/bench_attention_transfer_loss.py
python3 -m benchmarks.report "$out"/*.json --out "$out/report.md" || status=1
exit $status
