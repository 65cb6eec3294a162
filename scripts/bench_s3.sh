#!/usr/bin/env bash
# Push/pull throughput to a local S3-compatible server (moto on loopback)
# next to a raw local disk copy of the same pack bytes. Needs root (drops the
# page cache), a release build and moto_server (pip install 'moto[server]').
# Usage: bash scripts/bench_s3.sh [HEAP_MIB]   (default 512)
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-512}
T=${CARGO_TARGET_DIR:-$PWD/target}/release
PROG=$(find "$T/build" -path '*ckpt-tests-*/counter_heap' -type f | head -1)
[ -x "$PROG" ] || { echo "build the workspace first (cargo build --release --workspace)" >&2; exit 1; }
W=$(mktemp -d /tmp/ckpt-bench-s3.XXXXXX)
export CKPT_STORE=file://$W/store CKPT_COORD=unix:$W/c.sock
(cd "$W" && exec "$T/ckpt" launch -- "$PROG" -t 100 -m "$MIB" >"$W/prog.out" 2>&1) &
sleep 3
"$T/ckpt" checkpoint >/dev/null
"$T/ckpt" kill >/dev/null || true
"$T/ckpt" quit || true
echo "pack bytes: $(du -sb "$W/store/packs" | cut -f1)"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$PORT" >"$W/moto.log" 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null; rm -rf "$W"' EXIT
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT))" 2>/dev/null && break; sleep 0.1; done
python3 -c "
import socket; s=socket.create_connection(('127.0.0.1',$PORT))
s.sendall(b'PUT /bench HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n'); s.recv(100)"
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=k AWS_SECRET_ACCESS_KEY=s AWS_REGION=us-east-1 CKPT_S3_CACHE=$W/cache
sync; echo 3 >/proc/sys/vm/drop_caches || true
"$T/ckpt" push s3://bench/p
"$T/ckpt" push s3://bench/p
sync; echo 3 >/proc/sys/vm/drop_caches || true
"$T/ckpt" pull s3://bench/p --store "$W/pulled"
sync; echo 3 >/proc/sys/vm/drop_caches || true
s=$(date +%s.%N); cp -r "$W/store/packs" "$W/cpcopy"; sync; e=$(date +%s.%N)
python3 -c "b=$(du -sb "$W/cpcopy" | cut -f1); t=$e-$s; print(f'raw local copy (cp -r + sync, cold cache): {b/1e6:.1f} MB in {t:.2f}s ({b/1e6/t:.1f} MB/s)')"
