#!/usr/bin/env bash
# Installs every Debian package ditmoe needs to build, test and train. Idempotent.
set -euo pipefail
# clang + libclang-rt-dev: the sanitizer build with float-cast-overflow and libFuzzer
# (libclang_rt.fuzzer) for tests/fuzz; libomp-dev: OpenMP for clang builds.
pkgs=(build-essential cmake pkg-config clang libclang-rt-dev libomp-dev
      libopenblas-dev libopenblas0 libopenblas-openmp-dev libcjson-dev libpng-dev libstb-dev check
      python3-torch python3-numpy python3-matplotlib
      dataset-fashion-mnist openmpi-bin libopenmpi-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
