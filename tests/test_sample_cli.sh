#!/usr/bin/env bash
# ditmoe-sample command-line behaviour: a good run (files, tEXt chunks, grayscale VAE, grid,
# default assets via $DITMOE_ASSETS), JPEG and BMP output, an image regenerated from its own
# tEXt, and every bad input: exit code 2 (1 for runtime failures: an unwritable output,
# non-finite values while sampling), one clear line naming the problem, no file left behind.
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

# expect_code RC NAME PATTERN ARGS... : exit code RC, stderr one line matching PATTERN, out/ empty
expect_code() {
    local want=$1 name=$2 pat=$3; shift 3
    rm -rf "$T/out"; mkdir "$T/out"
    "$EXE" "$@" >"$T/stdout" 2>"$T/stderr"
    local rc=$? lines left
    lines=$(grep -c . "$T/stderr")
    left=$(ls -A "$T/out")
    if [ $rc -ne "$want" ]; then bad "$name: exit code $rc, expected $want ($(cat "$T/stderr"))"
    elif [ "$lines" -ne 1 ]; then bad "$name: expected one stderr line, got: $(cat "$T/stderr")"
    elif ! grep -qE -- "$pat" "$T/stderr"; then bad "$name: message '$(cat "$T/stderr")' lacks /$pat/"
    elif [ -n "$left" ]; then bad "$name: left files: $left"
    else ok "$name: exit $rc: $(cat "$T/stderr")"
    fi
}
expect_fail() { expect_code 2 "$@"; }

expect_fail "unknown class name" 'unknown class "nosuch".*(T-shirt|Trouser)' "${M[@]}" --class nosuch -o "$T/out/a.png"
expect_fail "class id out of range" 'class id 10 out of range.*0.*9' "${M[@]}" --class 10 -o "$T/out/a.png"
expect_fail "negative class id" 'out of range' "${M[@]}" --class -1 -o "$T/out/a.png"
expect_fail "steps 0" '--steps 0: must be >= 1' "${M[@]}" --class 1 --steps 0 -o "$T/out/a.png"
expect_fail "missing model" 'nope\.safetensors' --model "$T/nope.safetensors" --vae "$T/v.safetensors" -o "$T/out/a.png"
expect_fail "unreadable model" 'garbage\.safetensors' --model "$T/garbage.safetensors" --vae "$T/v.safetensors" -o "$T/out/a.png"
expect_fail "missing vae" 'novae\.safetensors' --model "$T/m.safetensors" --vae "$T/novae.safetensors" -o "$T/out/a.png"
expect_fail "latent channel mismatch" 'latent channels differ.*4.*3' --model "$T/m.safetensors" --vae "$T/z3.safetensors" -o "$T/out/a.png"
expect_code 1 "unwritable output" 'cannot write' "${M[@]}" --class 1 -o "$T/out/no/such/dir/a.png"
expect_code 1 "unwritable --save-latent" 'save-latent.*cannot write' "${M[@]}" --class 1 -o "$T/out/a.png" --save-latent "$T/out/no/l.npy"
expect_fail "unknown image type" 'unknown image type' "${M[@]}" --class 1 -o "$T/out/a.tiff"
# --backend cuda: a CPU-only build refuses the flag (bad input, 2); a CUDA build on a machine
# without a GPU fails at backend start (runtime, 1); with a GPU it would run, so not checked there.
if [ ! -x "$DITMOE_BIN/ditmoe-cuda-check" ]; then
    expect_fail "--backend cuda in a CPU build" 'backend cuda.*DITMOE_CUDA' "${M[@]}" --class 1 --backend cuda -o "$T/out/a.png"
elif [ ! -e /dev/nvidia0 ]; then
    expect_code 1 "--backend cuda without a GPU" 'cuda: no CUDA device' "${M[@]}" --class 1 --backend cuda -o "$T/out/a.png"
fi
expect_fail "unknown backend" "backend 'tpu': expected one of cpu, cuda" "${M[@]}" --backend tpu -o "$T/out/a.png"
expect_fail "bad --quality" "--quality '0'" "${M[@]}" --quality 0 -o "$T/out/a.jpg"
expect_fail "flag without its value" '--seed needs a value' "${M[@]}" --seed
expect_fail "many images, no %d" 'need a %d' "${M[@]}" --class 1 -n 2 -o "$T/out/a.png"
expect_fail "bad %conversion" 'conversion' "${M[@]}" --class 1 -n 2 -o "$T/out/a%s.png"
expect_fail "rf sampler on ddpm model" 'euler.*ddpm' "${M[@]}" --class 1 --sampler euler -o "$T/out/a.png"
expect_fail "ddpm sampler on rf model" 'ddim.*rf' --model "$T/rf.safetensors" --vae "$T/v.safetensors" --sampler ddim -o "$T/out/a.png"
expect_fail "unknown sampler" 'expected ddpm, ddim, euler or heun' "${M[@]}" --sampler dpm -o "$T/out/a.png"
expect_fail "bad cfg channels" '--cfg-channels 7' "${M[@]}" --cfg-channels 7 -o "$T/out/a.png"
expect_fail "bad cfg interval" '--cfg-interval 0.8,0.2' "${M[@]}" --cfg-interval 0.8,0.2 -o "$T/out/a.png"
expect_fail "non-finite init noise" 'init-noise .*nan\.npy: non-finite value nan at image 1' "${M[@]}" --class 1 -n 2 --init-noise "$T/nan.npy" -o "$T/out/a%d.png"
expect_fail "init noise too small" 'init-noise.*expected \[2,4,8,8\]' "${M[@]}" --class 1 -n 2 --init-noise "$T/small.npy" -o "$T/out/a%d.png"
expect_fail "unknown flag" "unknown flag '--frobnicate'" "${M[@]}" --frobnicate
expect_fail "bad -n" "-n '0'" "${M[@]}" -n 0

