#!/usr/bin/env bash
# The GPU check of issue 12 (spec/cuda.md §6): ONE command, every section under its own timeout,
# all within 8 minutes on an H200, everything written to the folder named by the first argument.
#
#   bash scripts/gpu_check.sh OUT_DIR          run on a machine with an NVIDIA GPU
#   bash scripts/gpu_check.sh --pack           on the build machine: copy the non-system shared
#                                              libraries the binaries need into build-cuda/lib
#
# It works from a copy of the working tree plus build-cuda/ (bin/ and lib/ from --pack), on a
# machine with only the CUDA toolkit and its libraries: cudart is static in the binaries, cuBLAS
# comes from the machine's CUDA, cuDNN is dlopen'ed (system library path, or the nvidia-cudnn
# wheel found through python3). Without binaries and with cmake + nvcc it builds first.
# Sections: probe ceil ops inv e2e lab bench; a failing section never stops the later ones; the
# summary table is printed last (and written to OUT_DIR/summary.txt).
set -u -o pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${DITMOE_BUILD:-$SRC/build-cuda}"
BIN="$BUILD/bin"

if [ "${1:-}" = "--pack" ]; then
    mkdir -p "$BUILD/lib"
    for b in "$BIN"/ditmoe-* "$BIN"/test_cuda_ops "$BIN"/test_backend_ops; do
        [ -x "$b" ] || continue
        ldd "$b" | awk '/=>/ {print $3}' | while read -r lib; do
            case "$lib" in
            /lib/x86_64-linux-gnu/libc.so*|/lib/x86_64-linux-gnu/libm.so*|/lib/x86_64-linux-gnu/libdl.so*| \
            /lib/x86_64-linux-gnu/libpthread.so*|/lib/x86_64-linux-gnu/librt.so*|*/libgcc_s.so*| \
            */libstdc++.so*|*/libcublas*|*/libcudart*|*/libcudnn*|not) ;;
            *) cp -Lu "$lib" "$BUILD/lib/" ;;
            esac
        done
    done
    du -sh "$BUILD/lib" "$BIN"; ls -la "$BUILD/lib"
    exit 0
fi

OUT="${1:?usage: gpu_check.sh OUT_DIR | --pack}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
T0=$(date +%s)
declare -a ROWS=()
export DITMOE_ASSETS="$SRC/assets"
PY="${PYTHON:-python3}" # the one with torch and numpy on the GPU machine

# ---- libraries: our lib/, the machine's CUDA, cuDNN from a wheel if there is one ----
LDP="$BUILD/lib"
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && LDP="$LDP:$d"
done
if command -v python3 > /dev/null; then
    W=$(python3 - 2> /dev/null << 'PY'
import importlib, os
for mod in ("nvidia.cudnn", "nvidia.cublas"):
    try:
        m = importlib.import_module(mod)
        for p in list(getattr(m, "__path__", [])):
            if os.path.isdir(os.path.join(p, "lib")): print(os.path.join(p, "lib"))
    except Exception:
        pass
PY
)
    for d in $W; do LDP="$LDP:$d"; done
fi
export LD_LIBRARY_PATH="$LDP${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# section NAME SECONDS COMMAND...: run with a timeout, log to OUT/NAME.log, remember the status.
section() {
    local name=$1 secs=$2
    shift 2
    local t=$(date +%s)
    echo "==== $name (budget ${secs}s) ====" | tee "$OUT/$name.log"
    timeout -k 5 "$secs" bash -c "$*" >> "$OUT/$name.log" 2>&1
    local rc=$?
    cat "$OUT/$name.log" | tail -n +2
    local st=ok
    [ $rc -eq 77 ] && st=skipped
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && st=TIMEOUT
    [ $rc -ne 0 ] && [ "$st" = ok ] && st="FAIL(rc $rc)"
    ROWS+=("$(printf '%-6s %-12s %4ss  %s' "$name" "$st" "$(($(date +%s) - t))" \
        "$(grep -h '^SUMMARY' "$OUT/$name.log" | sed 's/^SUMMARY //' | paste -sd ';' -)")")
}

