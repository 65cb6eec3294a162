//! The MPI libraries the tests run (`#[path = "common/mpi.rs"] mod mpi;`):
//! each test file adds the launcher options it needs in an `impl Lib` of
//! its own.

use std::path::PathBuf;

use crate::common::{LINE_TIMEOUT, Proc, program};

/// An MPI implementation from Debian, and the ring program built for it.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Lib {
    OpenMpi,
    Mpich,
}

impl Lib {
    pub fn name(self) -> &'static str {
        match self {
            Lib::OpenMpi => "openmpi",
            Lib::Mpich => "mpich",
        }
    }

    /// The test program built for this library, or None (with the reason
    /// printed) when the library is not installed here.
    pub fn program(self) -> Option<PathBuf> {
        let p = program(&format!("mpi_ring-{}", self.name()));
        if p.is_file() {
            Some(p)
        } else {
            let pkgs = match self {
                Lib::OpenMpi => "openmpi-bin libopenmpi-dev",
                Lib::Mpich => "mpich libmpich-dev",
            };
            eprintln!("SKIP: {} was not built: its MPI library is not installed (apt-get install {pkgs}; scripts/test.sh does)", p.display());
            None
        }
    }
}

/// Rank 0's `ANSWER ticks=T acc=A` of a job of `ranks` ranks: A must be
/// n(n+1)/2 * T(T+1)/2. Returns T.
pub fn check_answer(p: &mut Proc, ranks: u64) -> u64 {
    let line = p.wait_prefix("ANSWER ", LINE_TIMEOUT);
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad ANSWER line {line:?}\n{}", p.context()))
    };
    let (t, acc) = (field("ticks="), field("acc="));
    assert_eq!(acc, ranks * (ranks + 1) / 2 * (t * (t + 1) / 2), "rank 0's answer after {t} ticks is wrong\n{}", p.context());
    t
}
