#!/usr/bin/env bash
# One interleaved benchmark sitting: rlhf, then the Python stack, then rlhf again, per
# benchmark. Usage: docs/bench/sitting.sh docs/bench/<date>-<tag>  (e.g. 2026-11-26-s5).
# Raw JSON of every run lands in that folder; its log goes to stdout (keep it as sitting.log).
# PEER_PYTHON: the Python with the peers' requirements (default /tmp/peer-venv/bin/python).
set -u
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
D=${1:?usage: docs/bench/sitting.sh <output folder>}
mkdir -p "$D"
TAG=${D##*-}
W=../shared/peers/workload.json
PY="env PEER_RESULTS=/tmp/peer-results PEER_QUIET_WAIT=20 ${PEER_PYTHON:-/tmp/peer-venv/bin/python}"
rlhf() { ./target/release/rlhf bench "$@" 2>&1 | grep -E "tok/s|s/iteration"; }
# runs a peer script in ../shared/peers and copies its result file into $D
peer() {
  local out=$1; shift
  (cd ../shared/peers && $PY "$@" --out "$out" 2>&1 | grep -E "^\[|median|wrote")
  cp "/tmp/peer-results/$out" "$D/" || echo "sitting: no result file $out"
}
echo "start $(date -u +%H:%M:%S) $(uptime)"
rlhf train --workload $W --out "$D/rust_train_1.json"
peer "bench_torch_$TAG.json" bench_torch.py
rlhf train --workload $W --out "$D/rust_train_2.json"
rlhf ppo --workload $W --model tiny --value shared --out "$D/rust_ppo_tiny_shared_1.json"
peer "ppo_torch_tiny_shared_$TAG.json" ppo_torch.py --model tiny --value shared
rlhf ppo --workload $W --model tiny --value shared --out "$D/rust_ppo_tiny_shared_2.json"
for algo in grpo rloo; do
  rlhf grpo --workload $W --model tiny --algo $algo --out "$D/rust_${algo}_tiny_1.json"
  peer "trl_${algo}_tiny_$TAG.json" trl_grpo.py --trainer $algo
  rlhf grpo --workload $W --model tiny --algo $algo --out "$D/rust_${algo}_tiny_2.json"
done
echo "end $(date -u +%H:%M:%S) $(uptime)"
