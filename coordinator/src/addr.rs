//! Coordinator addresses (`unix:PATH` or `tcp:HOST:PORT`) and the stream
//! type that serves both. Every TCP connection is a secure channel
//! ([`crate::channel`]): [`Address::connect`] proves this machine's secret,
//! [`Listener::accept`] hands out connections whose handshake
//! ([`Accepted::establish`]) runs in the serving thread.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::channel::{self, Role, SecureStream, ServerKeys};
use crate::{CoordError, Secret};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(String),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(h) => write!(f, "tcp:{h}"),
        }
    }
}

impl std::str::FromStr for Address {
    type Err = CoordError;
    fn from_str(s: &str) -> Result<Self, CoordError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(CoordError::BadAddress(s.into()));
            }
            Ok(Address::Unix(PathBuf::from(p)))
        } else if let Some(h) = s.strip_prefix("tcp:") {
            if !h.contains(':') {
                return Err(CoordError::BadAddress(s.into()));
            }
            Ok(Address::Tcp(h.to_string()))
        } else {
            Err(CoordError::BadAddress(s.into()))
        }
    }
}

/// The transport keys of a restored agent's channel: initiator →
/// coordinator, then coordinator → initiator.
pub type TransportKeys = ([u8; 32], [u8; 32]);

impl Address {
    /// The per-user default: a Unix socket in the private runtime
    /// directory ([`crate::rundir`]).
    pub fn default_for_user() -> Address {
        Address::Unix(crate::rundir::default_dir().join("coord.sock"))
    }

    /// Makes sure the directory of a Unix socket is safe to use: the
    /// default runtime directory is made private and checked; the directory
    /// of an explicit path must be one no other user can change entries of.
    /// For TCP, the runtime directory (where its coordinator log goes).
    pub fn prepare_dir(&self) -> Result<(), crate::rundir::RunDirError> {
        let default = crate::rundir::default_dir();
        let dir = match self {
            Address::Unix(p) => p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new(".")).to_path_buf(),
            Address::Tcp(_) => default.clone(),
        };
        if dir == default {
            crate::rundir::ensure_private_dir(&dir)
        } else {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .map_err(|source| crate::rundir::RunDirError::Io { path: dir.clone(), source })?;
            }
            crate::rundir::check_socket_dir(&dir)
        }
    }

    /// The abstract Unix socket where processes of this coordinator's
    /// computation that changed their uid join (see [`bind_member_socket`]):
    /// named after the coordinator's user and socket path, None for TCP
    /// (where every agent proves the membership key anyway).
    pub fn member_socket(&self) -> Option<String> {
        match self {
            Address::Unix(p) => {
                let h = blake3::hash(p.as_os_str().as_encoded_bytes());
                Some(format!("ckpt-member-{}-{}", nix::unistd::geteuid().as_raw(), &h.to_hex()[..16]))
            }
            Address::Tcp(_) => None,
        }
    }

    /// Connects as a `ckpt` command or capture helper. Over TCP this
    /// proves the secret of [`Secret::default_path`] and checks the
    /// coordinator's; a failed handshake is a `PermissionDenied` error
    /// saying what to do.
    pub fn connect(&self, timeout: Duration) -> std::io::Result<Stream> {
        match self {
            Address::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(timeout))?;
                Ok(Stream::Unix(s))
            }
            Address::Tcp(h) => {
                let mut s = tcp_connect(h, timeout)?;
                let secret = channel::load_secret(&self.to_string())?;
                let hs = channel::initiate(&mut s, &self.to_string(), Role::Control, secret.bytes(), &channel::secret_hint())?;
                s.set_read_timeout(Some(timeout))?;
                Ok(Stream::Secure(SecureStream::new(s, hs)?))
            }
        }
    }

    /// A connection for a restored agent, made by the restart driver
    /// (`ckpt restart`): over TCP the driver runs the agent's handshake
    /// with the membership key of `secret` and returns the transport keys
    /// (initiator → coordinator, coordinator → initiator) for the restored
    /// agent, which continues the channel at nonce 0 in both directions.
    /// Over a Unix socket there are none.
    pub fn connect_for_agent(&self, timeout: Duration, secret: &Secret) -> std::io::Result<(std::os::fd::OwnedFd, Option<TransportKeys>)> {
        match self {
            Address::Unix(_) => Ok((self.connect(timeout)?.into_owned_fd(), None)),
            Address::Tcp(h) => {
                let mut s = tcp_connect(h, timeout)?;
                let mut hs = channel::initiate(&mut s, &self.to_string(), Role::Agent, &secret.agent_key(), &channel::secret_hint())?;
                let keys = hs.dangerously_get_raw_split();
                Ok((s.into(), Some(keys)))
            }
        }
    }

    pub fn listen(&self, secret: &Secret) -> std::io::Result<Listener> {
        match self {
            Address::Unix(p) => {
                self.prepare_dir().map_err(std::io::Error::other)?;
                // lstat: only a stale socket of ours is ever removed.
                match std::fs::symlink_metadata(p) {
                    Ok(md) => {
                        let me = nix::unistd::geteuid().as_raw();
                        if !md.file_type().is_socket() || md.uid() != me {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::AlreadyExists,
                                format!(
                                    "{} exists and is not a socket of yours (owned by uid {}, mode {:o}): remove it or choose another --coord",
                                    p.display(),
                                    md.uid(),
                                    md.mode() & 0o7777
                                ),
                            ));
                        }
                        // A socket nobody answers on is stale.
                        if UnixStream::connect(p).is_ok() {
                            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "a coordinator already answers there"));
                        }
                        std::fs::remove_file(p)?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                let l = UnixListener::bind(p)?;
                // The gate is SO_PEERCRED; the mode keeps others from even
                // connecting where the directory lets them reach the socket.
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
                Ok(Listener::Unix(l))
            }
            // Every peer proves `secret` (or the membership key derived
            // from it).
            Address::Tcp(h) => Ok(Listener::Tcp(TcpListener::bind(h)?, Arc::new(ServerKeys::new(secret)))),
        }
    }
}