# ---- build when needed ----
if [ ! -x "$BIN/ditmoe-cuda-check" ]; then
    if command -v cmake > /dev/null && command -v nvcc > /dev/null; then
        section build 300 "cmake -S '$SRC' -B '$BUILD' -DCMAKE_BUILD_TYPE=Release -DDITMOE_CUDA=ON \
            -DCMAKE_CUDA_ARCHITECTURES=90 -DDITMOE_NATIVE=OFF && cmake --build '$BUILD' -j\$(nproc)"
    else
        echo "no $BIN/ditmoe-cuda-check and no cmake/nvcc to build it" | tee "$OUT/build.log"
        exit 1
    fi
fi
CHK="$BIN/ditmoe-cuda-check"

# ---- probe: machine, libraries, cuDNN plans, sm_90a ----
section probe 30 "nvidia-smi || true; echo; ldd '$CHK'; echo; \
    command -v compute-sanitizer && echo 'compute-sanitizer: present' || echo 'compute-sanitizer: absent'; \
    command -v cuobjdump > /dev/null && echo \"HGMMA instructions in ditmoe-cuda-check: \$(cuobjdump --dump-sass '$CHK' | grep -c HGMMA)\"; \
    '$CHK' --section probe"

# ---- ceilings: copy bandwidth, bf16 GEMM 8192^3 and every real GEMM shape ----
section ceil 40 "'$CHK' --section ceil"

# ---- ops: every kernel vs the CPU reference; the op table's rows; memcheck on small cases ----
OPS="'$BIN/test_cuda_ops'"
[ -x "$BIN/test_backend_ops" ] && OPS="$OPS; rc1=\$?; '$BIN/test_backend_ops' --backend cuda; rc2=\$?"
OPS="$OPS; command -v compute-sanitizer > /dev/null && compute-sanitizer --tool memcheck --error-exitcode 9 \
    '$BIN/test_cuda_ops' --op moe | tail -5; rc3=\$?; \
    command -v compute-sanitizer > /dev/null && compute-sanitizer --tool memcheck --error-exitcode 9 \
    '$BIN/test_cuda_ops' --op split | tail -5; \
    echo \"SUMMARY ops: \$(grep -c ' PASS' '$OUT/ops.log') PASS, \$(grep -c 'FAIL' '$OUT/ops.log') FAIL lines\"; \
    exit \$(( \${rc1:-0} | \${rc2:-0} ))"
section ops 140 "$OPS"

# ---- batch invariance through the op table ----
section inv 60 "'$CHK' --section inv"

# ---- end to end: shipped models, GPU vs CPU, and batch invariance of whole samples ----
cat > "$OUT/compare.py" << 'PY'
import sys, zlib, struct, numpy as np
def png(path):  # 8-bit grey/RGB PNG (what ditmoe writes), no interlace
    b = open(path, "rb").read(); pos = 8; w = h = ct = 0; data = b""
    while pos < len(b):
        n, typ = struct.unpack(">I4s", b[pos:pos + 8]); body = b[pos + 8:pos + 8 + n]; pos += 12 + n
        if typ == b"IHDR": w, h, _, ct = struct.unpack(">IIBB", body[:10])
        elif typ == b"IDAT": data += body
    ch = {0: 1, 2: 3, 6: 4, 4: 2}[ct]; raw = zlib.decompress(data); st = w * ch
    img = np.zeros((h, st), np.int32); prev = np.zeros(st, np.int32)
    for y in range(h):
        f = raw[y * (st + 1)]; line = np.frombuffer(raw[y * (st + 1) + 1:(y + 1) * (st + 1)], np.uint8).astype(np.int32)
        out = np.zeros(st, np.int32)
        for x in range(st):
            a = out[x - ch] if x >= ch else 0; c = prev[x - ch] if x >= ch else 0; up = prev[x]
            pr = {0: 0, 1: a, 2: up, 3: (a + up) // 2}.get(f)
            if f == 4:
                p = a + up - c; pa, pb, pc = abs(p - a), abs(p - up), abs(p - c)
                pr = a if pa <= pb and pa <= pc else (up if pb <= pc else c)
            out[x] = (line[x] + pr) & 255
        img[y] = out; prev = out
    return img
mode = sys.argv[1]
if mode == "latent":
    a, b = np.load(sys.argv[2]), np.load(sys.argv[3])
    rel = np.abs(a - b).max() / np.sqrt((b ** 2).mean())
    print(f"latents rel {rel:.3e} (max|gpu-cpu| / rms(cpu)); finite {np.isfinite(a).all()}")
elif mode == "psnr":
    worst = 99.0
    for pa, pb in zip(sys.argv[2::2], sys.argv[3::2]):
        x, y = png(pa).astype(np.float64), png(pb).astype(np.float64)
        mse = ((x - y) ** 2).mean(); p = 99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse)
        worst = min(worst, p)
    print(f"worst PSNR {worst:.1f} dB over {len(sys.argv[2::2])} images (goal >= 30)")
    sys.exit(0 if worst >= 30 else 1)
