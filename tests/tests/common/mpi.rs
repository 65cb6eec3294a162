//! The MPI libraries the tests run (`#[path = "common/mpi.rs"] mod mpi;`):
//! each test file adds the launcher options it needs in an `impl Lib` of
//! its own.

use std::path::PathBuf;

use crate::common::program;

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
