#!/usr/bin/env bash
# The script of sitting -s14 as it ran (GRPO and RLOO interleaved with TRL, then PPO with a
# separate critic and the small model with PyTorch); sitting.sh one level up is the full sitting.
set -u
cd /work/main
D=docs/bench/2026-11-27-s14
TAG=s14
mkdir -p $D
W=../shared/peers/workload.json
PY="env PEER_RESULTS=/tmp/peer-results PEER_QUIET_WAIT=20 /tmp/peer-venv/bin/python"
rlhf() { ./target/release/rlhf bench "$@" 2>&1 | grep -E "tok/s|s/iteration"; }
peer() {
  local out=$1; shift
  (cd ../shared/peers && $PY "$@" --out "$out" 2>&1 | grep -E "^\[|median|wrote")
  cp "/tmp/peer-results/$out" "$D/" || echo "sitting: no result file $out"
}
echo "start $(date -u +%H:%M:%S) $(uptime)"
for algo in grpo rloo; do
  rlhf grpo --workload $W --model tiny --algo $algo --out "$D/rust_${algo}_tiny_1.json"
  peer "trl_${algo}_tiny_$TAG.json" trl_grpo.py --trainer $algo
  rlhf grpo --workload $W --model tiny --algo $algo --out "$D/rust_${algo}_tiny_2.json"
done
rlhf ppo --workload $W --model tiny --value separate --out "$D/rust_ppo_tiny_separate_1.json"
peer "ppo_torch_tiny_separate_$TAG.json" ppo_torch.py --model tiny --value separate
rlhf ppo --workload $W --model tiny --value separate --out "$D/rust_ppo_tiny_separate_2.json"
rlhf ppo --workload $W --model small --value shared --out "$D/rust_ppo_small_shared_1.json"
peer "ppo_torch_small_shared_$TAG.json" ppo_torch.py --model small --value shared
echo "end $(date -u +%H:%M:%S) $(uptime)"
