#!/usr/bin/env bash
# Builds everything and runs the whole test suite (unit, store, restorer and
# end-to-end checkpoint/restart tests of real programs). Needs root (restart
# restores PIDs with clone3/set_tid), gcc and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v python3 >/dev/null || need+=(python3)
# tests/tests/install.rs renders the installed man pages (`man -l`).
command -v man >/dev/null || need+=(man-db)
command -v nroff >/dev/null || need+=(groff-base)
# tests/tests/trust_store.rs and seal.rs edit catalogs as an attacker would.
command -v sqlite3 >/dev/null || need+=(sqlite3)
# tests/tests/mpi.rs: Open MPI 4.1 and MPICH 4.0 side by side (tests/build.rs
# compiles the MPI test program with mpicc.openmpi and mpicc.mpich).
command -v mpicc.openmpi >/dev/null && command -v mpirun.openmpi >/dev/null || need+=(openmpi-bin libopenmpi-dev)
command -v mpicc.mpich >/dev/null && command -v mpiexec.hydra >/dev/null || need+=(mpich libmpich-dev)
# tests/tests/slurm.rs starts a one-node Slurm cluster of its own (Debian's
# slurm-wlm 22.05: slurmctld, slurmd; munge for its authentication).
command -v slurmctld >/dev/null && command -v slurmd >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
# The namespace hosts (hosts.rs, mpi_hosts.rs, and slurm_nodes.rs's two-node
# Slurm cluster, a slurmd on each) are made with `ip netns`.
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; fi
# The S3 tests run against a real S3-compatible server on loopback (moto).
# 5.2 or later: the S3 writer lock needs conditional writes (PUT with
# If-None-Match: * and If-Match), which moto honours in recent releases (checked
# with 5.2.1; store/tests/s3.rs fails if a server ignores them).
moto_ok() {
  command -v moto_server >/dev/null && python3 -c 'import sys, moto; sys.exit(tuple(map(int, moto.__version__.split(".")[:2])) < (5, 2))' 2>/dev/null
}
moto_ok || python3 -m pip install -q 'moto[server]>=5.2,<6'
moto_ok || { echo "moto_server >= 5.2 is not installed: the S3 tests need it (pip install 'moto[server]>=5.2,<6')" >&2; exit 1; }
# The ordinary-user tests (tests/tests/unprivileged.rs) run ckpt as a real
# second account, made here: no sudo, no capabilities, no extra groups.
id ckpt-user >/dev/null 2>&1 || useradd -m -s /bin/bash ckpt-user
cargo build --release --workspace
cargo test --release --workspace --no-fail-fast
