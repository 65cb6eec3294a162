//! The ckpt coordinator: the one process that knows the whole computation.
//!
//! Role: accept the agents of the computation's processes (binary protocol
//! of [`ckpt_wire::agent`]) and the CLI's requests (one JSON object per
//! line, typed in [`protocol`], sent by [`client`]); run the checkpoint barrier (every process stopped
//! → every image written → commit → every process resumed); own the store's
//! writer, so a generation is committed only when every process's image is
//! durable, all or nothing. It reads the processes of its own machine
//! itself; on other machines a capture helper (`ckpt host`, [`host`]) does
//! that machine's share of each round with the same code ([`machine`]).
//!
//! What it must never do: commit a generation that lacks a process, leave a
//! process stopped after a failed checkpoint, or run code inside the
//! checkpointed programs (the agent does that).

pub mod addr;
pub mod channel;
pub mod client;
pub mod hooks;
pub mod host;
mod machine;
pub mod protocol;
pub mod rundir;
pub mod secret;
mod server;

pub use addr::{Address, PeerCred, Stream};
pub use host::{HostConfig, run_host};
pub use secret::Secret;
pub use server::{Config, run};

/// Errors of the coordinator and its client.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("bad coordinator address {0:?}: use unix:PATH or tcp:HOST:PORT")]
    BadAddress(String),
    /// Nothing listens at the address (connection refused, no socket
    /// file): there is no coordinator, and one may be started there.
    #[error("no coordinator answers at {addr} ({source}); start one with `ckpt coordinator --coord {addr}` or use `ckpt launch`")]
    Unreachable { addr: String, #[source] source: std::io::Error },
    /// Something may listen there but the connection or its handshake did
    /// not complete (a timeout, no route, a peer that is not a
    /// coordinator): never a reason to start another coordinator.
    #[error("cannot talk to the coordinator at {addr} ({source}); check that it runs and that this machine reaches it (network, firewall), or choose another address with --coord")]
    NoAnswer { addr: String, #[source] source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, #[source] source: std::io::Error },
    #[error("{0}")]
    Untrusted(String),
    #[error("the coordinator at {addr} broke the connection: {source}")]
    Protocol { addr: String, #[source] source: std::io::Error },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    #[error(transparent)]
    Store(#[from] ckpt_store::StoreError),
}
