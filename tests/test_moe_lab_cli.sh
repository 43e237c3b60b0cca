#!/usr/bin/env bash
# ditmoe-prune and ditmoe-routestats (docs/moe-lab.md) on the shipped DiT-MoE: a short sampled
# dump gives statistics and a pruning plan; every bad input exits 2 with one line naming the
# flag or file, and -o never leaves a file behind when it cannot write.
# Env: DITMOE_BIN (build/bin), DITMOE_SRC (source root), PYTHON (/usr/bin/python3 with numpy).
set -u
BIN=$(cd "${DITMOE_BIN:-build/bin}" && pwd)
SRC=${DITMOE_SRC:-$(cd "$(dirname "$0")/.." && pwd)}
PY=${PYTHON:-/usr/bin/python3}
MODEL="$SRC/assets/ditmoe-fmnist.safetensors"
T=$(mktemp -d /tmp/ditmoe-moe-lab.XXXXXX)
trap 'rm -rf "$T"' EXIT
fails=0
ok() { echo "ok   $1"; }
bad() { echo "FAIL $1"; fails=$((fails + 1)); }

# expect NAME RC PATTERN CMD...: exit code RC, stderr's last line matches PATTERN
expect() {
    local name=$1 want=$2 pat=$3; shift 3
    "$@" >"$T/stdout" 2>"$T/stderr"
    local rc=$?
    if [ "$rc" -eq "$want" ] && tail -n 1 "$T/stderr" | grep -q -- "$pat"; then ok "$name"
    else bad "$name (rc $rc, stderr: $(tail -n 1 "$T/stderr"))"; fi
}

"$BIN/ditmoe-sample" --model "$MODEL" --class 0,7 -n 2 --steps 6 --seed 3 --latent-only \
    --save-latent "$T/z.npy" --dump-routing "$T/r.dmr" -q || { echo "cannot sample"; exit 1; }

# statistics: valid JSON with the expected shapes and fractions in [0, 1]
if "$BIN/ditmoe-routestats" --bands 2 "$T/r.dmr" >"$T/s.json" &&
   "$PY" - "$T/s.json" <<'PYEOF'; then ok "routestats json"; else bad "routestats json"; fi
import json, sys
s = json.load(open(sys.argv[1]))
assert s["layers"] == 4 and s["experts"] == 8 and s["steps"] == 6 and s["rows"] == 4 * 6
assert len(s["affinity"]) == 3 and all(abs(sum(r) - 1) < 1e-3 for A in s["affinity"] for r in A)
assert len(s["persistence_bands"]) == 2
for b in s["persistence_bands"]:
    assert all(0 <= x <= 1 for x in b["set_kept"] + b["top1_kept"]) and b["mean_experts"] == [2.0] * 4
assert all(r[e][e] >= 0 for r in s["coactivation"] for e in range(8))
PYEOF
expect "routestats no dump" 2 "no DUMP" "$BIN/ditmoe-routestats"
expect "routestats bad flag" 2 "unknown flag '--x'" "$BIN/ditmoe-routestats" --x "$T/r.dmr"
printf 'DMROUTE1garbage' >"$T/bad.dmr"
expect "routestats corrupt dump" 2 "bad.dmr" "$BIN/ditmoe-routestats" "$T/bad.dmr"

# calibration probabilities: a small [L, M, E] array (softmax of random logits)
"$PY" -c "
import numpy as np, sys
rng = np.random.default_rng(0); x = rng.normal(size=(4, 600, 8)) * 2
p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
np.save(sys.argv[1], p.astype(np.float32)); np.save(sys.argv[2], p[:3].astype(np.float32))
" "$T/p.npy" "$T/p3.npy" || exit 1
if "$BIN/ditmoe-routestats" --probs "$T/p.npy" --steps 6 --route top-p=0.5 --route top-k >"$T/pol.json" &&
   "$PY" -c "
import json, sys; s = json.load(open(sys.argv[1]))
assert s['policies'][1]['mean_experts'] == [[2.0] * 5] * 4
assert all(1 <= x <= 8 for r in s['policies'][0]['mean_experts'] for x in r)
" "$T/pol.json"; then ok "routestats policies"; else bad "routestats policies"; fi
expect "routestats bad policy" 2 "P must be in (0, 1]" "$BIN/ditmoe-routestats" --probs "$T/p.npy" --steps 6 --route top-p=2
expect "routestats steps" 2 "does not divide" "$BIN/ditmoe-routestats" --probs "$T/p.npy" --steps 7 --route top-k

# pruning plan + report (no writer in this build, or a written model that loads)
"$BIN/ditmoe-prune" "$MODEL" --keep 6 --probs "$T/p.npy" --routes "$T/r.dmr" --report "$T/rep.json" 2>"$T/err"
if [ $? -eq 0 ] && "$PY" -c "
import json, sys; r = json.load(open(sys.argv[1]))
assert r['keep'] == 6 and len(r['layers']) == 4
for l in r['layers']:
    assert len(l['stun']) == 6 and len(l['exhaustive']) == 6 and l['exhaustive_lost_mass'] <= l['stun_lost_mass'] + 1e-12
" "$T/rep.json"; then ok "prune report"; else bad "prune report ($(tail -n 1 "$T/err"))"; fi
"$BIN/ditmoe-prune" "$MODEL" --keep 6 --probs "$T/p.npy" -o "$T/out.safetensors" 2>"$T/err"
rc=$?
if [ $rc -eq 0 ]; then
    if "$BIN/ditmoe-sample" --model "$T/out.safetensors" --class 1 --steps 3 --seed 1 --latent-only \
        --save-latent "$T/zp.npy" -q; then ok "pruned model samples"; else bad "pruned model samples"; fi
elif [ $rc -eq 1 ] && grep -q "no safetensors writer" "$T/err" && [ ! -e "$T/out.safetensors" ]; then
    ok "prune -o without a writer: exit 1, nothing written"
else bad "prune -o (rc $rc: $(tail -n 1 "$T/err"))"; fi
expect "prune keep < k" 2 "--keep 1: must be in \[top_k = 2, E = 8\]" "$BIN/ditmoe-prune" "$MODEL" --keep 1 --probs "$T/p.npy"
expect "prune keep > E" 2 "--keep 9: must be in" "$BIN/ditmoe-prune" "$MODEL" --keep 9 --probs "$T/p.npy"
expect "prune no keep" 2 "--keep N is required" "$BIN/ditmoe-prune" "$MODEL" --probs "$T/p.npy"
expect "prune exhaustive needs probs" 2 "needs --probs" "$BIN/ditmoe-prune" "$MODEL" --keep 6 --routes "$T/r.dmr"
expect "prune probs shape" 2 "p3.npy: shape \[3, 600, 8\], expected \[4, M, 8\]" "$BIN/ditmoe-prune" "$MODEL" --keep 6 --probs "$T/p3.npy"
expect "prune layers" 2 "--layers: pruning a subset" "$BIN/ditmoe-prune" "$MODEL" --keep 6 --layers 1
expect "prune promoe" 2 "DiT-MoE only" "$BIN/ditmoe-prune" "$SRC/assets/promoe-fmnist.safetensors" --keep 6 --probs "$T/p.npy"
expect "prune bad method" 2 "--method x: best, stun or exhaustive" "$BIN/ditmoe-prune" "$MODEL" --keep 6 --method x

[ $fails -eq 0 ] && echo "all passed" || echo "$fails failed"
exit $((fails > 0))
