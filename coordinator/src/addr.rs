//! Coordinator addresses (`unix:PATH` or `tcp:HOST:PORT`) and the stream
//! type that serves both.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
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
    /// The per-user default: a Unix socket in the runtime directory.
    pub fn default_for_user() -> Address {
        let dir = std::env::var_os("XDG_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join("ckpt"))
            // SAFETY: getuid cannot fail.
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/ckpt-{}", unsafe { libc::getuid() })));
        Address::Unix(dir.join("coord.sock"))
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
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                if p.exists() {
                    // A socket nobody answers on is stale.
                    if UnixStream::connect(p).is_ok() {
                        return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "a coordinator already answers there"));
                    }
                    std::fs::remove_file(p)?;
                }
                Ok(Listener::Unix(UnixListener::bind(p)?))
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
