#!/usr/bin/env bash
# Tessera's engine vs llama.cpp's llama-bench on the same GGUF files, same threads and lengths, one run.
# Prints a markdown table of tokens/s (mean of the repetitions) and the ratio Tessera / llama.cpp.
#   bench/engine.sh [THREADS] [PROMPT] [GEN] MODEL...
# llama-bench comes from scripts/build-llama-cpp.sh llama-bench (the llama-cpp-python 0.3.36 sdist).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}; pp=${2:-512}; tg=${3:-128}; shift 3 || true
cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
llama_bench="$cache/llama.cpp/bin/llama-bench"
[ -x "$llama_bench" ] || scripts/build-llama-cpp.sh llama-bench >&2
cargo build --release -p tessera-bench >&2
ours=target/release/engine-bench
mean() { awk '{s+=$NF; n++} END {printf "%.1f", s/n}'; }
echo "| model | test | llama.cpp tok/s | Tessera tok/s | Tessera / llama.cpp |"
echo "|---|---|---|---|---|"
for m in "$@"; do
  lb=$("$llama_bench" -m "$m" -t "$threads" -p "$pp" -n "$tg" -r 3 -o csv 2>/dev/null)
  l_pp=$(echo "$lb" | awk -F, -v p="$pp" 'NR>1 && $0 ~ "\"" p "\",\"0\"" {gsub(/"/,"",$0); print}' | awk -F, '{print $(NF-1)}')
  l_tg=$(echo "$lb" | awk -F, -v g="$tg" 'NR>1 && $0 ~ "\"0\",\"" g "\"" {gsub(/"/,"",$0); print}' | awk -F, '{print $(NF-1)}')
  out=$("$ours" "$m" -p "$pp" -n "$tg" -t "$threads" -r 3)
  t_pp=$(echo "$out" | awk -v k="pp$pp" '$2==k' | mean)
  t_tg=$(echo "$out" | awk -v k="tg$tg" '$2==k' | mean)
  name=$(basename "$m")
  printf '| %s | pp%s | %.1f | %s | %.2f |\n' "$name" "$pp" "$l_pp" "$t_pp" "$(echo "$t_pp / $l_pp" | bc -l)"
  printf '| %s | tg%s | %.1f | %s | %.2f |\n' "$name" "$tg" "$l_tg" "$t_tg" "$(echo "$t_tg / $l_tg" | bc -l)"
done
