"""A JSON-lines reward process for CommandReward tests. Mode from argv[1]:
ok (score = number of 'a' in the response + 0.5 * len(response_ids)), crash, hang, count,
nan, malformed, wrong_id; pgid (score 1 when the process leads its own process group)."""
import json
import math
import os
import sys
import time

mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
for line in sys.stdin:
    req = json.loads(line)
    eps = req["episodes"]
    scores = [ep["response"].count("a") + 0.5 * len(ep["response_ids"]) for ep in eps]
    if mode == "crash":
        print("reward server: simulated failure on request %d" % req["id"], file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "hang":
        time.sleep(60)
    if mode == "pgid":
        scores = [float(os.getpgrp() == os.getpid())] * len(eps)
    if mode == "count":
        scores = scores[:-1]
    if mode == "nan":
        scores[0] = math.nan
    rid = req["id"] + 1 if mode == "wrong_id" else req["id"]
    if mode == "malformed":
        print("{not json", flush=True)
        continue
    # json.dumps writes NaN as the bare token NaN (not JSON): what a careless script sends
    print(json.dumps({"id": rid, "scores": scores}), flush=True)
