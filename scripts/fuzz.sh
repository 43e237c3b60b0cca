#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz with clang (ASan + UBSan incl. float-cast-overflow,
# in build-fuzz/) and runs each for SECONDS (default 60) from a generated seed corpus.
# Fails on any crash, sanitizer report, leak, timeout (-timeout) or OOM (-rss_limit_mb).
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]     e.g. bash scripts/fuzz.sh 600 fuzz_trace
#
# Corpora grow in build-fuzz/corpus/<target> (kept between runs; the seeds come from
# tests/fuzz/make_corpus.py); a crashing input is saved as build-fuzz/artifacts/<target>/crash-*
# and the run stops. Per target a line "fuzz_x: N execs in S s, corpus C, ok|FAIL" is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
if ! command -v clang >/dev/null; then
  echo "fuzz.sh: clang not found (bash scripts/setup.sh installs it)" >&2
  exit 2
fi
# FUZZ_CFLAGS (optional) adds compiler flags in a build folder of its own, e.g. to fuzz past a
# known finding: FUZZ_CFLAGS=-fno-sanitize=float-cast-overflow bash scripts/fuzz.sh 60 fuzz_model
B=build-fuzz${FUZZ_CFLAGS:+-$(echo "$FUZZ_CFLAGS" | tr -c 'A-Za-z0-9_\n-' '_')}
# clang for C and C++ (the CUDA option enables C++; libFuzzer must be linked by clang)
if [ -f "$B/CMakeCache.txt" ] && ! grep -qs '^CMAKE_CXX_COMPILER:.*clang++' "$B/CMakeCache.txt"; then
  rm -rf "$B"
fi
CC=clang CXX=clang++ cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDITMOE_FUZZ=ON -DDITMOE_NATIVE=ON -DDITMOE_CUDA=OFF \
  -DDITMOE_SAN_EXTRA="${FUZZ_CFLAGS:-}" >/dev/null
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in tests/fuzz/fuzz_*.c; do targets+=("$(basename "$f" .c)"); done
fi
cmake --build "$B" -j "$(nproc)" --target "${targets[@]}" >"$B/build.log" 2>&1 || { cat "$B/build.log" >&2; exit 1; }
rm -rf "$B/seeds"
/usr/bin/python3 tests/fuzz/make_corpus.py "$B/seeds" >/dev/null

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:allocator_may_return_null=1
export LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
fail=0
for t in "${targets[@]}"; do
  corpus="$B/corpus/$t" art="$B/artifacts/$t"
  mkdir -p "$corpus" "$art"
  log="$B/$t.log"
  # -max_len: the largest seed plus room; models and VAEs need their whole weight blob.
  maxlen=$(( $(ls -S "$B/seeds/$t" | head -1 | xargs -I{} stat -c %s "$B/seeds/$t/{}") * 2 ))
  [ "$maxlen" -lt 4096 ] && maxlen=4096
  rc=0
  "$B/fuzz/$t" "$corpus" "$B/seeds/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=1024 -max_len="$maxlen" -artifact_prefix="$art/" -print_final_stats=1 \
    >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  ncorp=$(ls "$corpus" | wc -l)
  if [ "$rc" -ne 0 ] || grep -qE "ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:" "$log"; then
    echo "$t: ${execs:-?} execs in ${secs} s, corpus $ncorp, FAIL (exit $rc; see $log, inputs in $art)"
    grep -m3 -E "ERROR:|runtime error:|SUMMARY" "$log" | sed 's/^/    /'
    fail=1
  else
    echo "$t: ${execs:-?} execs in ${secs} s, corpus $ncorp, ok"
  fi
done
exit $fail
