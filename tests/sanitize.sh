#!/usr/bin/env bash
# Builds the CPU module with AddressSanitizer and UndefinedBehaviorSanitizer into
# build/sanitize (the normal build is left alone) and runs the op tests, the boundary fuzz
# test and the hardening tests against it. Any sanitizer report aborts the run.
#
#   tests/sanitize.sh                          # the default test files
#   tests/sanitize.sh -x                       # the default test files, pytest options
#   tests/sanitize.sh tests/test_ops.py -k masked   # other test files
#
# Needs gcc (libasan, libubsan), cmake >= 3.24, and pybind11 importable by python
# (pip install pybind11); run it inside the environment where pyconcepts is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
build="$root/build/sanitize"
sanitizers="${PYCONCEPTS_SANITIZE:-address,undefined}"

pybind11_dir=$(python -m pybind11 --cmakedir 2>/dev/null) || {
  echo "sanitize.sh: pybind11 is not importable (pip install pybind11)" >&2
  exit 2
}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPYCONCEPTS_CUDA=OFF \
  -DPYCONCEPTS_SANITIZE="$sanitizers" -Dpybind11_DIR="$pybind11_dir" \
  -DPython_EXECUTABLE="$(command -v python)" >/dev/null
cmake --build "$build" --target _C -j "${SANITIZE_JOBS:-2}"

# A copy of the package with the instrumented module in it.
pkg="$build/python"
rm -rf "$pkg"
mkdir -p "$pkg"
cp -r "$root/pyconcepts" "$pkg/"
find "$pkg/pyconcepts" -name '_C*.so' -delete
cp "$build"/_C*.so "$pkg/pyconcepts/"

# The default test files unless the arguments name test files or directories.
names_tests=0
for arg in "$@"; do
  case "$arg" in tests*|*.py|*.py::*) names_tests=1 ;; esac
done
if [ "$names_tests" -eq 0 ]; then
  set -- tests/test_ops.py tests/test_pruned_pass.py tests/test_fuzz_ops.py \
    tests/test_hardening.py "$@"
fi
# Python itself is not instrumented: the sanitizer runtimes are preloaded. Leaks are not
# checked (the interpreter and torch keep allocations until exit by design).
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
exec python - "$pkg" "$@" <<'PY'
import sys

pkg, args = sys.argv[1], sys.argv[2:]
# An editable install redirects `import pyconcepts` to the source tree and its own build:
# drop that finder so the instrumented copy is imported.
sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
sys.path.insert(0, pkg)
import pyconcepts._C

assert pyconcepts._C.__file__.startswith(pkg), pyconcepts._C.__file__
print(f"sanitized module: {pyconcepts._C.__file__} ({pyconcepts._C.simd_level()})", flush=True)
import pytest

sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *args]))
PY
