#!/usr/bin/env bash
# Tessera's engine vs llama.cpp's llama-bench on the same GGUF files, same threads and lengths, one run.
# Prints a markdown table of tokens/s (mean of the repetitions) and the ratio Tessera / llama.cpp.
#   bench/engine.sh [THREADS] [PROMPT] [GEN] MODEL...
# With BANDWIDTH=1 it also measures memory read bandwidth (engine-bench --bandwidth) and prints, per model,
# Tessera's decode as a fraction of the bandwidth bound (read GB/s / weight bytes read per token).
# llama-bench comes from scripts/build-llama-cpp.sh llama-bench (the llama-cpp-python 0.3.36 sdist).
# With ISA=avx2 both sides run what an AVX2-only server (Zen 2/3, Haswell-Broadwell) gets: llama-bench from
# the portable AVX2 build (ISA=avx2 scripts/build-llama-cpp.sh) and the engine with TESSERA_ISA=avx2.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}; pp=${2:-512}; tg=${3:-128}; shift 3 || true
cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
case "${ISA:-native}" in
  native) bin_dir="$cache/llama.cpp/bin" ;;
  avx2) bin_dir="$cache/llama.cpp/bin-avx2"; export TESSERA_ISA=avx2 ;;
  *) echo "ISA must be native or avx2" >&2; exit 2 ;;
esac
llama_bench="$bin_dir/llama-bench"
[ -x "$llama_bench" ] || scripts/build-llama-cpp.sh llama-bench >&2
cargo build --release -p tessera-bench >&2
ours=target/release/engine-bench
mean() { awk '{s+=$NF; n++} END {printf "%.1f", s/n}'; }
bound_notes=()
echo "| model | test | llama.cpp tok/s | Tessera tok/s | Tessera / llama.cpp |"
echo "|---|---|---|---|---|"
for m in "$@"; do
  lb=$("$llama_bench" -m "$m" -t "$threads" -p "$pp" -n "$tg" -r 3 -o csv 2>/dev/null)
  l_pp=$(echo "$lb" | awk -F, -v p="$pp" 'NR>1 && $0 ~ "\"" p "\",\"0\"" {gsub(/"/,"",$0); print}' | awk -F, '{print $(NF-1)}')
  l_tg=$(echo "$lb" | awk -F, -v g="$tg" 'NR>1 && $0 ~ "\"0\",\"" g "\"" {gsub(/"/,"",$0); print}' | awk -F, '{print $(NF-1)}')
  out=$("$ours" "$m" -p "$pp" -n "$tg" -t "$threads" -r 3 ${BANDWIDTH:+--bandwidth})
  t_pp=$(echo "$out" | awk -v k="pp$pp" '$2==k' | mean)
  t_tg=$(echo "$out" | awk -v k="tg$tg" '$2==k' | mean)
  name=$(basename "$m")
  printf '| %s | pp%s | %.1f | %s | %.2f |\n' "$name" "$pp" "$l_pp" "$t_pp" "$(echo "$t_pp / $l_pp" | bc -l)"
  printf '| %s | tg%s | %.1f | %s | %.2f |\n' "$name" "$tg" "$l_tg" "$t_tg" "$(echo "$t_tg / $l_tg" | bc -l)"
  if [ -n "${BANDWIDTH:-}" ]; then
    bw=$(echo "$out" | awk '$2=="read_bandwidth_GBps" {print $3}')
    bytes=$(echo "$out" | awk '$2=="weight_bytes_per_token" {print $3}')
    bound=$(echo "$bw * 1000000000 / $bytes" | bc -l)
    bound_notes+=("$(printf '%s: read bandwidth %.1f GB/s, %s weight bytes per token → bound %.1f tok/s; Tessera tg %s = %.0f%%, llama.cpp tg %.1f = %.0f%%' \
      "$name" "$bw" "$bytes" "$bound" "$t_tg" "$(echo "100 * $t_tg / $bound" | bc -l)" "$l_tg" "$(echo "100 * $l_tg / $bound" | bc -l)")")
  fi
done
for n in "${bound_notes[@]}"; do echo; echo "$n"; done