fn tcp_connect(h: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let addr = std::net::ToSocketAddrs::to_socket_addrs(h)?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("cannot resolve {h}")))?;
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    Ok(s)
}

pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener, Arc<ServerKeys>),
}

impl Listener {
    /// The next connection and its peer's name ("local" for a Unix one).
    /// A TCP connection is not usable before [`Accepted::establish`].
    pub fn accept(&self) -> std::io::Result<(Accepted, String)> {
        match self {
            Listener::Unix(l) => Ok((Accepted::Ready(Stream::Unix(l.accept()?.0)), "local".into())),
            Listener::Tcp(l, keys) => {
                let (s, a) = l.accept()?;
                s.set_nodelay(true)?;
                Ok((Accepted::Handshake(s, keys.clone()), a.ip().to_string()))
            }
        }
    }
}

/// An accepted connection whose handshake (if any) is still to run.
pub enum Accepted {
    Ready(Stream),
    Handshake(TcpStream, Arc<ServerKeys>),
}

/// What a peer proved: it may act as a `ckpt` command or capture helper
/// (local peers, and TCP peers holding the secret), or only as an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proved {
    Control,
    AgentOnly,
}

impl Accepted {
    /// The kernel's credentials of a Unix peer; None for TCP (whose
    /// handshake has not run yet).
    pub fn peer_cred(&self) -> Option<PeerCred> {
        match self {
            Accepted::Ready(s) => s.peer_cred(),
            Accepted::Handshake(..) => None,
        }
    }

    /// Runs the TCP handshake (a peer that fails it is closed here, and
    /// logged by name, before any of its bytes is parsed).
    pub fn establish(self, peer: &str) -> Option<(Stream, Proved)> {
        match self {
            Accepted::Ready(s) => Some((s, Proved::Control)),
            Accepted::Handshake(s, keys) => match channel::respond(s, peer, &keys) {
                Ok((s, role)) => Some((Stream::Secure(s), if role == Role::Control { Proved::Control } else { Proved::AgentOnly })),
                Err(e) => {
                    tracing::warn!(peer, "closed a TCP connection before reading it: {e}");
                    None
                }
            },
        }
    }
}

/// `SO_PEERCRED` of a Unix connection: the process that connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

pub enum Stream {
    Unix(UnixStream),
    Secure(SecureStream),
}

impl Stream {
    pub fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Secure(s) => Stream::Secure(s.try_clone()?),
        })
    }

    /// The kernel's credentials of the peer of a Unix connection (taken
    /// at `connect`), None for TCP.
    pub fn peer_cred(&self) -> Option<PeerCred> {
        match self {
            Stream::Unix(s) => {
                let c = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials).ok()?;
                Some(PeerCred { pid: c.pid(), uid: c.uid(), gid: c.gid() })
            }
            Stream::Secure(_) => None,
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Secure(s) => s.socket().set_read_timeout(t),
        }
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Secure(s) => s.socket().shutdown(std::net::Shutdown::Both),
        };
    }

    /// The underlying fd, for handing a Unix connection to a restored
    /// process (a TCP one needs its keys too: [`Address::connect_for_agent`]).
    pub fn into_owned_fd(self) -> std::os::fd::OwnedFd {
        match self {
            Stream::Unix(s) => s.into(),
            Stream::Secure(s) => s.into_socket().into(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Secure(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Secure(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Binds the member socket `name` in the abstract namespace (no file, so no
/// directory keeps out a process whose uid changed). Anyone on the machine
/// can connect to it; that is why its peers may speak only the agent
/// protocol, other users must prove the membership key, and agents check
/// that the listener runs as the coordinator's user
/// ([`ckpt_wire::agent::ENV_COORD_UID`]) before they send anything. A name
/// already bound is an error: someone else holds it.
pub fn bind_member_socket(name: &str) -> std::io::Result<UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    UnixListener::bind_addr(&a)
}

impl From<Stream> for Accepted {
    fn from(s: Stream) -> Accepted {
        Accepted::Ready(s)
    }
}
