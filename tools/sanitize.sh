#!/usr/bin/env bash
# Builds lucid's native kernel with AddressSanitizer and UndefinedBehaviorSanitizer (every
# instruction-set path, -O1 -g, aborting on the first error) into a temporary directory, and runs
# the kernel's tests against it once per path this CPU runs (LUCID_NATIVE_DIR points lucid's loader
# at the sanitized libraries, LUCID_NATIVE_ISA picks the path; the in-place build is untouched).
#
#   tools/sanitize.sh                      # tests/test_native.py and tests/test_native_ffi.py
#   tools/sanitize.sh tests/test_native_ffi.py -k empty
#
# Python itself is not instrumented: the ASan runtime (and libstdc++, which it must come before)
# is preloaded. Leak detection is off: CPython and XLA keep memory until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
LUCID_SANITIZE=1 python setup.py -q build_ext --build-lib "$out" --build-temp "$out/temp" >"$out/build.log" 2>&1 \
  || { cat "$out/build.log" >&2; echo "sanitize: the build failed" >&2; exit 1; }

export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1
export LUCID_NATIVE_DIR="$out/lucid" PYTHONPATH="$PWD"
isas=$(python -c "import lucid.nn.functional as F; print(*F.native_kernel_status().cpu_isas)")
[ -n "$isas" ] || { echo "sanitize: the sanitized kernel did not load" >&2; exit 1; }
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_native.py tests/test_native_ffi.py)

status=0
for isa in $isas; do
  echo "sanitize: the $isa path"
  LUCID_NATIVE_ISA=$isa python -m pytest -q -p no:cacheprovider "${tests[@]}" || status=1
done
exit $status
