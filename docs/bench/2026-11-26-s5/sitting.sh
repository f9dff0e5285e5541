#!/usr/bin/env bash
# One interleaved sitting: rlhf, then the Python stack, then rlhf again, per benchmark.
# Results land next to this script (raw JSON) and in sitting.log.
set -u
cd /work/main
W=../shared/peers/workload.json
D=docs/bench/2026-11-26-s5
PY="env PEER_RESULTS=/tmp/peer-results PEER_QUIET_WAIT=20 /tmp/peer-venv/bin/python"
echo "start $(date -u +%H:%M:%S) $(uptime)"
./target/release/rlhf bench train --workload $W --out $D/rust_train_1.json 2>&1 | grep -E "tok/s|s/iteration"
(cd ../shared/peers && $PY bench_torch.py --out bench_torch_s5.json 2>&1 | grep -E "^\[" ; cp /tmp/peer-results/bench_torch_s5.json /work/main/$D/ 2>/dev/null)
./target/release/rlhf bench train --workload $W --out $D/rust_train_2.json 2>&1 | grep -E "tok/s|s/iteration"
./target/release/rlhf bench ppo --workload $W --model tiny --value shared --out $D/rust_ppo_tiny_shared_1.json 2>&1 | grep -E "s/iteration"
(cd ../shared/peers && $PY ppo_torch.py --model tiny --value shared --out ppo_torch_tiny_shared_s5.json 2>&1 | tail -2; cp /tmp/peer-results/ppo_torch_tiny_shared_s5.json /work/main/$D/ 2>/dev/null)
./target/release/rlhf bench ppo --workload $W --model tiny --value shared --out $D/rust_ppo_tiny_shared_2.json 2>&1 | grep -E "s/iteration"
./target/release/rlhf bench grpo --workload $W --model tiny --algo grpo --out $D/rust_grpo_tiny_1.json 2>&1 | grep -E "s/iteration"
(cd ../shared/peers && $PY trl_grpo.py --trainer grpo --out trl_grpo_tiny_s5.json 2>&1 | tail -2; cp /tmp/peer-results/trl_grpo_tiny_s5.json /work/main/$D/ 2>/dev/null)
./target/release/rlhf bench grpo --workload $W --model tiny --algo grpo --out $D/rust_grpo_tiny_2.json 2>&1 | grep -E "s/iteration"
./target/release/rlhf bench grpo --workload $W --model tiny --algo rloo --out $D/rust_rloo_tiny_1.json 2>&1 | grep -E "s/iteration"
(cd ../shared/peers && $PY trl_grpo.py --trainer rloo --out trl_rloo_tiny_s5.json 2>&1 | tail -2; cp /tmp/peer-results/trl_rloo_tiny_s5.json /work/main/$D/ 2>/dev/null)
./target/release/rlhf bench grpo --workload $W --model tiny --algo rloo --out $D/rust_rloo_tiny_2.json 2>&1 | grep -E "s/iteration"
echo "end $(date -u +%H:%M:%S) $(uptime)"
