#!/usr/bin/env bash
# The ckpt demo: launch an unmodified python3 computation, checkpoint it
# twice, kill it, restart it from the latest generation and watch it carry
# on, then restart the older generation too.
set -euo pipefail
cd "$(dirname "$0")/.."
# CKPT_BIN: a ckpt built already (the test suite runs this demo as an
# ordinary user, who may have no cargo); else build it here.
if [ -n "${CKPT_BIN:-}" ]; then
  CKPT="$CKPT_BIN"
else
  cargo build --release --workspace --quiet
  CKPT="$PWD/target/release/ckpt"
fi
WORK=$(mktemp -d /tmp/ckpt-demo.XXXXXX)
export CKPT_STORE="$WORK/store" CKPT_COORD="unix:$WORK/coord.sock"
PY=$(python3 -c 'import sys; print(sys.executable)')
cleanup() { "$CKPT" kill >/dev/null 2>&1 || true; "$CKPT" quit >/dev/null 2>&1 || true; }
trap cleanup EXIT

wait_for() { # FILE PATTERN: wait until a line matching PATTERN appears
  for _ in $(seq 1 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}

echo "== launch: $PY demo/counter.py (store $CKPT_STORE)"
"$CKPT" launch -- "$PY" demo/counter.py >"$WORK/run1.log" 2>&1 &
wait_for "$WORK/run1.log" "^step 3:"
echo "== checkpoint"; G1=$("$CKPT" checkpoint); echo "generation $G1 at: $(tail -n1 "$WORK/run1.log")"
wait_for "$WORK/run1.log" "^step 6:"
echo "== checkpoint"; G2=$("$CKPT" checkpoint); echo "generation $G2 at: $(tail -n1 "$WORK/run1.log")"
"$CKPT" status
echo "== log"; "$CKPT" log
wait_for "$WORK/run1.log" "^step 8:"
echo "== kill (the program was at: $(tail -n1 "$WORK/run1.log"))"
"$CKPT" kill; wait || true

echo "== restart (latest generation, $G2): it continues from where it was checkpointed"
"$CKPT" restart >"$WORK/run2.log" 2>&1 &
wait_for "$WORK/run2.log" "checksum ok"
sleep 1.5; cat "$WORK/run2.log"
echo "== checkpoint the restarted program, kill it, restart generation $G1"
"$CKPT" checkpoint >/dev/null; "$CKPT" kill; wait || true
"$CKPT" restart "$G1" >"$WORK/run3.log" 2>&1 &
wait_for "$WORK/run3.log" "checksum ok"
sleep 1.5; cat "$WORK/run3.log"
"$CKPT" kill; wait || true
echo "== log"; "$CKPT" log
echo "demo finished: files in $WORK"
