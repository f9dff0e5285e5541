#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything scripts/cuda/device-check.sh runs on the GPU
# machine, and packs it into target/cuda-carry/ (ignored by git; pass it to the GPU machine):
#
#   rlhf.xz          the `rlhf` binary built with `--features cuda` (debug info stripped)
#   device-tests.xz  tests/device.rs built with `--features cuda` (its `cpu::` and `cuda::` tests)
#   shared/          the fixtures and workload those need (hf-gpt2-tiny, hf-llama-tiny,
#                    peers/workload.json), since the GPU machine has no ../shared
#   nvrtc-*          the headers dfdx's run-time (NVRTC) kernels include, and where
#
# The toolkit comes from scripts/cuda/toolkit.sh (NVIDIA's CUDA 13.0 wheels, a stub
# nvidia-smi and a stub libcuda for the linker). The binaries need libcuda.so.1 (the driver),
# libnvrtc.so.13 and libcublas.so.13 (with libcublasLt.so.13) at run time; device-check.sh
# finds them on the GPU machine.
#
# Usage: scripts/cuda/build.sh   (from anywhere; ~3 min from scratch on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
shared=${RLHF_SHARED:-../shared}
scripts/cuda/toolkit.sh
# dfdx compiles some kernels at run time with NVRTC, #including "cuda_fp16.h" from the build's
# $CUDA_ROOT/include and "cuda_utils.cuh" from its build-script OUT_DIR: absolute paths baked
# into the binary. Both live under /tmp/rlhf-cuda, which device-check.sh recreates on the GPU
# machine from the packed headers (any machine can write /tmp).
stage=/tmp/rlhf-cuda
mkdir -p "$stage"
ln -sfn "$PWD/target/cuda-toolkit" "$stage/toolkit"
export PATH="$stage/toolkit/bin:$PATH" CUDA_ROOT="$stage/toolkit"
target=$stage/target
# our kernels (the fused engine's, the gradient norm's): on the CPU against plain loops, then
# through NVRTC as at run time (no GPU)
scripts/cuda/emulate_kernels.sh
nvrtc=$(find "$stage/toolkit/" -name libnvrtc.so.13 | head -1)
for cu in policies/src/cuda_engine/kernels.cu policies/src/optim_kernels.cu; do
  LD_LIBRARY_PATH="$(dirname "$nvrtc")" python3 scripts/cuda/nvrtc_check.py "$nvrtc" "$cu"
done
cargo build --release --features cuda --target-dir "$target" --bin rlhf
test_bin=$(cargo test --release --features cuda --target-dir "$target" --test device --no-run \
  --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "device" and m.get("executable"):
        print(m["executable"])')
[ -x "$test_bin" ] || { echo "build.sh: no device test binary" >&2; exit 1; }

out=target/cuda-carry
rm -rf "$out" && mkdir -p "$out/shared/fixtures" "$out/shared/peers"
for pair in "$target/release/rlhf:rlhf" "$test_bin:device-tests"; do
  src=${pair%%:*} name=${pair##*:}
  objcopy --strip-debug "$src" "$out/$name"
  xz -T0 -6 "$out/$name"
done
# NVRTC's include folders, as device-check.sh must recreate them
tar -chJf "$out/nvrtc-include.tar.xz" -C "$stage/toolkit" include
for dir in "$target"/release/build/dfdx-*/out; do
  [ -f "$dir/cuda_utils.cuh" ] && echo "$dir" >> "$out/nvrtc-dirs.txt"
done
mkdir -p "$out/nvrtc-cuh"
cp "$(head -1 "$out/nvrtc-dirs.txt")"/*.cuh "$out/nvrtc-cuh/"
cp -r "$shared/fixtures/hf-gpt2-tiny" "$shared/fixtures/hf-llama-tiny" "$out/shared/fixtures/"
cp "$shared/peers/workload.json" "$out/shared/peers/"
git rev-parse HEAD > "$out/COMMIT"
git status --porcelain | grep -q . && echo "(working tree had uncommitted changes)" >> "$out/COMMIT"
du -sh "$out"
readelf -d "$target/release/rlhf" | grep NEEDED
