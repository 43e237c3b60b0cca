#!/bin/bash
# Regenerates samples/routing/ (docs/routing.md, "Findings"): samples N images per class from the
# default Fashion-MNIST model (assets/), dumps every evaluation's routing, and turns the dump
# into the three views, the overlay and the paper-style figures.
#   samples/routing/run.sh            # N=100 per class, seed 2024, into samples/routing/
# Env: DITMOE_BIN (default build/bin), N, SEED, WORK (scratch dir for the PNGs and the dump).
set -euo pipefail
SRC=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${DITMOE_BIN:-$SRC/build/bin}
OUT=$SRC/samples/routing
N=${N:-100}
SEED=${SEED:-2024}
WORK=${WORK:-$(mktemp -d /tmp/ditmoe-routing-XXXXXX)}
mkdir -p "$WORK"
"$BIN/ditmoe-sample" --class all -n "$N" --seed "$SEED" --batch 50 -v \
    -o "$WORK/img-%04d.png" --dump-routing "$WORK/routes.dmr"
# overlay: the first image of class 8 (bag), conditional half (the paper's view)
"$BIN/ditmoe-routes" -o "$OUT" --sample $((8 * N)) "$WORK/routes.dmr"
# the unconditional half of the same run, for comparison
"$BIN/ditmoe-routes" -o "$OUT/uncond" --uncond --sample $((8 * N)) "$WORK/routes.dmr"
/usr/bin/python3 "$SRC/tools/plot_routes.py" "$OUT/routes.json" -o "$OUT"
cp "$WORK/img-$(printf %04d $((8 * N))).png" "$OUT/overlay-source.png"
echo "dump and images kept in $WORK"
