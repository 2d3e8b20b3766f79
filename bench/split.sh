#!/usr/bin/env bash
# shard-tool split throughput against `cp` of the same bytes on the same disk, and peak RSS of split under a
# memory limit smaller than the checkpoint. One run of each, same cache state (caches dropped before each, and
# each timing includes the final `sync`, so both are measured to the disk).
#
# usage: bench/split.sh [SHAPE] [LAYERS] [QUANT] [TP] [PP] [MEM_LIMIT_MIB]
#   defaults: llama3-8b 8 Q8_0 2 2 1024  (a ~3 GB checkpoint split under a 1 GiB cgroup limit)
# needs root for drop_caches and the cgroup-v1 memory controller; prints a markdown table row.
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-llama3-8b}; layers=${2:-8}; quant=${3:-Q8_0}; tp=${4:-2}; pp=${5:-2}; limit_mib=${6:-1024}
work=${BENCH_DIR:-$HOME/.cache/tessera/bench}
mkdir -p "$work"
cargo build --release -p shard-tool >&2
bin=$PWD/target/release/shard-tool
src="$work/synth-$shape-$layers-$quant.gguf"
[ -f "$src" ] || "$bin" synth --shape "$shape" --layers "$layers" --quant "$quant" -o "$src" >&2
bytes=$(stat -c %s "$src")

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
secs() { local t0 t1; t0=$(date +%s.%N); "$@"; sync; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }

rm -rf "$work/cp-copy" "$work/split-out"
drop
cp_s=$(secs cp "$src" "$work/cp-copy")
rm -f "$work/cp-copy"

# A cgroup-v1 memory limit for the split process: page cache is charged too but is reclaimable; anonymous
# memory above the limit would be OOM-killed.
cg=/sys/fs/cgroup/memory/tessera-bench-split
mkdir -p "$cg"
echo $((limit_mib * 1024 * 1024)) > "$cg/memory.limit_in_bytes"
echo 0 > "$cg/memory.max_usage_in_bytes" 2>/dev/null || true
drop
run_split() {
  sh -c "echo \$\$ > $cg/cgroup.procs; exec /usr/bin/time -f '%M' -o '$work/split.rss' '$bin' split '$src' --tp $tp --pp $pp -o '$work/split-out' --force --quiet >&2"
}
split_s=$(secs run_split)
rss_kib=$(tail -n 1 "$work/split.rss")
out_bytes=$(du -sb "$work/split-out" | cut -f1)
"$bin" verify "$work/split-out" >&2
rmdir "$cg" 2>/dev/null || true
rm -rf "$work/split-out"

gbs() { echo "scale=3; $1 / $2 / 1000000000" | bc -l; }
echo "| checkpoint | bytes | cp s | cp GB/s | split s | split GB/s | split/cp | peak RSS MiB | limit MiB |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '| %s %s layers %s, tp=%s pp=%s | %s | %.2f | %s | %.2f | %s | %.2f | %d | %d |\n' \
  "$shape" "$layers" "$quant" "$tp" "$pp" "$bytes" "$cp_s" "$(gbs "$bytes" "$cp_s")" "$split_s" \
  "$(gbs "$out_bytes" "$split_s")" "$(echo "($out_bytes / $split_s) / ($bytes / $cp_s)" | bc -l)" $((rss_kib / 1024)) "$limit_mib"
