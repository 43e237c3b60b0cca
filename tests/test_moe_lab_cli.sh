#!/usr/bin/env bash
# The MoE lab's programs (docs/moe-lab.md) on the shipped DiT-MoE:
#  - ditmoe-routes --affinity --persistence on a short sampled dump: routes.json's affinity,
#    co-activation, persistence and experts-per-token equal a NumPy recount of the dump parsed
#    here from the byte layout (docs/routing.md), affinity.png is written; --policies on
#    synthetic router probabilities;
#  - ditmoe-prune: a plan and report; a model pruned in every layer and one pruned in layers 0, 1
#    only load and sample; the latter's forward equals the PyTorch reference of the ORIGINAL model
#    with the dropped experts' router logits at -inf in those layers (and differs from the
#    unpruned one), and its routing dump keeps ids below each layer's expert count; the same
#    equality for a pruned ProMoE (prototype scores at -inf, the unconditional expert kept);
#  - every bad input exits 2 with one line naming the flag or file; -o never leaves a file
#    behind when it cannot write.
# Env: DITMOE_BIN (build/bin), DITMOE_SRC (source root), PYTHON (/usr/bin/python3 with torch).
set -u
BIN=$(cd "${DITMOE_BIN:-build/bin}" && pwd)
SRC=${DITMOE_SRC:-$(cd "$(dirname "$0")/.." && pwd)}
PY=${PYTHON:-/usr/bin/python3}
MODEL="$SRC/assets/ditmoe-fmnist.safetensors"
PROMOE="$SRC/assets/promoe-fmnist.safetensors"
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

# A dump reader of our own (docs/routing.md), for the recounts below.
cat >"$T/dump.py" <<'PYEOF'
import json, os, struct, subprocess
import numpy as np

def parse_dump(path):
    b = open(path, "rb").read()
    assert b[:8] == b"DMROUTE1"
    off, ln = struct.unpack_from("<QQ", b, 8)
    sh = json.loads(b[off:off + ln].decode())["shape"]
    Lm, k, Tn = sh["layers"], sh["top_k"], sh["grid"][0] * sh["grid"][1]
    idt = np.uint8 if sh["id_dtype"] == "u8" else np.uint16
    recs, pos = [], 24
    while pos < off:
        tag, batch, ev, step, R, flags, payload = struct.unpack_from("<6IQ", b, pos)
        rows = [struct.unpack_from("<qiifI", b, pos + 32 + 24 * r) for r in range(R)]
        q = pos + 32 + 24 * R
        ids = np.frombuffer(b, idt, Lm * R * Tn * k, q).astype(np.int64)
        ids[ids == np.iinfo(idt).max] = -1
        recs.append(dict(batch=batch, step=step, image=[r[0] for r in rows],
                         uncond=[r[4] for r in rows], ids=ids.reshape(Lm, R, Tn, k)))
        pos += 32 + payload
    return sh, recs

def forward_inputs(T, cfg, seed, t_lo, t_hi, B=6):
    """Random x, t in [t_lo, t_hi], labels incl. the null class, saved as T/{x,t,y}.npy."""
    rng = np.random.default_rng(seed)
    S = cfg["input_size"]
    x = rng.normal(size=(B, cfg["in_channels"], S, S)).astype(np.float32)
    t = rng.uniform(t_lo, t_hi, size=B).astype(np.float32)
    y = np.array([0, 3, 5, 7, 9, cfg["num_classes"]], np.int64)
    for n, a in (("x", x), ("t", t), ("y", y)):
        np.save(os.path.join(T, n + ".npy"), a)
    return x, t, y

def c_forward(T, model):
    """ditmoe-forward of model on T/{x,t,y}.npy."""
    out = os.path.join(T, "f.npy")
    subprocess.run([os.path.join(os.environ.get("DITMOE_BIN", "build/bin"), "ditmoe-forward"),
                    "--model", model, "--x", os.path.join(T, "x.npy"), "--t", os.path.join(T, "t.npy"),
                    "--y", os.path.join(T, "y.npy"), "--out", out, "-q"], check=True)
    return np.load(out)
PYEOF

