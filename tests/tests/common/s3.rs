//! A real S3-compatible server on loopback for the S3 tests: `moto_server`
//! (PyPI `moto[server]`), installed with pip if missing, started on a free
//! 127.0.0.1 port and killed on drop. No mock: the store talks HTTP to it.
//!
//! Tests fail loudly if the server cannot be installed or started.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Access key the tests use (moto accepts any unless auth is enabled).
pub const KEY_ID: &str = "ckpt-test-key";
/// Secret the tests use.
pub const SECRET: &str = "ckpt-test-secret";

pub struct S3Server {
    pub port: u16,
    pub endpoint: String,
    child: Child,
    pub log: PathBuf,
}

/// `moto_server`, installing `moto[server]` with pip if it is not there.
fn moto_server_bin() -> PathBuf {
    let find = || -> Option<PathBuf> {
        let out = Command::new("sh").args(["-c", "command -v moto_server"]).output().ok()?;
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !p.is_empty()).then(|| PathBuf::from(p))
    };
    if let Some(p) = find() {
        return p;
    }
    let st = Command::new("python3")
        .args(["-m", "pip", "install", "-q", "moto[server]"])
        .status()
        .expect("cannot run python3 -m pip");
    assert!(st.success(), "pip install 'moto[server]' failed: the S3 tests need a real S3-compatible server");
    find().expect("moto_server is not on PATH after pip install 'moto[server]'")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One raw HTTP/1.1 request without signing (moto without auth accepts it).
pub fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, buf))
}

impl S3Server {
    /// Starts a moto server; `auth` turns on its credential checks (every
    /// request is then refused unless signed by a key it issued).
    pub fn start_with(auth: bool) -> S3Server {
        let bin = moto_server_bin();
        let port = free_port();
        let log = std::env::temp_dir().join(format!("moto-{}-{port}.log", std::process::id()));
        let logf = std::fs::File::create(&log).unwrap();
        let mut c = Command::new(&bin);
        c.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        if auth {
            c.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
        }
        let child = c.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut srv = S3Server { port, endpoint: format!("http://127.0.0.1:{port}"), child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http(port, "GET", "/").is_some() {
                break;
            }
            if let Ok(Some(st)) = srv.child.try_wait() {
                panic!("moto_server exited ({st}): {}", std::fs::read_to_string(&srv.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "moto_server did not answer on port {port} within 30 s");
            std::thread::sleep(Duration::from_millis(50)); // polling a server that is starting
        }
        srv
    }

    pub fn start() -> S3Server {
        Self::start_with(false)
    }

    /// Creates bucket `name` (unsigned request).
    pub fn create_bucket(&self, name: &str) {
        let (code, body) = http(self.port, "PUT", &format!("/{name}")).expect("moto did not answer PUT bucket");
        assert!(code == 200, "creating bucket {name} failed: {body}");
    }

    /// The AWS variables that point ckpt at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID".into(), KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ]
    }

    /// Applies [`S3Server::env`] and a cache dir to a command.
    pub fn apply(&self, c: &mut Command, cache: &std::path::Path) {
        for (k, v) in self.env() {
            c.env(k, v);
        }
        c.env("CKPT_S3_CACHE", cache);
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
