#!/usr/bin/env bash
# The GPU check, as one prepared command for a machine with an NVIDIA GPU (no network):
#   build the package with this machine's python3 and nvcc (only its own GPU architecture),
#   run the CUDA tests, run the CUDA benchmarks, and leave logs and JSON figures in $OUT.
# Usage, from anywhere:  OUT=/some/dir bash benchmarks/gpu_check.sh
# Budget: under 6 minutes in all; each step has its own time limit and the script always
# writes $OUT/gpu_check_summary.json, then exits non-zero if any step failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/pyconcepts_gpu_check}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
BUILD_STATUS=skipped TEST_STATUS=skipped BENCH_STATUS=skipped BUILD_HOW=none

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
nvcc --version | tail -n 2 || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"

# Only this GPU's architecture: a third of the compile time of the default list.
ARCH=$(python3 -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')" 2>/dev/null || echo 90)
echo "== build (sm_${ARCH}) at $(elapsed) s"
export CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${ARCH} -DPYCONCEPTS_CUDA=ON"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
export PYCONCEPTS_CUDA=ON
if timeout 200 python3 -m pip install --no-deps --no-build-isolation --no-index -v -e . \
    > "$OUT/build.log" 2>&1; then
  BUILD_STATUS=ok BUILD_HOW=pip-editable
else
  # No scikit-build-core or pip trouble: plain CMake build, modules copied into the package.
  echo "pip build failed (tail of $OUT/build.log below); trying a direct CMake build"
  tail -n 30 "$OUT/build.log" || true
  if timeout 150 bash -c "cmake -S . -B build/gpu_check -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_CUDA_ARCHITECTURES=${ARCH} -DPYCONCEPTS_CUDA=ON \
        -Dpybind11_DIR=\$(python3 -m pybind11 --cmakedir) \
        -DPython_EXECUTABLE=\$(command -v python3) \
      && cmake --build build/gpu_check -j \$(nproc) \
      && cp build/gpu_check/_C*.so pyconcepts/" > "$OUT/build_cmake.log" 2>&1; then
    BUILD_STATUS=ok BUILD_HOW=cmake-inplace
  else
    BUILD_STATUS=failed
    tail -n 40 "$OUT/build_cmake.log" || true
  fi
fi
echo "build: ${BUILD_STATUS} (${BUILD_HOW}) at $(elapsed) s"
grep -iE "warning|error" "$OUT/build.log" "$OUT/build_cmake.log" 2>/dev/null | grep -v "Werror" | head -n 20 || true

if [[ "$BUILD_STATUS" == ok ]]; then
  python3 -c "import pyconcepts as pc; print('cuda_available', pc.ops.cuda_available())"
  echo "== CUDA tests at $(elapsed) s"
  if timeout 100 python3 -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda_ops.py \
      --junitxml="$OUT/pytest_cuda.xml"; then
    TEST_STATUS=ok
  else
    TEST_STATUS=failed
  fi
  echo "== CUDA benchmarks at $(elapsed) s"
  LEFT=$(( 345 - $(elapsed) ))
  if (( LEFT > 40 )) && timeout "$LEFT" python3 -m benchmarks.kernels --device cuda \
      --json "$OUT/gpu_bench.json"; then
    BENCH_STATUS=ok
  else
    LEFT=$(( 350 - $(elapsed) ))
    echo "full-size benchmark failed or out of time; quick run with ${LEFT} s left"
    if (( LEFT > 15 )) && timeout "$LEFT" python3 -m benchmarks.kernels --device cuda --quick \
        --json "$OUT/gpu_bench.json"; then
      BENCH_STATUS=ok-quick
    else
      BENCH_STATUS=failed
    fi
  fi
fi

python3 - "$OUT" "$BUILD_STATUS" "$BUILD_HOW" "$TEST_STATUS" "$BENCH_STATUS" "$(elapsed)" <<'PY'
import json, os, sys
out, build, how, tests, bench, secs = sys.argv[1:]
summary = {"build": build, "build_how": how, "cuda_tests": tests, "benchmarks": bench,
           "seconds": int(secs)}
path = os.path.join(out, "gpu_check_summary.json")
with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2)
os.replace(path + ".tmp", path)
print(json.dumps(summary))
PY
[[ "$BUILD_STATUS" == ok && "$TEST_STATUS" == ok && "$BENCH_STATUS" == ok* ]]
