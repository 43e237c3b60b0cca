#!/usr/bin/env bash
# Runs every test: installs what is needed, builds twice (Release, and ASan+UBSan), runs ctest on
# both. Exits non-zero when anything fails. Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
jobs=$(nproc)

echo "== Release build =="
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$jobs"
(cd build && ctest --output-on-failure)

echo "== AddressSanitizer + UBSan build =="
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDITMOE_SANITIZE=ON >/dev/null
cmake --build build-asan -j "$jobs"
# OpenMP's runtime keeps thread pools alive at exit; those are not our leaks.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=23
export LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd build-asan && ctest --output-on-failure)
