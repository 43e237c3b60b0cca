#!/usr/bin/env bash
# Runs every test: installs what is needed, builds twice (Release with GCC, and ASan+UBSan with
# clang so that float-to-int overflow is caught too), runs ctest on both, then runs each libFuzzer
# target of tests/fuzz for a short budget. Exits non-zero when anything fails.
# Usage: bash scripts/test.sh        (FUZZ_SECONDS=N sets the per-target budget, 0 skips it)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
jobs=$(nproc)

echo "== Release build =="
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$jobs"
(cd build && ctest --output-on-failure)

# GCC's -fsanitize=undefined has no float-cast-overflow check; clang's does ((int)1e30, (int)NaN).
san_cc=gcc
command -v clang >/dev/null && san_cc=clang
echo "== AddressSanitizer + UBSan build ($san_cc) =="
cached=none
[ -f build-asan/CMakeCache.txt ] && cached=gcc
grep -qs '^CMAKE_C_COMPILER:.*clang' build-asan/CMakeCache.txt && cached=clang
[ "$cached" != none ] && [ "$cached" != "$san_cc" ] && rm -rf build-asan # the other compiler's
CC=$san_cc cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDITMOE_SANITIZE=ON >/dev/null
cmake --build build-asan -j "$jobs"
# OpenMP's runtime keeps thread pools alive at exit; those are not our leaks.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=23
export LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd build-asan && ctest --output-on-failure)

fuzz=${FUZZ_SECONDS:-25}
if [ "$fuzz" -gt 0 ]; then
  echo "== libFuzzer targets, ${fuzz} s each =="
  bash scripts/fuzz.sh "$fuzz"
fi
