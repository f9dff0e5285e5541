#!/usr/bin/env bash
cd /work/main
W=../shared/peers/workload.json
echo "start $(date -u +%H:%M:%S) $(uptime)"
./target/release/rlhf bench rollout --workload $W --out /tmp/r_f32_a.json 2>&1 | grep "^rollout"
./target/release/rlhf bench rollout --workload $W --weights f16 --out /tmp/r_f16_a.json 2>&1 | grep "^rollout"
cd /work/shared/peers && PEER_RESULTS=/tmp/peer-results PEER_QUIET_WAIT=20 /tmp/peer-venv/bin/python bench_torch.py --out bench_torch_final.json 2>&1 | grep "^\[" 
cd /work/main
./target/release/rlhf bench rollout --workload $W --out /tmp/r_f32_b.json 2>&1 | grep "^rollout"
./target/release/rlhf bench rollout --workload $W --weights f16 --out /tmp/r_f16_b.json 2>&1 | grep "^rollout"
echo "end $(date -u +%H:%M:%S) $(uptime)"
