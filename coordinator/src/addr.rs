//! Coordinator addresses (`unix:PATH` or `tcp:HOST:PORT`) and the stream
//! type that serves both.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use crate::CoordError;

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

    pub fn connect(&self, timeout: Duration) -> std::io::Result<Stream> {
        match self {
            Address::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(timeout))?;
                Ok(Stream::Unix(s))
            }
            Address::Tcp(h) => {
                let addr = std::net::ToSocketAddrs::to_socket_addrs(h)?
                    .next()
                    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("cannot resolve {h}")))?;
                let s = TcpStream::connect_timeout(&addr, timeout)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    pub fn listen(&self) -> std::io::Result<Listener> {
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
            Address::Tcp(h) => Ok(Listener::Tcp(TcpListener::bind(h)?)),
        }
    }
}

pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    pub fn accept(&self) -> std::io::Result<(Stream, String)> {
        match self {
            Listener::Unix(l) => Ok((Stream::Unix(l.accept()?.0), "local".into())),
            Listener::Tcp(l) => {
                let (s, a) = l.accept()?;
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), a.ip().to_string()))
            }
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
    Tcp(TcpStream),
}

impl Stream {
    pub fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
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
            Stream::Tcp(_) => None,
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// The underlying fd, for handing a connection to a restored process.
    pub fn into_owned_fd(self) -> std::os::fd::OwnedFd {
        match self {
            Stream::Unix(s) => s.into(),
            Stream::Tcp(s) => s.into(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
