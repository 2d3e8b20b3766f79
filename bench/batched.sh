#!/usr/bin/env bash
# Batched decoding of the engine vs llama.cpp's llama-batched-bench, same file, threads and lengths, one
# run: B sequences of PROMPT tokens prefilled together, then GEN steps of one token per sequence.
# Prints a markdown table of decode (tg) and total (all tokens / all time) tokens/s per B and the ratios.
#   bench/batched.sh [THREADS] [PROMPT] [GEN] [B,B,...] MODEL
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}; pp=${2:-16}; tg=${3:-32}; npl=${4:-1,8,32}; model=$5
cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
peer="$cache/llama.cpp/bin/llama-batched-bench"
[ -x "$peer" ] || scripts/build-llama-cpp.sh llama-batched-bench >&2
cargo build --release -p tessera-bench >&2
lb=$("$peer" -m "$model" -c 4096 -b 2048 -ub 512 -npp "$pp" -ntg "$tg" -npl "$npl" -t "$threads" 2>/dev/null | grep '^| *[0-9]')
ours=$(target/release/engine-bench "$model" -p "$pp" -n "$tg" -t "$threads" -r 1 --parallel "$npl")
echo "| B | llama.cpp tg tok/s | Tessera tg tok/s | ratio | llama.cpp total tok/s | Tessera total tok/s | ratio |"
echo "|---|---|---|---|---|---|---|"
for b in ${npl//,/ }; do
  # llama-batched-bench columns: PP TG B N_KV T_PP S_PP T_TG S_TG T S
  l=$(echo "$lb" | awk -F'|' -v b="$b" '$4+0==b {print $9+0, $11+0}')
  l_tg=${l% *}; l_tot=${l#* }
  t_tg=$(echo "$ours" | awk -v k="pl${b}_tg$tg" '$2==k {print $3}')
  t_tot=$(echo "$ours" | awk -v k="pl${b}_total" '$2==k {print $3}')
  printf '| %s | %.1f | %.1f | %.2f | %.1f | %.1f | %.2f |\n' "$b" "$l_tg" "$t_tg" "$(echo "$t_tg / $l_tg" | bc -l)" \
    "$l_tot" "$t_tot" "$(echo "$t_tot / $l_tot" | bc -l)"
done
