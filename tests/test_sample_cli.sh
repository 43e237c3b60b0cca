#!/usr/bin/env bash
# ditmoe-sample command-line behaviour: a good run (files, tEXt chunks, grayscale VAE, grid,
# default assets via $DITMOE_ASSETS) and every bad input: exit code 2, one clear line naming
# the problem, and no file left behind.
# Env: DITMOE_BIN (build/bin), DITMOE_SRC (source root), PYTHON (/usr/bin/python3 with torch).
set -u
BIN=${DITMOE_BIN:-build/bin}
SRC=${DITMOE_SRC:-$(cd "$(dirname "$0")/.." && pwd)}
PY=${PYTHON:-/usr/bin/python3}
EXE="$(cd "$BIN" && pwd)/ditmoe-sample"
T=$(mktemp -d /tmp/ditmoe-sample-cli.XXXXXX)
trap 'rm -rf "$T"' EXIT
fails=0
ok() { echo "ok   $1"; }
bad() { echo "FAIL $1"; fails=$((fails + 1)); }

REF="$SRC/tests/ref/sampler_ref.py"
"$PY" "$REF" model "$T/m.safetensors" --objective ddpm --fmnist-names || { echo "cannot make model"; exit 1; }
"$PY" "$REF" model "$T/rf.safetensors" --objective rf || exit 1
"$PY" "$REF" vae "$T/v.safetensors" || exit 1
"$PY" "$REF" vae "$T/gray.safetensors" --out-ch 1 || exit 1
"$PY" "$REF" vae "$T/z3.safetensors" --z 3 || exit 1
"$PY" - "$T" <<'PYEOF' || exit 1
import sys, numpy as np
d = sys.argv[1]
z = np.zeros((2, 4, 8, 8), np.float32); z[1, 2, 3, 4] = np.nan
np.save(f"{d}/nan.npy", z)
np.save(f"{d}/small.npy", np.zeros((1, 4, 8, 8), np.float32))
open(f"{d}/garbage.safetensors", "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
PYEOF
M=(--model "$T/m.safetensors" --vae "$T/v.safetensors" --steps 3 --seed 1 -q)

# expect_fail NAME PATTERN ARGS... : exit code 2, stderr one line matching PATTERN, out/ empty
expect_fail() {
    local name=$1 pat=$2; shift 2
    rm -rf "$T/out"; mkdir "$T/out"
    "$EXE" "$@" >"$T/stdout" 2>"$T/stderr"
    local rc=$? lines left
    lines=$(grep -c . "$T/stderr")
    left=$(ls -A "$T/out")
    if [ $rc -ne 2 ]; then bad "$name: exit code $rc, expected 2 ($(cat "$T/stderr"))"
    elif [ "$lines" -ne 1 ]; then bad "$name: expected one stderr line, got: $(cat "$T/stderr")"
    elif ! grep -qE -- "$pat" "$T/stderr"; then bad "$name: message '$(cat "$T/stderr")' lacks /$pat/"
    elif [ -n "$left" ]; then bad "$name: left files: $left"
    else ok "$name: $(cat "$T/stderr")"
    fi
}

expect_fail "unknown class name" 'unknown class "nosuch".*(T-shirt|Trouser)' "${M[@]}" --class nosuch -o "$T/out/a.png"
expect_fail "class id out of range" 'class id 10 out of range.*0.*9' "${M[@]}" --class 10 -o "$T/out/a.png"
expect_fail "negative class id" 'out of range' "${M[@]}" --class -1 -o "$T/out/a.png"
expect_fail "steps 0" 'steps 0.*at least 1' "${M[@]}" --class 1 --steps 0 -o "$T/out/a.png"
expect_fail "missing model" 'nope\.safetensors' --model "$T/nope.safetensors" --vae "$T/v.safetensors" -o "$T/out/a.png"
expect_fail "unreadable model" 'garbage\.safetensors' --model "$T/garbage.safetensors" --vae "$T/v.safetensors" -o "$T/out/a.png"
expect_fail "missing vae" 'novae\.safetensors' --model "$T/m.safetensors" --vae "$T/novae.safetensors" -o "$T/out/a.png"
expect_fail "latent channel mismatch" 'latent channels differ.*4.*3' --model "$T/m.safetensors" --vae "$T/z3.safetensors" -o "$T/out/a.png"
expect_fail "unwritable output" 'cannot write' "${M[@]}" --class 1 -o "$T/out/no/such/dir/a.png"
expect_fail "many images, no %d" 'need a %d' "${M[@]}" --class 1 -n 2 -o "$T/out/a.png"
expect_fail "bad %conversion" 'conversion' "${M[@]}" --class 1 -n 2 -o "$T/out/a%s.png"
expect_fail "rf sampler on ddpm model" 'euler.*ddpm' "${M[@]}" --class 1 --sampler euler -o "$T/out/a.png"
expect_fail "ddpm sampler on rf model" 'ddim.*rf' --model "$T/rf.safetensors" --vae "$T/v.safetensors" --sampler ddim -o "$T/out/a.png"
expect_fail "unknown sampler" 'expected ddpm, ddim, euler or heun' "${M[@]}" --sampler dpm -o "$T/out/a.png"
expect_fail "bad cfg channels" 'cfg-channels' "${M[@]}" --cfg-channels 7 -o "$T/out/a.png"
expect_fail "bad cfg interval" 'cfg-interval' "${M[@]}" --cfg-interval 0.8,0.2 -o "$T/out/a.png"
expect_fail "non-finite latent" 'non-finite latent at step 1/3' "${M[@]}" --class 1 -n 2 --init-noise "$T/nan.npy" -o "$T/out/a%d.png"
expect_fail "init noise too small" 'init-noise.*expected \[2,4,8,8\]' "${M[@]}" --class 1 -n 2 --init-noise "$T/small.npy" -o "$T/out/a%d.png"
expect_fail "unknown flag" "unknown flag '--frobnicate'" "${M[@]}" --frobnicate
expect_fail "bad -n" "-n '0'" "${M[@]}" -n 0

# A non-finite latent in the 2nd batch removes the first batch's files too.
"$PY" - "$T" <<'PYEOF'
import sys, numpy as np
z = np.zeros((3, 4, 8, 8), np.float32); z[2, 0, 0, 0] = np.inf
np.save(f"{sys.argv[1]}/nan3.npy", z)
PYEOF
expect_fail "non-finite in batch 2" 'non-finite latent' "${M[@]}" --class 1 -n 3 --batch 2 --init-noise "$T/nan3.npy" -o "$T/out/b%d.png"

# Good runs.
rm -rf "$T/out"; mkdir "$T/out"
if "$EXE" "${M[@]}" --class "bag,T-shirt/top" --class 3 -n 2 --batch 3 -o "$T/out/img-%02d.png" 2>"$T/stderr"; then
    n=$(ls "$T/out" | wc -l)
    if [ "$n" -eq 6 ] && [ -f "$T/out/img-05.png" ]; then ok "6 PNGs written"; else bad "expected 6 PNGs, got: $(ls "$T/out")"; fi
else bad "good run failed: $(cat "$T/stderr")"; fi
"$PY" - "$T/out/img-03.png" <<'PYEOF' && ok "tEXt chunks" || bad "tEXt chunks"
import sys, zlib, struct
data = open(sys.argv[1], "rb").read()
pos, text = 8, {}
while pos < len(data):
    n, typ = struct.unpack(">I4s", data[pos:pos + 8])
    if typ == b"tEXt":
        k, v = data[pos + 8:pos + 8 + n].split(b"\0", 1)
        text[k.decode()] = v.decode()
    pos += 12 + n
want = {"seed": "1", "steps": "3", "sampler": "ddpm", "cfg-scale": "4", "cfg-channels": "3",
        "image-index": "3", "class": "0 (T-shirt/top)", "model": "m.safetensors"}
bad = {k: (text.get(k), v) for k, v in want.items() if text.get(k) != v}
assert not bad, bad
PYEOF
rm -rf "$T/out"; mkdir "$T/out"
if "$EXE" --model "$T/rf.safetensors" --vae "$T/gray.safetensors" --class 1,2 -n 3 --steps 2 --grid -o "$T/out/g.png" -q 2>"$T/stderr"; then
    "$PY" - "$T/out/g.png" <<'PYEOF' && ok "grayscale grid 3x2" || bad "grayscale grid"
import sys, struct
d = open(sys.argv[1], "rb").read()
w, h, depth, ctype = struct.unpack(">IIBB", d[16:26])
# 16-px images, 2-px padding, 7-px label strip: 3*(16+2)+2 = 56 wide, 2*(16+7+2)+2 = 52 high
assert (w, h, ctype) == (56, 52, 0), (w, h, ctype)
PYEOF
    grep -q "seed" "$T/stderr" && ok "-q still prints a random seed" || bad "-q without --seed did not print the seed"
else bad "grid run failed: $(cat "$T/stderr")"; fi
# default assets through $DITMOE_ASSETS (only if the source tree has no assets of its own)
if [ ! -e "$SRC/assets/ditmoe-fmnist.safetensors" ]; then
    mkdir -p "$T/assets" "$T/cwd"
    cp "$T/m.safetensors" "$T/assets/ditmoe-fmnist.safetensors"
    cp "$T/v.safetensors" "$T/assets/vae-fmnist.safetensors"
    if (cd "$T/cwd" && DITMOE_ASSETS="$T/assets" "$EXE" --steps 2 --seed 3 -q); then
        [ -f "$T/cwd/sample.png" ] && ok "default assets via DITMOE_ASSETS" || bad "no sample.png"
    else bad "default assets run failed"; fi
    (cd "$T/cwd" && DITMOE_ASSETS="$T/none" "$EXE" --steps 2 -q 2>"$T/stderr")
    rc=$?
    [ $rc -eq 2 ] && grep -q "default model was not found" "$T/stderr" && ok "missing default assets: $(cat "$T/stderr")" || bad "missing default assets: rc $rc $(cat "$T/stderr")"
fi
"$EXE" --help | grep -q -- "--cfg-interval" && ok "--help" || bad "--help"
"$EXE" --version | grep -q "ditmoe-sample" && ok "--version" || bad "--version"

if [ $fails -ne 0 ]; then echo "$fails failure(s)"; exit 1; fi
echo "all passed"