elif mode == "same":
    a, b = np.load(sys.argv[2]), np.load(sys.argv[3])
    eq = np.array_equal(a, b)
    print(f"latents batch {sys.argv[4]} vs batch {sys.argv[5]}: {'bitwise equal' if eq else 'DIFFERENT'}")
    sys.exit(0 if eq else 1)
PY
E2E="'$CHK' --section probe > /dev/null; [ \$? -eq 77 ] && { echo 'skipped: no CUDA device'; exit 77; }; \
    set -e; cd '$OUT'; S='$BIN/ditmoe-sample'; rc=0; for m in ditmoe promoe; do \
    M='$SRC/assets/'\$m'-fmnist.safetensors'; V='$SRC/assets/vae-fmnist.safetensors'; \
    for be in cpu cuda; do \$S --model \$M --vae \$V --class 1 -n 4 --steps 25 --seed 7 --backend \$be -q \
        --save-latent e2e_\${m}_\$be.npy -o e2e_\${m}_\${be}_%d.png; done; \
    '$PY' compare.py latent e2e_\${m}_cuda.npy e2e_\${m}_cpu.npy; \
    '$PY' compare.py psnr \$(for i in 0 1 2 3; do echo e2e_\${m}_cuda_\$i.png e2e_\${m}_cpu_\$i.png; done) || rc=1; \
    \$S --model \$M --vae \$V --class 1 -n 4 --steps 25 --seed 7 --backend cuda -q --batch 1 --save-latent b1_\$m.npy -o b1_\${m}_%d.png; \
    \$S --model \$M --vae \$V --class 1 -n 4 --steps 25 --seed 7 --backend cuda -q --batch 4 --save-latent b4_\$m.npy -o b4_\${m}_%d.png; \
    '$PY' compare.py same b1_\$m.npy b4_\$m.npy 1 4 || rc=1; done; \
    echo \"SUMMARY e2e: \$(grep -h 'worst PSNR' e2e.log 2> /dev/null | paste -sd ' / ' -)\"; exit \$rc"
section e2e 85 "$E2E"

# ---- lab: the MoE lab's split ops and stored int8 experts end to end (never run on a GPU yet,
# docs/gpu.md "Not yet run on a GPU"): --route top-p + --expert-cache through router_scores /
# moe_grouped / mlp_add, and a stored-int8 file (dequantised to bf16 on upload), GPU vs CPU ----
LAB="'$CHK' --section probe > /dev/null; [ \$? -eq 77 ] && { echo 'skipped: no CUDA device'; exit 77; }; \
    cd '$OUT'; S='$BIN/ditmoe-sample'; M='$SRC/assets/ditmoe-fmnist.safetensors'; \
    V='$SRC/assets/vae-fmnist.safetensors'; rc=0; \
    '$BIN/ditmoe-convert' \$M lab_int8.safetensors --quant-experts int8 || rc=1; \
    for be in cpu cuda; do \
        \$S --model \$M --vae \$V --class 1 -n 4 --steps 25 --seed 7 --backend \$be -q --route top-p=0.6 \
            --expert-cache 2 --save-latent lab_topp_\$be.npy -o lab_topp_\${be}_%d.png || rc=1; \
        \$S --model lab_int8.safetensors --vae \$V --class 1 -n 4 --steps 25 --seed 7 --backend \$be -q \
            --save-latent lab_int8_\$be.npy -o lab_int8_\${be}_%d.png || rc=1; done; \
    for x in topp int8; do '$PY' compare.py latent lab_\${x}_cuda.npy lab_\${x}_cpu.npy; \
        '$PY' compare.py psnr \$(for i in 0 1 2 3; do echo lab_\${x}_cuda_\$i.png lab_\${x}_cpu_\$i.png; done) \
            || { [ \$x = topp ] && rc=1; }; done; \
    echo \"SUMMARY lab: \$(grep -h 'worst PSNR' '$OUT/lab.log' | paste -sd ' / ' -) (top-p, int8)\"; exit \$rc"
