#!/usr/bin/env bash
# Fresh Debian machine -> an image from the default model. Usage: bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)"
build/bin/ditmoe-sample --class sneaker --steps 50 -o sneaker.png
echo "wrote $(pwd)/sneaker.png"
