#!/usr/bin/env bash
# Push/pull throughput to a local S3-compatible server (moto on loopback),
# for a sealed store and an unsealed one (CKPT_UNSEALED=1, the control) of
# the same program, alternating, next to a raw local disk copy of the same
# pack bytes. Needs root (drops the page cache), a release build and
# moto_server (pip install 'moto[server]').
# Usage: bash scripts/bench_s3.sh [HEAP_MIB] [ROUNDS]   (default 512, 2)
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-512}
ROUNDS=${2:-2}
T=${CARGO_TARGET_DIR:-$PWD/target}/release
PROG=$(find "$T/build" -path '*ckpt-tests-*/counter_heap' -type f | head -1)
[ -x "$PROG" ] || { echo "build the workspace first (cargo build --release --workspace)" >&2; exit 1; }
W=$(mktemp -d /tmp/ckpt-bench-s3.XXXXXX)
MOTO=
trap '[ -n "$MOTO" ] && kill $MOTO 2>/dev/null; rm -rf "$W"' EXIT

# One checkpoint of the program into store $1 (sealed, or unsealed if $2=1).
make_store() {
  local dir=$W/$1
  mkdir -p "$dir"
  (
    export CKPT_STORE=file://$dir/store CKPT_COORD=unix:$dir/c.sock
    [ "$2" = 1 ] && export CKPT_UNSEALED=1
    (cd "$dir" && exec "$T/ckpt" launch -- "$PROG" -t 100 -m "$MIB" >"$dir/prog.out" 2>&1) &
    sleep 3
    "$T/ckpt" checkpoint >/dev/null
    "$T/ckpt" kill >/dev/null || true
    "$T/ckpt" quit || true
  )
  echo "$1: pack bytes $(du -sb "$dir/store/packs" | cut -f1)"
}
make_store sealed 0
make_store unsealed 1

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$PORT" >"$W/moto.log" 2>&1 &
MOTO=$!
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT))" 2>/dev/null && break; sleep 0.1; done
python3 -c "
import socket; s=socket.create_connection(('127.0.0.1',$PORT))
s.sendall(b'PUT /bench HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n'); s.recv(100)"
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=k AWS_SECRET_ACCESS_KEY=s AWS_REGION=us-east-1

cold() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
# Seconds taken by "$@".
timed() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); python3 -c "print(f'{$e-$s:.2f}')"; }

: >"$W/times"
for r in $(seq "$ROUNDS"); do
  for kind in sealed unsealed; do
    dir=$W/$kind
    url=s3://bench/$kind-$r
    export CKPT_STORE=file://$dir/store CKPT_S3_CACHE=$dir/cache-$r
    cold; push=$(timed "$T/ckpt" push "$url")
    again=$(timed "$T/ckpt" push "$url")
    cold; pull=$(timed "$T/ckpt" pull "$url" --store "$dir/pulled-$r")
    echo "$kind $r push $push again $again pull $pull" | tee -a "$W/times"
  done
done
cold
s=$(date +%s.%N); cp -r "$W/sealed/store/packs" "$W/cpcopy"; sync; e=$(date +%s.%N)
python3 - "$W/times" "$(du -sb "$W/cpcopy" | cut -f1)" "$s" "$e" <<'EOF'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
raw_bytes, t = int(sys.argv[2]), float(sys.argv[4]) - float(sys.argv[3])
print(f"raw local copy (cp -r + sync, cold cache): {raw_bytes/1e6:.1f} MB in {t:.2f}s ({raw_bytes/1e6/t:.1f} MB/s)\n")
med = {}
for kind in ("sealed", "unsealed"):
    for op in ("push", "again", "pull"):
        med[kind, op] = statistics.median(float(r[r.index(op) + 1]) for r in rows if r[0] == kind)
print("| operation | sealed s | unsealed s | sealed / unsealed |")
print("|---|---|---|---|")
for op, name in (("push", "push to moto"), ("again", "push again, nothing missing"), ("pull", "pull from moto")):
    a, b = med["sealed", op], med["unsealed", op]
    print(f"| {name} | {a:.2f} | {b:.2f} | {a/b:.2f} |")
EOF
