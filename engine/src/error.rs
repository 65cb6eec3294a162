//! Errors of the engine. Each names the process, fd, region or op concerned
//! and says what the user can do.

use std::path::PathBuf;

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read {path} of process {pid}: {source} (did the process exit?)")]
    Proc { pid: i32, path: PathBuf, #[source] source: std::io::Error },

    #[error("process {pid}: fd {fd} is a {kind} ({target}), which ckpt cannot checkpoint yet; close it before checkpointing")]
    UnsupportedFd { pid: i32, fd: i32, kind: String, target: String },

    #[error("process {pid}: fd {fd} is {what} connected to {peer}, which is outside the computation; run that program under ckpt too (same coordinator), or close the connection before checkpointing")]
    SocketPeer { pid: i32, fd: i32, what: String, peer: String },

    #[error("process {pid}: fd {fd}: {what}; checkpoint again in a moment")]
    SocketBusy { pid: i32, fd: i32, what: String },

    #[error("process {pid}: {what}, which ckpt cannot checkpoint yet")]
    Unsupported { pid: i32, what: String },

    #[error("process {pid}: {step} did not finish within the round's deadline of {secs} s{why}; the round was abandoned and the computation resumed")]
    Deadline { pid: i32, step: String, secs: u64, why: String },

    #[error("process {pid}: {step} was cancelled (`ckpt kill` or `ckpt quit` arrived during the checkpoint)")]
    Cancelled { pid: i32, step: String },

    #[error("process {pid}: chunks of its previous generation left the store during the checkpoint (`ckpt gc`?), so its unchanged pages cannot be taken from there and this checkpoint was abandoned; checkpoint again: the next one reads the process whole")]
    BaseGone { pid: i32 },

    #[error("cannot read memory of process {pid} at {addr:#x}: {source}")]
    Memory { pid: i32, addr: u64, #[source] source: std::io::Error },

    #[error(transparent)]
    Store(#[from] ckpt_store::StoreError),

    #[error("image of generation {generation} is damaged: {what}; run `ckpt verify` and restart an older generation")]
    BadImage { generation: u64, what: String },

    #[error("cannot restart generation {generation}: {what} is in use (is the original process still running? `ckpt kill` it, or wait for it to exit)")]
    IdTaken { generation: u64, what: String },

    #[error("cannot restart generation {generation}: {what}")]
    Restore { generation: u64, what: String },

    /// A checkpoint (or a generation) that a restart could not bring back:
    /// refused before anything is committed or started.
    #[error("{}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Unrestorable { problems: Vec<Problem> },

    #[error("{what}")]
    Namespace { what: String },

    #[error("{context}: {source}")]
    Io { context: String, #[source] source: std::io::Error },
}

/// One reason a process of a generation could not be restarted, with what
/// to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub pid: i32,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "process {} could not be restarted: {}", self.pid, self.what)
    }
}

impl EngineError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io { context: context.into(), source }
    }
}
