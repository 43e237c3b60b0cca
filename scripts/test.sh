#!/usr/bin/env bash
# Runs every test: installs what is needed, builds three times and runs ctest on each:
#   build/        Release (GCC);
#   build-asan/   ASan + UBSan + LSan (GCC), every test;
#   build-clang/  ASan + UBSan with clang, whose UBSan also catches float-to-int overflow
#                 ((int)1e30, (int32_t)NaN; GCC has no such check); leaks are the GCC pass's job;
# then runs each libFuzzer target of tests/fuzz for a short budget. Exits non-zero on any failure.
# Usage: bash scripts/test.sh        (FUZZ_SECONDS=N sets the per-target budget, 0 skips it)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
jobs=$(nproc)

echo "== Release build =="
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$jobs"
(cd build && ctest --output-on-failure)

echo "== AddressSanitizer + UBSan build (gcc) =="
if grep -qs '^CMAKE_C_COMPILER:.*clang' build-asan/CMakeCache.txt; then rm -rf build-asan; fi
CC=gcc CXX=g++ cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDITMOE_SANITIZE=ON >/dev/null
cmake --build build-asan -j "$jobs"
# OpenMP's runtime keeps thread pools alive at exit; those are not our leaks.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=23
export LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd build-asan && ctest --output-on-failure)

echo "== AddressSanitizer + UBSan build (clang, float-cast-overflow) =="
CC=clang CXX=clang++ cmake -S . -B build-clang -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDITMOE_SANITIZE=ON -DDITMOE_CUDA=OFF >/dev/null
cmake --build build-clang -j "$jobs"
# Not here: the Python package tests load libditmoe.so into Python, which needs the sanitizer
# runtime preloaded (they do that for GCC's libasan only); LSan under clang's libomp stops with
# "LeakSanitizer has encountered a fatal error", so leaks are checked in the GCC pass.
(cd build-clang && ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:exitcode=23 \
  ctest --output-on-failure -E '^(test_install|test_python_pkg|test_pt_load)$')

fuzz=${FUZZ_SECONDS:-25}
if [ "$fuzz" -gt 0 ]; then
  echo "== libFuzzer targets, ${fuzz} s each =="
  bash scripts/fuzz.sh "$fuzz"
fi
