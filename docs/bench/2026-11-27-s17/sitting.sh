#!/usr/bin/env bash
# The script of sitting -s17 as it ran: every benchmark target of issues 3 and 6 in one
# sitting (train step, PPO in all four model/critic combinations, GRPO and RLOO), each Rust
# run interleaved with the Python stack's run of the same workload; also the rollout benchmark
# around bench_torch.py (which measures PyTorch's rollout). After the AVX-512 gemm and panel
# kernels (commit 96c29c2).
set -u
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
D=docs/bench/2026-11-27-s17
TAG=s17
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
rlhf train --workload $W --out "$D/rust_train_1.json"
rlhf rollout --workload $W --out "$D/rust_rollout_1.json"
peer "bench_torch_$TAG.json" bench_torch.py
rlhf train --workload $W --out "$D/rust_train_2.json"
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
