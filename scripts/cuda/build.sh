#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything scripts/cuda/device-check.sh runs on the GPU
# machine, and packs it into target/cuda-carry/ (ignored by git; pass it to the GPU machine):
#
#   rlhf.xz          the `rlhf` binary built with `--features cuda` (debug info stripped)
#   device-tests.xz  tests/device.rs built with `--features cuda` (its `cpu::` and `cuda::` tests)
#   shared/          the fixtures and workload those need (hf-gpt2-tiny, hf-llama-tiny,
#                    peers/workload.json), since the GPU machine has no ../shared
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
root=$PWD/target/cuda-toolkit
export PATH="$root/bin:$PATH" CUDA_ROOT="$root"
cargo build --release --features cuda --target-dir target/cuda --bin rlhf
test_bin=$(cargo test --release --features cuda --target-dir target/cuda --test device --no-run \
  --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "device" and m.get("executable"):
        print(m["executable"])')
[ -x "$test_bin" ] || { echo "build.sh: no device test binary" >&2; exit 1; }

out=target/cuda-carry
rm -rf "$out" && mkdir -p "$out/shared/fixtures" "$out/shared/peers"
for pair in "target/cuda/release/rlhf:rlhf" "$test_bin:device-tests"; do
  src=${pair%%:*} name=${pair##*:}
  objcopy --strip-debug "$src" "$out/$name"
  xz -T0 -6 "$out/$name"
done
cp -r "$shared/fixtures/hf-gpt2-tiny" "$shared/fixtures/hf-llama-tiny" "$out/shared/fixtures/"
cp "$shared/peers/workload.json" "$out/shared/peers/"
git rev-parse HEAD > "$out/COMMIT"
git status --porcelain | grep -q . && echo "(working tree had uncommitted changes)" >> "$out/COMMIT"
du -sh "$out"
readelf -d target/cuda/release/rlhf | grep NEEDED
