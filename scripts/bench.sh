#!/usr/bin/env bash
# Every benchmark of issue 13, one after the other, each printing its
# figures next to the ceilings it measured in the same run (memcpy, disk
# write with fsync and read, BLAKE3, zstd at the level used, decompression).
# Output goes to stdout and to bench-results/DATE.txt; the sections of
# BENCHMARKS.md are made from it. The headline figures (issue 13's targets)
# also go to bench-results/DATE.figures.jsonl, and the run ends with a table
# of each next to its ceiling, its target and the same figure of the run
# BENCHMARKS.md shows (benches/baseline.jsonl). To make this run the one
# BENCHMARKS.md shows: paste its sections there and
#   cp bench-results/DATE.figures.jsonl benches/baseline.jsonl Run it on a quiet machine: the figures
# are ratios to ceilings of the same run, and a loaded machine moves them.
#
#   scripts/bench.sh            # 1 GiB, as the issue's targets
#   MIB=256 scripts/bench.sh    # smaller, quicker
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${MIB:-1024}
BLOBS=${BLOBS:-10000000}
cargo build --release --workspace --quiet
mkdir -p bench-results
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
out="bench-results/$stamp.txt"
export CKPT_BENCH_FIGURES="$PWD/bench-results/$stamp.figures.jsonl"
run() {
  echo "== $*" | tee -a "$out"
  "target/release/$@" 2>&1 | tee -a "$out"
}
run bench-full --mib "$MIB"                 # first (full) checkpoint, idle and 1% incremental
run bench-incremental --mib "$MIB"          # incremental checkpoints per backend
run bench-stop --mib "$MIB"                 # downtime: stopping threads, one large process
run bench-trees                             # many processes: downtime and cost per process
run bench-restart --mib "$MIB" --lazy-mib $((MIB * 4))   # restart, eager and lazy
run bench-catalog --blobs "$BLOBS"          # the catalog at scale
run bench-seal --mib "$MIB"                 # sealed vs unsealed store, same run (issue 14)
echo "== figures vs the previous run (benches/baseline.jsonl)" | tee -a "$out"
target/release/bench-compare benches/baseline.jsonl "$CKPT_BENCH_FIGURES" | tee -a "$out"
echo "results in $out, figures in $CKPT_BENCH_FIGURES"
