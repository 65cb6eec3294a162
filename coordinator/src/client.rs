//! The CLI side of the control protocol ([`crate::protocol`]): one typed
//! request per connection, one typed answer.

use std::io::Write;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::protocol::{self, CheckpointReply, Done, External, HelloReply, KillReply, Request, StatusReply};
use crate::{Address, CoordError};

/// Sends `req` and decodes the answer as `T`. A refusal becomes
/// [`CoordError::Refused`] carrying the coordinator's message.
pub fn call<T: DeserializeOwned>(addr: &Address, req: &Request, timeout: Duration) -> Result<T, CoordError> {
    let mut s = addr.connect(timeout).map_err(|e| connect_error(addr, e))?;
    let proto = |e: std::io::Error| CoordError::Protocol { addr: addr.to_string(), source: e };
    let invalid = |e: protocol::ProtoError| proto(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
    s.write_all(&req.encode()).map_err(proto)?;
    let answer = protocol::read_line(&mut s, &[], protocol::MAX_ANSWER).map_err(|e| match e {
        protocol::ProtoError::Truncated => proto(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("no answer to {}", req.name()))),
        e => invalid(e),
    })?;
    protocol::decode_answer(&answer).map_err(invalid)?.map_err(CoordError::Refused)
}

/// `hello`: the coordinator's store and address.
pub fn hello(addr: &Address, timeout: Duration) -> Result<HelloReply, CoordError> {
    call(addr, &Request::Hello {}, timeout)
}

/// `status`: the coordinator and its processes.
pub fn status(addr: &Address, timeout: Duration) -> Result<StatusReply, CoordError> {
    call(addr, &Request::Status {}, timeout)
}

/// `checkpoint`: the generation committed.
pub fn checkpoint(addr: &Address, timeout: Duration) -> Result<CheckpointReply, CoordError> {
    call(addr, &Request::Checkpoint {}, timeout)
}

/// `kill`: the processes killed.
pub fn kill(addr: &Address, timeout: Duration) -> Result<KillReply, CoordError> {
    call(addr, &Request::Kill {}, timeout)
}

/// `externals`: fds given to the computation from outside.
pub fn externals(addr: &Address, fds: Vec<External>, timeout: Duration) -> Result<(), CoordError> {
    call::<Done>(addr, &Request::Externals { fds }, timeout).map(drop)
}

/// `restart_barrier`: returns once every host of `hosts` arrived.
pub fn restart_barrier(addr: &Address, generation: u64, arrived: Vec<String>, hosts: Vec<String>, timeout: Duration) -> Result<(), CoordError> {
    call::<Done>(addr, &Request::RestartBarrier { generation, arrived, hosts }, timeout).map(drop)
}

/// `wait_process`: returns once `pid` registered.
pub fn wait_process(addr: &Address, pid: i32, timeout: Duration) -> Result<(), CoordError> {
    call::<Done>(addr, &Request::WaitProcess { pid }, timeout).map(drop)
}

/// `set_hooks`: the computation's command hooks from now on.
pub fn set_hooks(addr: &Address, hooks: crate::hooks::Hooks, timeout: Duration) -> Result<(), CoordError> {
    call::<Done>(addr, &Request::SetHooks { hooks }, timeout).map(drop)
}

/// `quit`: stops the coordinator.
pub fn quit(addr: &Address, timeout: Duration) -> Result<(), CoordError> {
    call::<Done>(addr, &Request::Quit {}, timeout).map(drop)
}

/// A failed connection: no coordinator there, or one that this machine
/// and it do not trust each other (a failed secure handshake).
pub fn connect_error(addr: &Address, e: std::io::Error) -> CoordError {
    if matches!(addr, Address::Unix(_)) && e.raw_os_error() == Some(libc::EACCES) {
        // The socket (or its directory) is another user's: each user has a
        // coordinator of their own.
        CoordError::Untrusted(format!(
            "cannot connect to the coordinator at {addr}: {e}; the socket belongs to another user (every user runs a coordinator of their own: drop --coord to use yours, {})",
            Address::default_for_user()
        ))
    } else if e.kind() == std::io::ErrorKind::PermissionDenied {
        CoordError::Untrusted(e.to_string())
    } else if e.raw_os_error() == Some(libc::ECONNREFUSED) || (matches!(addr, Address::Unix(_)) && e.raw_os_error() == Some(libc::ENOENT)) {
        CoordError::Unreachable { addr: addr.to_string(), source: e }
    } else {
        CoordError::NoAnswer { addr: addr.to_string(), source: e }
    }
}

/// True if a coordinator answers at `addr`.
pub fn is_up(addr: &Address) -> bool {
    hello(addr, Duration::from_secs(2)).is_ok()
}