# --- ditmoe-routes --affinity --persistence: the lab's keys equal a recount
if "$BIN/ditmoe-routes" -q -o "$T/v" --affinity --persistence --bands 2 "$T/r.dmr" &&
   "$PY" - "$T/v/routes.json" "$T/r.dmr" "$T" <<'PYEOF'; then ok "routes --affinity --persistence = recount"; else bad "routes --affinity --persistence = recount"; fi
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[3])
from dump import parse_dump
s = json.load(open(sys.argv[1]))
sh, recs = parse_dump(sys.argv[2])
Lm, E, k, S = sh["layers"], sh["experts"], sh["top_k"], 6
assert Lm == 4 and E == 8 and s["steps"] == S and s["bands"] == 2
aff = np.zeros((Lm - 1, E, E)); co = np.zeros((Lm, E, E), int)
keep = np.zeros((Lm, S)); comp = np.zeros((Lm, S)); prev = {}
for rec in recs:
    for r, unc in enumerate(rec["uncond"]):
        if unc:
            continue
        ids = rec["ids"][:, r]                                    # [Lm, T, k]
        for l in range(Lm):
            for t in range(ids.shape[1]):
                for e in ids[l, t]:
                    co[l, e, ids[l, t]] += 1
                    if l + 1 < Lm:
                        for f in ids[l + 1, t]:
                            aff[l, e, f] += 1
        key = (rec["batch"], rec["image"][r])
        if key in prev and prev[key][0] == rec["step"] - 1:
            for l in range(Lm):
                same = [set(a) == set(b) for a, b in zip(ids[l], prev[key][1][l])]
                keep[l, rec["step"]] += sum(same); comp[l, rec["step"]] += len(same)
        prev[key] = (rec["step"], ids)
p = aff / aff.sum(2, keepdims=True)
assert np.abs(np.array(s["affinity"]) - p).max() < 1e-4
assert all(abs(sum(r) - 1) < 1e-3 for A in s["affinity"] for r in A)
assert (np.array(s["coactivation"]) == co).all()
assert np.abs(np.array(s["set_kept_by_step"]) - keep[:, 1:] / comp[:, 1:]).max() < 1e-4
b0 = s["persistence_bands"][0]                                  # steps 1..2 of 1..5
assert b0["steps"] == [1, 2] and abs(b0["set_kept"][0] - keep[0, 1:3].sum() / comp[0, 1:3].sum()) < 1e-4
assert all(0 <= x <= 1 for b in s["persistence_bands"] for x in b["set_kept"] + b["top1_kept"])
assert s["persistence_bands"][1]["mean_experts"] == [2.0] * 4 and len(s["mean_experts_by_step"][0]) == S
PYEOF
if [ -s "$T/v/affinity.png" ] && [ -s "$T/v/class_expert.png" ]; then ok "affinity.png"; else bad "affinity.png"; fi
"$BIN/ditmoe-routes" -q --no-png -o "$T/v0" "$T/r.dmr"
if [ ! -e "$T/v0/affinity.png" ] && ! grep -q '"affinity"\|"set_kept_by_step"' "$T/v0/routes.json"; then
    ok "no lab keys without the flags"; else bad "no lab keys without the flags"; fi
expect "routes no dump" 2 "no dump given" "$BIN/ditmoe-routes" -o "$T/v1"
expect "routes bad flag" 2 "unknown flag '--x'" "$BIN/ditmoe-routes" --x "$T/r.dmr"
printf 'DMROUTE1garbage' >"$T/bad.dmr"
expect "routes corrupt dump" 2 "bad.dmr" "$BIN/ditmoe-routes" -o "$T/v1" --affinity "$T/bad.dmr"

# --- --policies: calibration probabilities, a small [L, M, E] array (softmax of random logits)
"$PY" -c "
import numpy as np, sys
rng = np.random.default_rng(0); x = rng.normal(size=(4, 600, 8)) * 2
p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
np.save(sys.argv[1], p.astype(np.float32)); np.save(sys.argv[2], p[:3].astype(np.float32))
" "$T/p.npy" "$T/p3.npy" || exit 1
if "$BIN/ditmoe-routes" -q -o "$T/pol" --policies "$T/p.npy" --steps 6 --route top-p=0.5 --route top-k &&
   "$PY" -c "