# Finite but huge initial noise overflows in the model: a runtime failure (exit 1) in the 2nd
# batch, which removes the first batch's files too.
"$PY" - "$T" <<'PYEOF'
import sys, numpy as np
z = np.zeros((3, 4, 8, 8), np.float32); z[2] = 3e38
np.save(f"{sys.argv[1]}/huge3.npy", z)
PYEOF
expect_code 1 "non-finite latent in batch 2" 'non-finite latent at step 1/3.*image index 2' "${M[@]}" --class 1 -n 3 --batch 2 --init-noise "$T/huge3.npy" -o "$T/out/b%d.png"

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
        "cfg-interval": "0,1", "eta": "0", "num-train-steps": "1000", "backend": "cpu",
        "image-index": "3", "class": "0 (T-shirt/top)", "model": "m.safetensors",
        "vae": "v.safetensors"}
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
# An image made with --cfg-interval and --eta carries every parameter in its tEXt; rebuilding
# the command from those values alone gives the same pixels.
rm -rf "$T/out" "$T/re"; mkdir "$T/out" "$T/re"
if "$EXE" --model "$T/m.safetensors" --vae "$T/v.safetensors" --class 2 -n 3 --steps 4 --sampler ddim \
        --eta 0.3 --cfg-interval 0.2,0.75 --cfg-scale 2.5 --seed 11 -q -o "$T/out/r-%d.png" 2>"$T/stderr"; then
    args=$("$PY" - "$T/out/r-2.png" "$T" <<'PYEOF'
import sys, struct
data = open(sys.argv[1], "rb").read()
pos, text = 8, {}
while pos < len(data):
    n, typ = struct.unpack(">I4s", data[pos:pos + 8])
    if typ == b"tEXt":
        k, v = data[pos + 8:pos + 8 + n].split(b"\0", 1)
        text[k.decode()] = v.decode()
    pos += 12 + n
assert text["cfg-interval"] == "0.2,0.75" and text["eta"] == "0.3", text
d = sys.argv[2]
idx = int(text["image-index"])
print(" ".join(["--model", f"{d}/{text['model']}", "--vae", f"{d}/{text['vae']}",
                "--class", text["class"].split()[0], "-n", str(idx + 1), "--steps", text["steps"],
                "--sampler", text["sampler"], "--cfg-scale", text["cfg-scale"],
                "--cfg-channels", text["cfg-channels"], "--cfg-interval", text["cfg-interval"],
                "--eta", text["eta"], "--seed", text["seed"], "--backend", text["backend"]]))
PYEOF
)
    if [ -n "$args" ] && "$EXE" $args -q -o "$T/re/r-%d.png" 2>"$T/stderr"; then
        "$PY" - "$T/out/r-2.png" "$T/re/r-2.png" "$T/out/r-1.png" <<'PYEOF' && ok "regenerated from its own tEXt (cfg-interval, eta): same pixels" || bad "regenerated image differs"
import sys, struct, zlib
def idat(p):
    b = open(p, "rb").read(); pos, out = 8, b""
    while pos < len(b):
        n, typ = struct.unpack(">I4s", b[pos:pos + 8])
        if typ == b"IDAT": out += b[pos + 8:pos + 8 + n]
        pos += 12 + n
    return zlib.decompress(out)
a, b, other = idat(sys.argv[1]), idat(sys.argv[2]), idat(sys.argv[3])
assert a == b and a != other
PYEOF
    else bad "regenerate from tEXt failed ($args): $(cat "$T/stderr")"; fi
else bad "cfg-interval/eta run failed: $(cat "$T/stderr")"; fi

