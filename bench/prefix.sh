#!/usr/bin/env bash
# Prompt-prefix reuse: the second turn of a conversation through `tessera serve`, with the finished first
# turn's KV caches kept (--prefix-cache-tokens 8192) and without (0). One run each, same binary, file and
# threads: turn 1 is a PROMPT-token completion of GEN tokens; turn 2 sends turn 1's prompt and answer plus a
# short follow-up and asks for 1 token, so its time is the prefill (time to first token). The peer, when
# built (scripts/build-llama-cpp.sh llama-server), runs the same two requests first: llama.cpp's server keeps
# a slot's prompt cache by default (`cache_prompt`), one slot, the same threads. With FOLLOW=prompt turn 2
# leaves out the answer (turn 1's prompt plus the follow-up: a shared preamble, an edited regenerate), so
# every server reuses the same tokens; the answers of two engines differ in their last bits and so retokenize
# differently.
#   [FOLLOW=answer|prompt] bench/prefix.sh [THREADS] [PROMPT] [GEN] MODEL
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}; prompt=${2:-1500}; gen=${3:-32}; model=$4
server="${TESSERA_CACHE:-$HOME/.cache/tessera}/llama.cpp/bin/llama-server"
cargo build --release -p tessera >&2
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
runs="0 8192"
[ -x "$server" ] && runs="llama.cpp $runs"
for keep in $runs; do
  if [ "$keep" = llama.cpp ]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$server" -m "$model" --host 127.0.0.1 --port "$port" -t "$threads" -tb "$threads" -np 1 -c 4096 \
      >"$dir/log.llama" 2>&1 &
    pid=$!
    for _ in $(seq 1200); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.1; done
    http=127.0.0.1:$port
  else
    target/release/tessera serve "$model" --threads "$threads" --http 127.0.0.1:0 --grpc off \
      --prefix-cache-tokens "$keep" --addr-file "$dir/addr" 2>"$dir/log.$keep" &
    pid=$!
    for _ in $(seq 600); do [ -s "$dir/addr" ] && break; sleep 0.1; done
    http=$(sed -n 's/^http=//p' "$dir/addr")
  fi
  python3 - "$http" "$prompt" "$gen" "$keep" "${FOLLOW:-answer}" <<'EOF'
import json, sys, time, urllib.request
addr, n_prompt, gen, keep, follow = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def post(body):
    req = urllib.request.Request(f"http://{addr}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req) as r:
        out = json.load(r)
    return out, time.perf_counter() - t
# About n_prompt tokens of plain English (the same text for both runs).
words = "the river runs past old mills and quiet fields where farmers talk about weather and prices".split()
text = " ".join(words[i % len(words)] for i in range(n_prompt))
first, t1 = post({"prompt": text, "max_tokens": gen, "temperature": 0})
n1 = first["usage"]["prompt_tokens"]
answer = first["choices"][0]["text"] if follow == "answer" else ""
second, t2 = post({"prompt": text + answer + " What happened next?",
                   "max_tokens": 1, "temperature": 0})
n2 = second["usage"]["prompt_tokens"]
# Both servers report the prompt tokens they reused as OpenAI's prompt_tokens_details.cached_tokens.
cached = (second["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
print(f"| {keep} | {n1} | {t1:.2f} | {n2} | {cached} | {t2:.3f} | {n2 / t2:.0f} |")
EOF
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -f "$dir/addr"
done