import json, sys
import numpy as np
s = json.load(open(sys.argv[1])); p = np.load(sys.argv[2])
assert s['policies'][1]['mean_experts'] == [[2.0] * 5] * 4
# top-p=0.5: the shortest prefix of the sorted probabilities whose sum exceeds 0.5
c = np.cumsum(-np.sort(-p, -1), -1); n = (c <= 0.5).sum(-1) + 1      # [L, M]
want = [n[l].reshape(6, 100).mean(1) for l in range(4)]
for l in range(4):
    for b in range(5):
        s0, s1 = 6 * b // 5, 6 * (b + 1) // 5
        assert abs(s['policies'][0]['mean_experts'][l][b] - want[l][s0:s1].mean()) < 1e-9
" "$T/pol/policies.json" "$T/p.npy"; then ok "routes --policies"; else bad "routes --policies"; fi
expect "routes bad policy" 2 "P must be in (0, 1]" "$BIN/ditmoe-routes" -o "$T/pol" --policies "$T/p.npy" --steps 6 --route top-p=2
expect "routes policy steps" 2 "--steps 7 does not divide" "$BIN/ditmoe-routes" -o "$T/pol" --policies "$T/p.npy" --steps 7 --route top-k
expect "routes policies no route" 2 "needs at least one --route" "$BIN/ditmoe-routes" -o "$T/pol" --policies "$T/p.npy" --steps 6
expect "routes route without policies" 2 "go with --policies" "$BIN/ditmoe-routes" -o "$T/pol" --route top-k "$T/r.dmr"

# --- ditmoe-prune: plan + report
"$BIN/ditmoe-prune" "$MODEL" --keep 6 --probs "$T/p.npy" --routes "$T/r.dmr" --report "$T/rep.json" 2>"$T/err"
if [ $? -eq 0 ] && "$PY" -c "
import json, sys; r = json.load(open(sys.argv[1]))
assert r['keep'] == 6 and len(r['layers']) == 4
for l in r['layers']:
    assert l['pruned'] and len(l['stun']) == 6 and len(l['exhaustive']) == 6 and l['exhaustive_lost_mass'] <= l['stun_lost_mass'] + 1e-12
" "$T/rep.json"; then ok "prune report"; else bad "prune report ($(tail -n 1 "$T/err"))"; fi
if "$BIN/ditmoe-prune" "$MODEL" --keep 6 --probs "$T/p.npy" -o "$T/out.safetensors" 2>"$T/err" &&
   "$BIN/ditmoe-sample" --model "$T/out.safetensors" --class 1 --steps 3 --seed 1 --latent-only \
       --save-latent "$T/zp.npy" -q; then ok "pruned model samples"; else bad "pruned model samples ($(tail -n 1 "$T/err"))"; fi

# --- --layers 0,1: only those layers pruned; forward = original with their logits at -inf
if "$BIN/ditmoe-prune" "$MODEL" --keep 6 --layers 0,1 --probs "$T/p.npy" --report "$T/rep2.json" \
       -o "$T/some.safetensors" 2>"$T/err" &&
   "$PY" - "$SRC" "$T" <<'PYEOF'; then ok "prune --layers 0,1: forward = masked original"; else bad "prune --layers 0,1: forward = masked original ($(tail -n 1 "$T/err"))"; fi
import json, os, subprocess, sys
import numpy as np
import torch
src, T = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(src, "tools", "eval"))
import shipped, safetensors_io
_, meta = safetensors_io.read(os.path.join(T, "some.safetensors"))
cfg = json.loads(meta["ditmoe"])
kept = cfg["pruned"]["kept"]
assert cfg["num_experts"] == 8 and [len(k) for k in kept] == [6, 6, 8, 8], cfg["pruned"]
sys.path.insert(0, T)
import dump
x, t, y = dump.forward_inputs(T, cfg, 5, 0.05, 0.95)
B = len(y)
def c_forward(model):
    return dump.c_forward(T, model)
dit, _ = shipped.load_dit(os.path.join(src, "assets", "ditmoe-fmnist.safetensors"))
def masked(l):
    def hook(_m, _i, out):
        m = torch.full((out.shape[-1],), float("-inf"))
        m[kept[l]] = 0
        return out + m
    return hook
