#!/usr/bin/env bash
# One interleaved benchmark sitting: rlhf, then the Python stack, then rlhf again, per
# benchmark — the training step, scoring forward and rollout (around bench_torch.py), PPO
# for both models with both critics, GRPO and RLOO. Usage: docs/bench/sitting.sh docs/bench/<date>-<tag>
# (e.g. 2026-11-27-s17). Raw JSON of every run lands in that folder; its log goes to stdout
# (keep it as sitting.log). About 10 minutes on a quiet Zen 5 host.
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
rlhf scoring --workload $W --out "$D/rust_scoring_1.json"
rlhf rollout --workload $W --out "$D/rust_rollout_1.json"
peer "bench_torch_$TAG.json" bench_torch.py
rlhf train --workload $W --out "$D/rust_train_2.json"
rlhf scoring --workload $W --out "$D/rust_scoring_2.json"
rlhf rollout --workload $W --out "$D/rust_rollout_2.json"
for model in tiny small; do
  for value in shared separate; do
    rlhf ppo --workload $W --model $model --value $value --out "$D/rust_ppo_${model}_${value}_1.json"
    peer "ppo_torch_${model}_${value}_$TAG.json" ppo_torch.py --model $model --value $value
    rlhf ppo --workload $W --model $model --value $value --out "$D/rust_ppo_${model}_${value}_2.json"
  done
done
for algo in grpo rloo; do
  rlhf grpo --workload $W --model tiny --algo $algo --out "$D/rust_${algo}_tiny_1.json"
  peer "trl_${algo}_tiny_$TAG.json" trl_grpo.py --trainer $algo
  rlhf grpo --workload $W --model tiny --algo $algo --out "$D/rust_${algo}_tiny_2.json"
done
echo "end $(date -u +%H:%M:%S) $(uptime)"
