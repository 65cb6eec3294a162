//! A real S3-compatible server on loopback for the S3 tests: `moto_server`
//! (PyPI `moto[server]`), installed with pip if missing, started on a free
//! 127.0.0.1 port and killed on drop, or by the kernel when the test binary
//! dies ([`spawn_tied`]). No mock: the store talks HTTP to it.
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
    /// Keeps the thread that started the server alive (see [`spawn_tied`]);
    /// dropped after the server is killed.
    _spawner: TiedThread,
}

// The harness has no dependencies (not even libc): the two calls it needs.
unsafe extern "C" {
    fn prctl(option: i32, ...) -> i32;
    fn getppid() -> i32;
}
const PR_SET_PDEATHSIG: i32 = 1;
const SIGKILL: i32 = 9;

/// The thread that forked a [`spawn_tied`] child; it ends when this is
/// dropped.
pub struct TiedThread(std::sync::mpsc::Sender<()>);

/// Spawns `c` so that the kernel kills it (SIGKILL) when the test binary
/// dies, even by `kill -9` or an interrupted `cargo test`, where no `Drop`
/// runs: `PR_SET_PDEATHSIG` in the child before the exec.
///
/// The parent-death signal fires when the *thread* that forked the child
/// ends, not the process: a test's own thread ends with the test, which
/// would kill a server that outlives it (a server in a `static`, shared by
/// the tests). So a thread of its own forks the child and waits until the
/// returned [`TiedThread`] is dropped (or the process ends).
pub fn spawn_tied(mut c: Command) -> std::io::Result<(Child, TiedThread)> {
    use std::os::unix::process::CommandExt;
    let (child_tx, child_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let parent = std::process::id() as i32;
        let hook = move || {
            // SAFETY: prctl with an option that takes one integer argument.
            if unsafe { prctl(PR_SET_PDEATHSIG, SIGKILL as std::ffi::c_ulong) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl.
            // SAFETY: getppid has no arguments and cannot fail.
            if unsafe { getppid() } != parent {
                return Err(std::io::Error::other("the test binary ended while the server was being started"));
            }
            Ok(())
        };
        // SAFETY: the hook runs in the forked child before exec and only
        // makes two async-signal-safe system calls (no allocation on the
        // success path).
        unsafe { c.pre_exec(hook) };
        let _ = child_tx.send(c.spawn());
        // Until the server is dropped (or the test binary ends).
        let _ = stop_rx.recv();
    });
    let child = child_rx.recv().map_err(|_| std::io::Error::other("the thread spawning the server died"))??;
    Ok((child, TiedThread(stop_tx)))
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
        .args(["-m", "pip", "install", "-q", "moto[server]>=5.2,<6"])
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
        let (child, spawner) = spawn_tied(c).unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut srv = S3Server { port, endpoint: format!("http://127.0.0.1:{port}"), child, log, _spawner: spawner };
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

    /// A server with bucket `name` made.
    pub fn with_bucket(name: &str) -> S3Server {
        let srv = S3Server::start();
        srv.create_bucket(name);
        srv
    }

    /// Keys under `prefix` in `bucket` (unsigned ListObjectsV2).
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (code, body) = http(self.port, "GET", &format!("/{bucket}?list-type=2&prefix={prefix}")).expect("LIST");
        assert_eq!(code, 200, "{body}");
        body.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_string).collect()
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

    /// [`S3Server::env`] and the cache dir `cache`.
    pub fn env_with_cache(&self, cache: &std::path::Path) -> Vec<(String, String)> {
        let mut env = self.env();
        env.push(("CKPT_S3_CACHE".into(), cache.to_str().expect("a UTF-8 cache path").into()));
        env
    }

    /// Applies [`S3Server::env_with_cache`] to a command.
    pub fn apply(&self, c: &mut Command, cache: &std::path::Path) {
        c.envs(self.env_with_cache(cache));
    }

    /// `counter_heap -t 100 -m MIB -s STOP` launched on `s`'s store (an
    /// `s3://` one of this server, with cache `cache`), once READY: the
    /// launch, its `pid` the program's.
    pub fn launch_counter(&self, s: &crate::common::Session, cache: &std::path::Path, mib: &str, stop: &std::path::Path) -> crate::common::Proc {
        use crate::common::{LINE_TIMEOUT, program};
        let env = self.env_with_cache(cache);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut p = s.launch_env(&program("counter_heap"), &["-t", "100", "-m", mib, "-s", stop.to_str().unwrap()], &env);
        p.wait_prefix("READY", LINE_TIMEOUT);
        p
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A TCP proxy in front of the S3 server that can stall one upload half
/// way: [`StallProxy::arm`] names a PUT (by a piece of its request line);
/// the next such request gets its headers and half its body forwarded, and
/// then nothing more, so the client waits for an answer with its upload
/// under way, until the test kills it. This is how tests stop a ckpt
/// process *during* an upload, deterministically: the process is known to
/// be inside that PUT (the proxy saw its bytes) and cannot finish it.
/// Everything else is passed through unchanged.
pub struct StallProxy {
    pub port: u16,
    pub endpoint: String,
    shared: std::sync::Arc<ProxyShared>,
}

struct ProxyShared {
    upstream: u16,
    armed: std::sync::Mutex<Option<String>>,
    stalled: std::sync::Mutex<Option<String>>,
    cv: std::sync::Condvar,
}

impl StallProxy {
    pub fn start(upstream: u16) -> StallProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let shared = std::sync::Arc::new(ProxyShared {
            upstream,
            armed: std::sync::Mutex::new(None),
            stalled: std::sync::Mutex::new(None),
            cv: std::sync::Condvar::new(),
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let sh = sh.clone();
                std::thread::spawn(move || proxy_conn(c, &sh));
            }
        });
        StallProxy { port, endpoint: format!("http://127.0.0.1:{port}"), shared }
    }

    /// Stall the next PUT whose request line contains `needle`.
    pub fn arm(&self, needle: &str) {
        *self.shared.stalled.lock().unwrap() = None;
        *self.shared.armed.lock().unwrap() = Some(needle.to_string());
    }

    /// Waits until an armed PUT is stalled; returns its request line.
    pub fn wait_stalled(&self, timeout: Duration) -> Option<String> {
        let g = self.shared.stalled.lock().unwrap();
        let (g, _) = self.shared.cv.wait_timeout_while(g, timeout, |s| s.is_none()).unwrap();
        g.clone()
    }

    /// The server's variables, pointing at this proxy, and a cache dir.
    pub fn apply(&self, srv: &S3Server, c: &mut Command, cache: &std::path::Path) {
        srv.apply(c, cache);
        c.env("AWS_ENDPOINT_URL", &self.endpoint);
    }
}

