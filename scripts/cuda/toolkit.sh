#!/usr/bin/env bash
# Builds a CUDA 13 toolkit root for `cargo build --features cuda` on a machine without CUDA or a
# GPU (the development machine), from NVIDIA's Python wheels:
#
#   <root>/bin/nvcc, ptxas …   nvidia-cuda-nvcc (+ nvidia-nvvm for cicc): dfdx's build script
#                               compiles its .cu kernels to PTX with them
#   <root>/bin/nvidia-smi       a stub that reports compute capability $CUDA_COMPUTE_CAP_DOTTED
#                               (default 9.0, H100/H200); dfdx's build script asks nvidia-smi
#   <root>/include              cuda.h and the runtime headers (nvidia-cuda-runtime, -cccl)
#   <root>/lib/libnvrtc.so …    unversioned links to the wheels' libnvrtc.so.13, libcublas.so.13,
#                               libcublasLt.so.13 (cudarc links against these names)
#   <root>/lib/libcuda.so       a stub with soname libcuda.so.1 exporting the driver API's names,
#                               generated from cudarc's bindings: it only satisfies the linker;
#                               at run time the GPU machine's driver provides libcuda.so.1
#
# Versions: 13.0 — the oldest CUDA 13. Its PTX (ISA 9.0) loads on any CUDA 13 driver, and the
# binary needs only the sonames libcuda.so.1, libnvrtc.so.13, libcublas.so.13 and
# libcublasLt.so.13 at run time, which the GPU machine's PyTorch environment carries.
#
# Usage: scripts/cuda/toolkit.sh [ROOT]   (default target/cuda-toolkit; idempotent)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(realpath -m "${1:-target/cuda-toolkit}")
cuda_version=${CUDA_WHEEL_VERSION:-13.0.88}
cublas_version=${CUBLAS_WHEEL_VERSION:-13.0.2.14}
cap=${CUDA_COMPUTE_CAP_DOTTED:-9.0}

if [ ! -x "$root/venv/bin/python" ]; then
  python3 -m venv "$root/venv"
fi
"$root/venv/bin/pip" install -q --disable-pip-version-check \
  "nvidia-cuda-nvcc==$cuda_version" "nvidia-nvvm==$cuda_version" \
  "nvidia-cuda-runtime==$cuda_version" "nvidia-cuda-nvrtc==$cuda_version" \
  "nvidia-cuda-cccl==${CCCL_WHEEL_VERSION:-13.0.85}" "nvidia-cublas==$cublas_version"
wheels=$(echo "$root"/venv/lib/python3*/site-packages/nvidia/cu13)
[ -x "$wheels/bin/nvcc" ] || { echo "toolkit.sh: no nvcc under $wheels" >&2; exit 1; }

mkdir -p "$root/bin" "$root/lib"
ln -sfn "$wheels/include" "$root/include"
for tool in "$wheels"/bin/*; do ln -sfn "$tool" "$root/bin/"; done
# nvcc finds cicc and libdevice through the path it was called by (nvcc.profile: TOP = bin/..),
# so the root needs the wheel's nvvm folder beside bin.
[ -d "$wheels/nvvm" ] || { echo "toolkit.sh: no nvvm under $wheels (nvidia-nvvm)" >&2; exit 1; }
ln -sfn "$wheels/nvvm" "$root/nvvm"
for lib in nvrtc cublas cublasLt; do
  so=$(ls "$wheels"/lib/lib$lib.so.* | grep -E "lib$lib\.so\.[0-9]+$" | head -1)
  ln -sfn "$so" "$root/lib/lib$lib.so"
done

cat > "$root/bin/nvidia-smi" <<SMI
#!/bin/sh
# Stub for dfdx's build script (toolkit.sh): reports the target GPU's compute capability.
case "\$*" in
  *compute_cap*) printf 'compute_cap\n$cap\n' ;;
  *) echo "stub nvidia-smi (scripts/cuda/toolkit.sh): no GPU on this machine" >&2; exit 1 ;;
esac
SMI
chmod +x "$root/bin/nvidia-smi"

# The driver stub: every cu* function cudarc declares, each returning CUDA_ERROR_STUB_LIBRARY (34).
sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.9.*/src/driver/sys.rs | tail -1)
grep -o 'pub fn cu[A-Za-z0-9_]*' "$sys" | sed 's/pub fn //' | sort -u |
  awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$root/lib/cuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/libcuda.so" "$root/lib/cuda_stub.c"
echo "CUDA toolkit root: $root ($("$root/bin/nvcc" --version | tail -1))"
