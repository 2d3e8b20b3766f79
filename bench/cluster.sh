#!/usr/bin/env bash
# Cluster costs and gains (issue 4), one run, printed as markdown:
#  - decode ms/token of the single process (THREADS threads) vs a TP=2 cluster of two worker processes
#    (THREADS/2 threads each) on MODEL, and the mean all-reduce time rank 0 saw during that decode;
#  - aggregate generated tokens/s with 1, 8 and 32 concurrent greedy requests on the TP=2 cluster;
#  - the all-reduce round trip itself over TCP peer links on loopback (two ranks, no model);
#  - the same concurrent-stream shape on the engine alone, in one process with THREADS threads
#    (engine-bench --parallel): the scaling the cluster could reach with free transport.
#   bench/cluster.sh [MODEL] [THREADS]
# Default MODEL: the bandwidth-bound synthetic llama3-1b Q4_K_M (scripts/prepare-engine-models.sh --bench).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
model=${1:-$cache/models/synth-llama3-1b.Q4_K_M.gguf}
threads=${2:-2}
[ -f "$model" ] || scripts/prepare-engine-models.sh --bench >&2
cargo build --release -p tessera -p tessera-bench >&2
cargo build --release -p tessera-worker --example peer_latency >&2
echo "date: $(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
target/release/cluster-bench "$model" -t "$threads" -p 32 -n 64 --streams 1,8,32 --stream-tokens 32 \
  --tessera target/release/tessera --work-dir target/cluster-bench
target/release/examples/peer_latency 20000
echo "engine alone (one process, $threads threads), 16-token prompts then 32 tokens per sequence, tok/s:"
target/release/engine-bench "$model" -t "$threads" -p 16 -n 32 -r 1 --parallel 1,8,32
