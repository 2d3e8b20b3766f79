#!/usr/bin/env bash
# Serving throughput: `tessera serve` against llama.cpp's `llama-server` on the same GGUF and threads, through
# the same client (bench/serving_client.py): C concurrent streaming completions for C in STREAMS, each with its
# own ~PROMPT-word prompt and GEN greedy tokens (end-of-generation tokens banned on both, so both generate the
# same number of tokens). Prints, per server, one JSON line per C: aggregate generated tokens/s, time to first
# token, and the tokens counted.
#   bench/serving.sh [THREADS] [PROMPT] [GEN] [STREAMS] MODEL
# llama-server: scripts/build-llama-cpp.sh llama-server (from the llama-cpp-python 0.3.36 sdist, as every
# other peer number in bench/RESULTS.md). It gets STREAMS' largest C slots (-np) with PROMPT+GEN+64 positions
# each; Tessera serves with its defaults (continuous batching up to 64 sequences).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}; prompt=${2:-16}; gen=${3:-32}; streams=${4:-1,8,32}; model=$5
cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
server="$cache/llama.cpp/bin/llama-server"
[ -x "$server" ] || { echo "no $server: run scripts/build-llama-cpp.sh llama-server" >&2; exit 1; }
cargo build --release -p tessera >&2
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT

# End-of-generation ids from the file's metadata (the official gguf package).
ban=$(python3 - "$model" <<'EOF'
import sys, gguf
r = gguf.GGUFReader(sys.argv[1])
ids = set()
for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
    f = r.fields.get(key)
    if f is not None:
        ids.add(int(f.parts[f.data[0]][0]))
print(",".join(str(i) for i in sorted(ids)))
EOF
)
max_c=$(echo "$streams" | tr ',' '\n' | sort -n | tail -1)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "model $(basename "$model"), threads $threads, ~$prompt-word prompts, $gen tokens, streams $streams, banned ids $ban" >&2
date -u +"%Y-%m-%d %H:%M UTC" >&2

run_client() {
  python3 bench/serving_client.py --url "$1" --prompt "$prompt" --gen "$gen" --streams "$streams" --ban "$ban"
}

echo "# llama-server -np $max_c -c $((max_c * (prompt + gen + 64))) -t $threads"
"$server" -m "$model" --host 127.0.0.1 --port "$port" -t "$threads" -tb "$threads" \
  -np "$max_c" -c $((max_c * (prompt + gen + 64))) -b 2048 -ub 512 >"$dir/llama.log" 2>&1 &
pid=$!
for _ in $(seq 1200); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$dir/llama.log" >&2; exit 1; }
  sleep 0.1
done
run_client "http://127.0.0.1:$port"
kill "$pid"; wait "$pid" 2>/dev/null || true

echo "# tessera serve --threads $threads"
target/release/tessera serve "$model" --threads "$threads" --http 127.0.0.1:0 --grpc off \
  --ctx $((prompt + gen + 64)) --addr-file "$dir/addr" 2>"$dir/tessera.log" &
pid=$!
for _ in $(seq 1200); do [ -s "$dir/addr" ] && break; sleep 0.1; done
http=$(sed -n 's/^http=//p' "$dir/addr")
run_client "http://$http"
kill "$pid"; wait "$pid" 2>/dev/null || true
