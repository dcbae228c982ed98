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
  timeout 240 python3 -m pip install --quiet --no-build-isolation --no-deps -e . 2>&1 | tail -5 | tee "$out/build.log"

status=0
TSA_FAST_REQUIRE_BACKENDS=triton,cpp,torch timeout 180 python3 -m pytest tests -q -x -m gpu \
  --junitxml="$out/gpu-tests.xml" 2>&1 | tail -15 | tee "$out/gpu-tests.txt" || status=1
timeout 240 python3 -m pytest benchmarks -q --benchmark-json="$out/benchmarks.json" 2>&1 | tail -25 \
  | tee "$out/benchmarks.txt" || status=1
python3 -m benchmarks.report "$out/benchmarks.json" --out "$out/report.md" || status=1
exit $status
