#!/usr/bin/env bash
# Builds everything and runs the whole test suite (unit, store, restorer and
# end-to-end checkpoint/restart tests of real programs). Needs root (restart
# restores PIDs with clone3/set_tid), gcc and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}"; fi
# The S3 tests run against a real S3-compatible server on loopback (moto).
command -v moto_server >/dev/null || python3 -m pip install -q 'moto[server]'
command -v moto_server >/dev/null || { echo "moto_server is not installed: the S3 tests need it (pip install 'moto[server]')" >&2; exit 1; }
cargo build --release --workspace
cargo test --release --workspace --no-fail-fast
