#!/usr/bin/env bash
# Builds emulate_kernels.cpp against our two kernel files (the fused engine's kernels.cu and
# optim_kernels.cu) and runs it: the kernels on the CPU (one thread per CUDA thread) against
# plain loops. Needs only g++ (C++20). build.sh
# runs it before packing anything for a GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the one rewrite: the dynamic shared array becomes a pointer into the emulator's buffer
sed 's/extern __shared__ float \([a-z_]*\)\[\];/float *\1 = dyn_smem;/' \
  policies/src/cuda_engine/kernels.cu > "$tmp/kernels.cu"
grep -q 'extern __shared__' "$tmp/kernels.cu" && { echo "emulate_kernels.sh: a dynamic shared array the rewrite missed" >&2; exit 1; }
g++ -std=c++20 -O1 -pthread -DKERNELS="\"$tmp/kernels.cu\"" \
  -DOPTIM_KERNELS="\"$PWD/policies/src/optim_kernels.cu\"" -o "$tmp/emulate" scripts/cuda/emulate_kernels.cpp
"$tmp/emulate"
