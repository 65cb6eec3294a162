//! End-to-end tests of ckpt.
//!
//! * `programs/`: the test programs (C, built twice by `build.rs`, with and
//!   without PIE, and Python). Each prints `PID n`, `READY`, `TICK n ...`
//!   lines and `DONE`, verifies its own invariants every tick and prints
//!   `FAIL <reason>` (exit 1) when one breaks. They run standalone too.
//! * `tests/common/mod.rs`: the harness (a `Session` per test with its own
//!   store and coordinator, process handles that read output lines).
//! * `tests/*.rs`: one file per program, plus `faults.rs` for bad input.
//!
//! This library itself only exposes where the built programs are.

/// Directory holding the built C test programs.
pub const PROGRAMS_DIR: &str = env!("CKPT_TEST_PROGRAMS");
/// Directory holding the program sources (and the Python programs).
pub const SOURCES_DIR: &str = env!("CKPT_TEST_SOURCES");
/// ckpt's C API library, built from `libckpt/ckpt.c` by `build.rs`.
pub const LIBCKPT: &str = env!("CKPT_TEST_LIBCKPT");
/// The directory of ckpt's Python module (`python/ckpt.py`).
pub const PYTHON_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../python");