with torch.no_grad():
    ref0 = dit(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    hs = [dit.blocks[l].moe.gate.register_forward_hook(masked(l)) for l in (0, 1)]
    ref = dit(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    for h in hs:
        h.remove()
pruned = c_forward(os.path.join(T, "some.safetensors"))
orig = c_forward(os.path.join(src, "assets", "ditmoe-fmnist.safetensors"))
tol = 1e-4 * np.sqrt((ref ** 2).mean())          # the C-vs-PyTorch parity tolerance
d, d0, dd = np.abs(pruned - ref).max(), np.abs(orig - ref0).max(), np.abs(pruned - orig).max()
print(f"  pruned vs masked reference {d:.3g}, original vs reference {d0:.3g}, pruned vs original {dd:.3g}, tol {tol:.3g}")
assert d <= tol and d0 <= tol and dd > 100 * tol
PYEOF
# its routing dump: E = 8 in the header, ids below 6 in layers 0, 1, experts 6, 7 used in 2, 3
if "$BIN/ditmoe-sample" --model "$T/some.safetensors" --class 0,4 -n 2 --steps 4 --seed 2 --latent-only \
       --save-latent "$T/zs.npy" --dump-routing "$T/some.dmr" -q &&
   "$BIN/ditmoe-routes" -q --no-png --affinity -o "$T/vs" "$T/some.dmr" &&
   "$PY" -c "
import json, sys; import numpy as np
s = json.load(open(sys.argv[1])); c = np.array(s['class_expert'])    # [Lm, C, 8]
assert s['routed_experts'] == 8 and c[:2, :, 6:].sum() == 0 and c[2:, :, 6:].sum() > 0
assert np.array(s['affinity'])[0][:, 6:].sum() == 0
" "$T/vs/routes.json"; then ok "pruned-layers dump"; else bad "pruned-layers dump"; fi

# --- ProMoE (token choice): prototypes dropped, the unconditional expert kept; forward = the
# PyTorch reference of the original with the dropped prototypes' scores at -inf
"$PY" -c "
import numpy as np, sys
np.save(sys.argv[1], np.random.default_rng(1).uniform(-0.6, 0.9, size=(2, 600, 8)).astype(np.float32))
" "$T/pc.npy" || exit 1
"$BIN/ditmoe-sample" --model "$PROMOE" --class 2,5 -n 2 --steps 4 --seed 3 --latent-only \
    --save-latent "$T/zq.npy" --dump-routing "$T/q.dmr" -q || { echo "cannot sample ProMoE"; exit 1; }
if "$BIN/ditmoe-prune" "$PROMOE" --keep 6 --probs "$T/pc.npy" --routes "$T/q.dmr" --lambda 1 \
       -o "$T/promoe6.safetensors" 2>"$T/err" &&
   "$PY" - "$SRC" "$T" <<'PYEOF'; then ok "prune ProMoE: forward = masked original"; else bad "prune ProMoE: forward = masked original ($(tail -n 1 "$T/err"))"; fi
import json, os, subprocess, sys
import numpy as np
import torch
src, T = sys.argv[1], sys.argv[2]
for d in (("tests", "ref"), ("tools",)):
    sys.path.insert(0, os.path.join(src, *d))
import promoe_ref, safetensors_io
def load(path):
    t, meta = safetensors_io.read(path)
    cfg = json.loads(meta["ditmoe"])
    m = promoe_ref.ProMoE(**promoe_ref.config_from_metadata(cfg))
    m.load_state_dict({k: v.float() for k, v in t.items()}, strict=True)
    return m.eval(), cfg
_, cfg = load(os.path.join(T, "promoe6.safetensors"))
kept = cfg["pruned"]["kept"]
assert cfg["num_experts"] == 6 and [len(k) for k in kept] == [6, 6], cfg["pruned"]
dit, c0 = load(os.path.join(src, "assets", "promoe-fmnist.safetensors"))
sys.path.insert(0, T)
import dump
x, t, y = dump.forward_inputs(T, c0, 6, 50, 950)
B = len(y)
def c_forward(model):
    return dump.c_forward(T, model)
moe = [b.mlp for b in dit.blocks if isinstance(b.mlp, promoe_ref.ProtoMoE)]
assert len(moe) == 2
with torch.no_grad():
    ref0 = dit(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    for l, m in enumerate(moe):
        mask = torch.full((8,), float("-inf"))
        mask[kept[l]] = 0
        m.scores = (lambda f, mk: (lambda h: f(h) + mk))(m.scores, mask)
    ref = dit(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
pruned = c_forward(os.path.join(T, "promoe6.safetensors"))
orig = c_forward(os.path.join(src, "assets", "promoe-fmnist.safetensors"))
tol = 1e-4 * np.sqrt((ref ** 2).mean())
d, d0, dd = np.abs(pruned - ref).max(), np.abs(orig - ref0).max(), np.abs(pruned - orig).max()
print(f"  ProMoE: pruned vs masked reference {d:.3g}, original vs reference {d0:.3g}, pruned vs original {dd:.3g}, tol {tol:.3g}")
assert d <= tol and d0 <= tol and dd > 100 * tol
PYEOF

expect "prune a per-layer pruned model" 2 "blocks.0.moe.gate.weight has 6 experts, not num_experts = 8" "$BIN/ditmoe-prune" "$T/some.safetensors" --keep 4 --probs "$T/p.npy"
expect "prune keep < k" 2 "--keep 1: must be in \[top_k = 2, E = 8\]" "$BIN/ditmoe-prune" "$MODEL" --keep 1 --probs "$T/p.npy"
expect "prune keep > E" 2 "--keep 9: must be in" "$BIN/ditmoe-prune" "$MODEL" --keep 9 --probs "$T/p.npy"
expect "prune no keep" 2 "--keep N is required" "$BIN/ditmoe-prune" "$MODEL" --probs "$T/p.npy"
expect "prune exhaustive needs probs" 2 "needs --probs" "$BIN/ditmoe-prune" "$MODEL" --keep 6 --routes "$T/r.dmr"
expect "prune probs shape" 2 "p3.npy: shape \[3, 600, 8\], expected \[4, M, 8\]" "$BIN/ditmoe-prune" "$MODEL" --keep 6 --probs "$T/p3.npy"
expect "prune unknown layer" 2 "--layers '1,4': layer 4 does not exist (depth 4: 0..3)" "$BIN/ditmoe-prune" "$MODEL" --keep 6 --probs "$T/p.npy" --layers 1,4
expect "prune bad layers" 2 "--layers 'x': expected 'all'" "$BIN/ditmoe-prune" "$MODEL" --keep 6 --probs "$T/p.npy" --layers x
expect "prune layer twice" 2 "layer 1 given twice" "$BIN/ditmoe-prune" "$MODEL" --keep 6 --probs "$T/p.npy" --layers 1,1
expect "prune promoe probs shape" 2 "expected \[2, M, 8\]" "$BIN/ditmoe-prune" "$PROMOE" --keep 6 --probs "$T/p.npy"
expect "prune promoe --layers" 2 "ProMoE layers must keep the same number" "$BIN/ditmoe-prune" "$PROMOE" --keep 6 --probs "$T/pc.npy" --layers 1
expect "prune promoe dense block" 2 "block 2 has no routed experts" "$BIN/ditmoe-prune" "$PROMOE" --keep 6 --probs "$T/pc.npy" --layers 2
expect "prune bad method" 2 "--method x: best, stun or exhaustive" "$BIN/ditmoe-prune" "$MODEL" --keep 6 --method x
expect "prune unwritable -o" 1 "nodir" "$BIN/ditmoe-prune" "$MODEL" --keep 6 --probs "$T/p.npy" -o "$T/nodir/x.safetensors"
expect "prune unwritable --report" 1 "nodir" "$BIN/ditmoe-prune" "$MODEL" --keep 6 --probs "$T/p.npy" --report "$T/nodir/r.json"
if [ ! -e "$T/nodir" ]; then ok "nothing left behind"; else bad "nothing left behind"; fi

[ $fails -eq 0 ] && echo "all passed" || echo "$fails failed"
exit $((fails > 0))
