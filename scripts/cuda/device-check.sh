#!/usr/bin/env bash
# The GPU machine's check, in one go (a few minutes): what scripts/cuda/build.sh packed into
# target/cuda-carry/ is unpacked and run here.
#
#   1. facts: GPU, driver, CUDA, glibc, whether cargo exists (the build happens elsewhere)
#   2. the CUDA 13 libraries the binaries need (libnvrtc.so.13, libcublas.so.13,
#      libcublasLt.so.13), found in $CUDA_LIBS, the system toolkit, the Python environment's
#      wheels, ldconfig, or a search of /usr, /opt, /root and /home
#   3. tests/device.rs: every `cpu::` and `cuda::` test — fixture logits against transformers
#      and the CPU (1e-4) on hf-gpt2-tiny and hf-llama-tiny, training steps, PPO log-probs, the
#      KV-cached decode, generation, a PPO iteration and the pretrain stage against the CPU;
#      then `rlhf generate` (greedy) and `rlhf eval` on CUDA against the CPU
#   4. the workload's scoring, train-step, rollout and PPO-iteration benchmarks on the small
#      model, on CUDA and on 2 of this machine's cores; the rollout and PPO again with the
#      fused CUDA engine (`--rollout-engine fused`), and PPO with the host engine's rollout
#   5. a JSON summary on stdout and in $OUT/summary.json
#
# Usage (repository root, on the GPU machine): scripts/cuda/device-check.sh
# Writes logs and JSON under $OUT (default target/cuda-check). Through the session's device
# tool: run scripts/cuda/build.sh here first, then run `scripts/cuda/device-check.sh` there
# with carry ["target/cuda-carry"] (9 MB); $OUT comes back with the summary and the logs.
set -uo pipefail
cd "$(dirname "$0")/../.."
carry=target/cuda-carry
out=${OUT:-target/cuda-check}
mkdir -p "$out"
[ -f "$carry/rlhf.xz" ] || { echo "device-check.sh: no $carry (run scripts/cuda/build.sh and carry it)" >&2; exit 1; }

{
  echo "commit: $(cat "$carry/COMMIT")"
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
  nvidia-smi | head -4 | tail -2
  command -v nvcc >/dev/null && nvcc --version | tail -2
  ldd --version | head -1
  echo "cargo: $(command -v cargo || echo none)"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1
  nproc
} > "$out/facts.txt" 2>&1
cat "$out/facts.txt"

# 2. the CUDA libraries, the NVRTC headers and the binaries ($bin)
. scripts/cuda/setup.sh

# 3. the device-generic tests (CPU and CUDA), one process each, so that a test that aborts
#    (a CUDA error inside a panic) cannot hide the others
: > "$out/tests.log"
tests_rc=0
for t in $("$bin/device-tests" --list 2>/dev/null | sed -n 's/: test$//p'); do
  RLHF_SHARED="$carry/shared" RUST_BACKTRACE=1 timeout 120 "$bin/device-tests" --exact "$t" --test-threads 1 \
    >> "$out/tests.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    tests_rc=$rc
    grep -q "^test $t \.\.\. " "$out/tests.log" || echo "test $t ... FAILED (exit $rc)" >> "$out/tests.log"
  fi
done
grep -E "^test \S+ \.\.\. " "$out/tests.log"

# the CLI on CUDA against the CPU: greedy generation (same text) and eval (same loss)
fx="$carry/shared/fixtures/hf-gpt2-tiny"
printf 'The quick brown fox jumps over the lazy dog. %.0s' $(seq 40) > "$out/eval.txt"
for device in cpu cuda; do
  "$bin/rlhf" generate --model "$fx" --prompt "Hello there" --max-new-tokens 12 --greedy --device $device \
    > "$out/generate-$device.txt" 2>> "$out/cli.log"
  "$bin/rlhf" eval --model "$fx" --data "$out/eval.txt" --block 16 --device $device \
    > "$out/eval-$device.json" 2>> "$out/cli.log"
done

# 4. the workload's benchmarks on the small model: CUDA, then 2 CPU cores of this machine
w="$carry/shared/peers/workload.json"
run_bench() { # name device tag [extra args]: writes $out/$name-$device$tag.json
  local name=$1 device=$2 tag=$3
  shift 3
  timeout 150 "$bin/rlhf" bench "$name" --workload "$w" --model small --device "$device" --threads 2 "$@" \
    --out "$out/$name-$device$tag.json" > /dev/null 2>> "$out/bench.log" ||
    echo "bench $name$tag on $device failed" >> "$out/bench.log"
}
for device in cuda cpu; do
  run_bench scoring $device ""
  run_bench train $device ""
  run_bench rollout $device ""
  run_bench ppo $device "" --value shared
done
# the fused CUDA engine's rollout, alone and in PPO; PPO with the rollout on the host engine
run_bench rollout cuda -fused --rollout-engine fused
run_bench ppo cuda -fused --value shared --rollout-engine fused
run_bench ppo cuda -host-rollout --value shared --rollout-engine host
grep -v "^ \|^Stack\|^$" "$out/bench.log" | tail -n 40

# 5. summary
python3 - "$out" "$tests_rc" <<'PY' | tee "$out/summary.json"
import glob, json, os, re, sys
out, rc = sys.argv[1], int(sys.argv[2])
log = open(os.path.join(out, "tests.log")).read()
tests = {m[0]: m[1] for m in re.findall(r"^test (\S+) \.\.\. (\w+)", log, re.M)}
bench = {}
for f in sorted(glob.glob(os.path.join(out, "*-*.json"))):
    try:
        d = json.load(open(f))
    except ValueError:  # an empty file from a run that failed
        continue
    if "benchmark" not in d:  # eval-*.json
        continue
    for r in d["results"]:
        key = f"{d['benchmark']}/{r['model']}/{r['device']}"
        if "batch" in r:  # rollout
            bench[f"{key}/{r.get('rollout_engine', 'auto')}/b{r['batch']}"] = {"tokens_per_s": r["tokens_per_s"], "range": [r["tokens_per_s_min"], r["tokens_per_s_max"]]}
        elif "seconds" in r:  # PPO iteration
            bench[f"{key}/{r['value_model']}/{r['rollout_engine']}-rollout"] = {
                "seconds": r["seconds"], "range": r["range"], "phases": r["phases"]}
        else:
            bench[key] = {"tokens_per_s": r["tokens_per_s"], "range": r["range"]}
facts = open(os.path.join(out, "facts.txt")).read().splitlines()
def read(name):
    try:
        return open(os.path.join(out, name)).read()
    except OSError:
        return ""
def loss(name):
    try:
        return json.loads(read(name))["loss"]
    except (ValueError, KeyError):
        return None
cli = {
    "generate_cuda_equals_cpu": read("generate-cuda.txt") != "" and read("generate-cuda.txt") == read("generate-cpu.txt"),
    "eval_loss": {"cpu": loss("eval-cpu.json"), "cuda": loss("eval-cuda.json")},
}
print(json.dumps({"facts": facts, "tests_exit": rc, "tests": tests, "cli": cli, "bench": bench}, indent=1))
PY
