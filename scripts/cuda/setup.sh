# Sourced by the GPU machine's scripts (device-check.sh, profile.sh) with $carry (what
# build.sh packed) and $out (a folder for the unpacked binaries) set: finds the CUDA 13
# libraries and exports LD_LIBRARY_PATH, recreates the NVRTC include folders dfdx's kernels
# name, and unpacks the binaries as $bin/rlhf and $bin/device-tests. Exits on failure.

# CUDA 13 libraries: system toolkit folders, then every nvidia wheel folder Python knows
# ($CUDA_LIBS: folders separated by colons or spaces)
dirs="$(printf '%s' "${CUDA_LIBS:-}" | tr ':' ' ') $(ls -d /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib 2>/dev/null)"
dirs="$dirs $(python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
seen = set()
for r in roots:
    for lib in glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True):
        if lib not in seen:
            seen.add(lib)
            print(lib)
PY
)"
libpath=""
for so in libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13; do
  found=""
  for d in $dirs; do
    if [ -e "$d/$so" ]; then found=$d; break; fi
  done
  if [ -z "$found" ]; then
    found=$(ldconfig -p 2>/dev/null | awk -v so="$so" '$1 == so { print $NF; exit }' | xargs -r dirname)
  fi
  if [ -z "$found" ]; then # last resort: any Python environment or toolkit on the machine
    found=$(find /usr /opt /root /home -maxdepth 9 -name "$so" 2>/dev/null | head -1 | xargs -r dirname)
  fi
  [ -n "$found" ] || { echo "device-check.sh: $so not found (searched: $dirs, ldconfig)" >&2; exit 1; }
  echo "$so: $found"
  case ":$libpath:" in *":$found:"*) ;; *) libpath="$libpath:$found" ;; esac
done
export LD_LIBRARY_PATH="${libpath#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# xz archives, with Python's lzma where the machine has no xz
unxz_to() { # file.xz destination
  if command -v xz > /dev/null; then xz -dc "$1" > "$2"; else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"
  fi
}
# the include folders dfdx's NVRTC kernels name by absolute path (see build.sh)
if [ ! -f /tmp/rlhf-cuda/toolkit/include/cuda_fp16.h ]; then
  mkdir -p /tmp/rlhf-cuda/toolkit &&
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$carry/nvrtc-include.tar.xz" /tmp/rlhf-cuda/toolkit || exit 1
fi
while read -r dir; do
  [ -f "$dir/cuda_utils.cuh" ] || { mkdir -p "$dir" && cp "$carry"/nvrtc-cuh/*.cuh "$dir/"; } || exit 1
done < "$carry/nvrtc-dirs.txt"

bin="$out/bin"
mkdir -p "$bin"
unxz_to "$carry/rlhf.xz" "$bin/rlhf" && unxz_to "$carry/device-tests.xz" "$bin/device-tests" || exit 1
chmod +x "$bin/rlhf" "$bin/device-tests"
if ldd "$bin/rlhf" | grep -q "not found"; then
  ldd "$bin/rlhf" >&2
  exit 1
fi