# JPEG and BMP: same pixels as the PNG (BMP exactly, JPEG within its loss), parameters in the
# JPEG's COM segment right after SOI, files written atomically (nothing else left).
rm -rf "$T/out"; mkdir "$T/out"
FMT=(--model "$T/m.safetensors" --vae "$T/v.safetensors" --class 4 --steps 3 --seed 5 -q)
if "$EXE" "${FMT[@]}" -o "$T/out/a.png" && "$EXE" "${FMT[@]}" -o "$T/out/a.jpg" --quality 95 &&
   "$EXE" "${FMT[@]}" -o "$T/out/a.JPEG" --quality 20 && "$EXE" "${FMT[@]}" -o "$T/out/a.bmp" &&
   "$EXE" --model "$T/m.safetensors" --vae "$T/gray.safetensors" --class 4 --steps 3 --seed 5 -q -o "$T/out/g.jpg" &&
   "$EXE" --model "$T/m.safetensors" --vae "$T/gray.safetensors" --class 4 --steps 3 --seed 5 -q -o "$T/out/g.png" &&
   "$EXE" "${FMT[@]}" -n 4 --grid -o "$T/out/sheet.jpg"; then
    [ "$(ls -A "$T/out" | wc -l)" -eq 7 ] && ok "7 files, no temp files left" || bad "files: $(ls -A "$T/out")"
    "$PY" - "$T/out" <<'PYEOF' && ok "JPEG decodes, carries the parameters in COM; BMP == PNG pixels" || bad "JPEG/BMP"
import sys, struct, zlib
import numpy as np
d = sys.argv[1]
def png(p):
    b = open(p, "rb").read(); pos, out = 8, b""
    w, h, depth, ctype = struct.unpack(">IIBB", b[16:26])
    while pos < len(b):
        n, typ = struct.unpack(">I4s", b[pos:pos + 8])
        if typ == b"IDAT": out += b[pos + 8:pos + 8 + n]
        pos += 12 + n
    ch = {0: 1, 2: 3}[ctype]
    raw = zlib.decompress(out); rows = []; prev = np.zeros(w * ch, np.int32)
    for y in range(h):
        f = raw[y * (w * ch + 1)]; line = np.frombuffer(raw[y * (w * ch + 1) + 1:(y + 1) * (w * ch + 1)], np.uint8).astype(np.int32)
        cur = np.zeros(w * ch, np.int32)
        for x in range(w * ch):
            a = cur[x - ch] if x >= ch else 0; c = prev[x - ch] if x >= ch else 0; up = prev[x]
            p = [0, a, up, (a + up) // 2, None][f]
            if f == 4:
                pa, pb, pc = abs(up - c), abs(a - c), abs(a + up - 2 * c)
                p = a if pa <= pb and pa <= pc else (up if pb <= pc else c)
            cur[x] = (line[x] + p) & 255
        rows.append(cur); prev = cur
    return np.array(rows, np.uint8).reshape(h, w, ch)
def bmp(p):  # stb writes 24-bit bottom-up rows padded to 4 bytes
    b = open(p, "rb").read()
    assert b[:2] == b"BM"
    off, = struct.unpack("<I", b[10:14]); w, h = struct.unpack("<ii", b[18:26]); bpp, = struct.unpack("<H", b[28:30])
    assert bpp == 24, bpp
    stride = (w * 3 + 3) & ~3
    img = np.array([np.frombuffer(b[off + y * stride: off + y * stride + w * 3], np.uint8).reshape(w, 3)[:, ::-1]
                    for y in range(h)])[::-1]
    return img
def jpeg_com(p):
    b = open(p, "rb").read()
    assert b[:2] == b"\xff\xd8" and b[-2:] == b"\xff\xd9", "SOI/EOI"
    assert b[2:4] == b"\xff\xfe", "COM right after SOI"
    n, = struct.unpack(">H", b[4:6])
    return dict(l.split("=", 1) for l in b[6:4 + n].decode().splitlines())
ref = png(f"{d}/a.png")
assert np.array_equal(bmp(f"{d}/a.bmp"), ref), "BMP pixels"
com = jpeg_com(f"{d}/a.jpg")
for k, v in {"seed": "5", "steps": "3", "sampler": "ddpm", "class": "4 (Coat)", "cfg-interval": "0,1",
             "eta": "0", "image-index": "0", "model": "m.safetensors"}.items():
    assert com.get(k) == v, (k, com.get(k))
assert jpeg_com(f"{d}/sheet.jpg")["image-index"] == "0-3"
try:
    from PIL import Image
except ImportError:
    print("PIL absent: JPEG checked by its markers only")
    sys.exit(0)
hi = np.asarray(Image.open(f"{d}/a.jpg").convert("RGB")).astype(int)
lo = np.asarray(Image.open(f"{d}/a.JPEG").convert("RGB")).astype(int)
e_hi, e_lo = np.abs(hi - ref).mean(), np.abs(lo - ref).mean()
assert hi.shape == ref.shape and e_hi < 6 and e_hi < e_lo, (hi.shape, ref.shape, e_hi, e_lo)
g = np.asarray(Image.open(f"{d}/g.jpg").convert("L")).astype(int)  # stb stores gray as YCbCr
e_g = np.abs(g - png(f"{d}/g.png")[:, :, 0]).mean()
assert e_g < 8, e_g
print(f"JPEG mean |diff| vs PNG: q95 {e_hi:.2f}, q20 {e_lo:.2f}")
PYEOF
else bad "JPEG/BMP runs failed"; fi

"$EXE" --help | grep -q -- "--cfg-interval" && ok "--help" || bad "--help"
"$EXE" --version | grep -q "ditmoe-sample" && ok "--version" || bad "--version"

if [ $fails -ne 0 ]; then echo "$fails failure(s)"; exit 1; fi
echo "all passed"
