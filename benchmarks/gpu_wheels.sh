#!/usr/bin/env bash
# Download, on a machine with network, the wheels that benchmarks/gpu.sh installs on the lent GPU machine, whose
# image (Python 3.12, no network) lacks them: pydantic and its needs (the distillation engine, imported by the
# end-to-end benchmark) and Liger-Kernel (a peer in the loss suites). They go to .whl/ (git-ignored here); pass
# `.whl` in the device tool's `carry` so that they travel with the working tree (3.7 MB).
#   bash benchmarks/gpu_wheels.sh && echo then: run "bash benchmarks/gpu.sh" with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 liger-kernel==0.8.5
ls -l .whl