section lab 25 "$LAB"

# ---- bench: one block's ops at XL/G shapes, and PyTorch eager on the same GPU ----
cat > "$OUT/torch_block.py" << 'PY'
# PyTorch eager reference of one DiT-MoE block (XL/2 @256 shapes, fp16, B2 = 64): adaLN modulate,
# qkv, SDPA with qk-norm, proj, gated residual, LN2, softmax top-2 router, per-expert SwiGLU
# (the reference implementation's loop over experts), shared expert, gated residual.
import torch, time, torch.nn.functional as F
torch.manual_seed(0); dev = "cuda"; dt = torch.float16
D, H, E, T, B2 = 1152, 16, 8, 256, 64; hd = D // H; Fe, Fs = 4 * D, 2 * D; N = B2 * T
lin = lambda o, i: (torch.randn(o, i, device=dev, dtype=dt) / i ** 0.5)
Wqkv, Wproj, Wg = lin(3 * D, D), lin(D, D), lin(E, D).float()
W1 = [lin(2 * Fe, D) for _ in range(E)]; W2 = [lin(D, Fe) for _ in range(E)]
S1, S2 = lin(2 * Fs, D), lin(D, Fs)
x = torch.randn(N, D, device=dev); mod = torch.randn(B2, 6, D, device=dev) * 0.1
def mlp(h, w1, w2):
    g, u = (h @ w1.t()).chunk(2, -1); return (F.silu(g) * u) @ w2.t()
def block(x):
    m = mod.repeat_interleave(T, 0)
    h = (F.layer_norm(x, (D,), eps=1e-6) * (1 + m[:, 1]) + m[:, 0]).to(dt)
    qkv = (h @ Wqkv.t()).view(B2, T, 3, H, hd)
    q, k, v = [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    q, k = F.layer_norm(q, (hd,), eps=1e-6), F.layer_norm(k, (hd,), eps=1e-6)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, D)
    x = x + m[:, 2] * (a @ Wproj.t()).float()
    h = F.layer_norm(x, (D,), eps=1e-6) * (1 + m[:, 4]) + m[:, 3]
    p = torch.softmax(h @ Wg.t(), -1); w, ids = p.topk(2, -1); h16 = h.to(dt)
    out = torch.zeros_like(x)
    for e in range(E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if len(tok): out.index_add_(0, tok, (mlp(h16[tok], W1[e], W2[e]).float() * w[tok, slot, None]))
    out = out + mlp(h16, S1, S2).float()
    return x + m[:, 5] * out
with torch.no_grad():
    for _ in range(3): block(x)
    torch.cuda.synchronize(); t = time.time(); n = 10
    for _ in range(n): block(x)
    torch.cuda.synchronize(); ms = (time.time() - t) / n * 1e3
fl = 2 * N * D * 4 * D + 4 * B2 * H * T * T * hd + 2 * N * 2 * 3 * D * Fe + 2 * N * 3 * D * Fs
print(f"[bench] PyTorch eager XL block B2 {B2} fp16: {ms:.3f} ms = {fl / ms / 1e9:.0f} TFLOP/s")
print(f"SUMMARY torch XL block B2 64: {ms:.3f} ms, {fl / ms / 1e9:.0f} TFLOP/s")
PY
section bench 100 "'$CHK' --section bench; rc=\$?; '$PY' '$OUT/torch_block.py' || echo 'PyTorch reference failed'; \
    ours=\$(grep -o 'XL/2 256px B2  64: block [0-9.]*' '$OUT/bench.log' | awk '{print \$NF}'); \
    theirs=\$(grep -o 'PyTorch eager XL block B2 64 fp16: [0-9.]*' '$OUT/bench.log' | awk '{print \$NF}'); \
    [ -n \"\$ours\" ] && [ -n \"\$theirs\" ] && echo \"SUMMARY ratio: ours / PyTorch eager (XL block, B2 64) = \$(python3 -c \"print(f'{\$theirs/\$ours:.2f}x faster')\")\"; exit \$rc"

# ---- summary ----
{
    echo
    echo "==== summary ($(($(date +%s) - T0)) s in all; logs in $OUT) ===="
    printf '%-6s %-12s %5s  %s\n' section status time "figures"
    for r in "${ROWS[@]}"; do echo "$r"; done
} | tee "$OUT/summary.txt"
