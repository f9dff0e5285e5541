"""An external reward model for `rlhf` (any language works; this one is Python, stdlib only).

Protocol (JSON lines over stdin/stdout, one request per line):
  request: {"id": 7, "episodes": [{"prompt": "...", "response": "...",
                                   "prompt_ids": [...], "response_ids": [...]}, ...]}
  reply:   {"id": 7, "scores": [0.3, ...]}      (one finite number per episode, same id)
Logs go to stderr; rlhf shows its tail if this process dies.

Run through the environment with:
  cargo run --release --example external_reward
"""
import json
import sys

for line in sys.stdin:
    request = json.loads(line)
    scores = []
    for ep in request["episodes"]:
        words = ep["response"].split()
        # reward distinct words, penalise very long responses
        scores.append(len(set(words)) - 0.05 * len(ep["response_ids"]))
    print(json.dumps({"id": request["id"], "scores": scores}), flush=True)