fn proxy_conn(client: TcpStream, sh: &ProxyShared) {
    use std::io::BufRead;
    let Ok(up) = TcpStream::connect(("127.0.0.1", sh.upstream)) else { return };
    let (Ok(mut up_r), Ok(mut cl_w)) = (up.try_clone(), client.try_clone()) else { return };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_r, &mut cl_w);
        let _ = cl_w.shutdown(std::net::Shutdown::Both);
    });
    let mut up_w = up;
    let mut rd = std::io::BufReader::new(client);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            if rd.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                let _ = up_w.shutdown(std::net::Shutdown::Both);
                return;
            }
            head.extend_from_slice(&line);
            if line == b"\r\n" {
                break;
            }
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let request_line = text.lines().next().unwrap_or("").to_string();
        let header = |name: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let chunked = header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let stall = request_line.starts_with("PUT ") && {
            let mut a = sh.armed.lock().unwrap();
            let hit = a.as_deref().is_some_and(|n| request_line.contains(n));
            if hit {
                *a = None;
            }
            hit
        };
        if up_w.write_all(&head).is_err() {
            return;
        }
        if chunked {
            let _ = std::io::copy(&mut rd, &mut up_w);
            return;
        }
        let mut body = vec![0u8; len];
        let send = if stall { len / 2 } else { len };
        if rd.read_exact(&mut body[..send]).is_err() || up_w.write_all(&body[..send]).is_err() {
            return;
        }
        let _ = up_w.flush();
        if stall {
            *sh.stalled.lock().unwrap() = Some(request_line);
            sh.cv.notify_all();
            // Swallow whatever the client still sends, forward nothing: the
            // server never gets a whole request. Ends when the client dies.
            let _ = std::io::copy(&mut rd, &mut std::io::sink());
            let _ = up_w.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}
