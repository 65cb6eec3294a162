//! Benchmarks of ckpt (binaries in `src/bin/`): incremental checkpoints per
//! dirty-tracking backend, downtime, restart time, and the raw speed of
//! memcpy, BLAKE3 and zstd measured in the same run as their ceiling.
//! Results are collected in BENCHMARKS.md. Performance is measured here,
//! never in timed tests.
