#!/usr/bin/env bash
# One prepared run for a lent GPU (under 8.5 minutes, worst case): build, GPU correctness tests, full-size
# benchmarks, JSON + Markdown report + PNG plots in $OUT (the device tool's output folder) or
# benchmarks/results/DATE-DEVICE. Copy that folder to benchmarks/results/ and regenerate the README with
#   python -m benchmarks.report benchmarks/results/<cpu run> benchmarks/results/<this run> --readme README.md
# The device image has torch, triton, pytest, pytest-benchmark, hypothesis, scikit-build-core, pybind11, cmake,
# ninja, matplotlib, but not pydantic (the engine, which the end-to-end benchmark imports) nor Liger-Kernel (a
# peer in the loss suites), and nothing can be downloaded there: `bash benchmarks/gpu_wheels.sh` fetches their
# wheels into .whl/ beforehand, to be carried with the working tree. Without them those benchmarks fail or skip.
# Everything is installed into a private venv that sees the image's packages through a .pth file (the image's
# python3 is itself a venv, which may be read-only; a venv made from it would not see its packages otherwise).
set -uo pipefail
cd "$(dirname "$0")/.."
device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
out=${OUT:-benchmarks/results/$(date +%F)-$device}
mkdir -p "$out"

purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
image_site=$(purelib python3)
python3 -m venv --without-pip /tmp/tsa_fast-venv  # the .pth adds the image's site dir, its own .pth files included
echo "import site; site.addsitedir('$image_site')" >"$(purelib /tmp/tsa_fast-venv/bin/python3)/image.pth"
. /tmp/tsa_fast-venv/bin/activate
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  timeout 15 python3 -m pip install --quiet --no-index --no-deps "$wheels"/*.whl 2>&1 | tail -2
fi
{
  date -u +"date: %F %T UTC"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
  python3 -m pip show liger-kernel 2>/dev/null | grep -m1 '^Version' | sed 's/^Version:/liger-kernel/' \
    || echo "liger-kernel: not installed (its benchmarks skip)"
} | tee "$out/environment.txt"

# The extension with its CUDA kernels for this GPU (no downloads: build deps come from the image); should they
# fail to build, without them (the Triton kernels need neither), within the same 90 s.
build() {  # TSA_FAST_CUDA=ON|OFF
  CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" TSA_FAST_CUDA=$1 python3 -m pip install --quiet --no-build-isolation --no-deps -e .
}
export -f build
timeout 90 bash -c 'build ON || { echo "tsa_fast: the CUDA kernels failed to build; building without them"; build OFF; }' \
  >"$out/build.log" 2>&1
tail -8 "$out/build.log"
python3 -c "import tsa_fast, tsa_fast._C as C; print('tsa_fast', tsa_fast.__file__, '| _C CUDA kernels:', C.has_cuda)" \
  2>&1 | tail -1 | tee -a "$out/environment.txt"

# Compiling the Triton kernels, once per autotuning candidate and set of compile-time options (~1.5 s each, one
# at a time in a process; the attention suite alone compiles ~60), would take most of the time. So the tests run
# in 8 processes (pytest-xdist, in the image), and the benchmark bodies run once first in 8 processes, which
# leaves every kernel in Triton's disk cache for the timed runs (their timings, outcome and output discarded;
# each timed run still autotunes by itself, alone on the GPU).
# Worst case, every step at its timeout plus 3 s of grace after SIGINT: 15 (wheels) + 90 (build) + 63 (tests)
# + 53 (compile warm-up) + 53 + 43 + 98 + 38 + 38 (benchmarks) + 15 (report) = 506 s = 8.43 min, plus the venv
# (seconds); typically far less. A suite stopped by its timeout (SIGINT) still writes the JSON of the benchmarks
# it finished; each suite runs its fastest implementations (tsa_fast's) first.
status=0
run() {  # TIMEOUT COMMAND...: SIGINT at the timeout (pytest then saves what it has), SIGKILL 3 s later
  timeout -s INT -k 3 "$@"
}
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 8) || echo "pytest-xdist missing: tests and warm-up in one process"
# The gpu tests live in the kernels' test files (the engine's tests need none, and import pydantic).
kernel_tests="tests/test_distillation_loss.py tests/test_fused_linear_distillation_loss.py tests/test_attention.py
  tests/test_attention_varlen.py tests/test_attention_decode.py tests/test_attention_transfer_loss.py"
TSA_FAST_REQUIRE_BACKENDS=triton,cpp,torch run 60 python3 -m pytest $kernel_tests -q -m gpu "${parallel[@]}" \
  -p no:cacheprovider --junitxml="$out/gpu-tests.xml" 2>&1 | tail -15 | tee "$out/gpu-tests.txt" || status=1
run 50 python3 -m pytest benchmarks/bench_*.py -q "${parallel[@]}" -p no:cacheprovider --benchmark-disable \
  -k "not reference or compiled" >/dev/null 2>&1  # the eager references compile nothing (and hold the most memory)
echo "compile warm-up done"
bench() {  # NAME TIMEOUT: one suite, its own JSON
  run "$2" python3 -m pytest "benchmarks/bench_$1.py" -q -p no:cacheprovider --benchmark-json="$out/$1.json" 2>&1 \
    | tail -20 | tee "$out/$1.txt" || status=1
}
bench distillation_loss 50
bench fused_linear_distillation_loss 40
bench attention 95  # with window 4096 at N = 32k, packed against padded sequences, and the decode rows
bench attention_transfer_loss 35
bench distillation_step 35
bench cross_tokenizer_step 35
timeout 15 python3 -m benchmarks.report "$out" --out "$out" >/dev/null || status=1
ls "$out"
exit $status
