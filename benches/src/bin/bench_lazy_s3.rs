//! Lazy restart from S3 with and without the prefetch of the pages touched
//! first (issue 13). A `bench_heap` of `--mib` MiB whose working set is
//! `--ws` MiB (runs of 64 pages spread evenly over the heap, read over and
//! over by a thread of its own, "WORKED n" after each pass) is checkpointed
//! to an `s3://` store on a local moto server, killed, and restarted with
//! `--lazy` from a fresh cache each time (a fresh host): once by this build
//! to make the first-touched record (its own restart has no record yet),
//! then `--reps` times each by main's build (no prefetch: `--base DIR` holds
//! its `ckpt`, restorer and preload) and by this build (prefetch),
//! alternating. Measured per restart: the time until the program has read
//! its whole working set once after the restart (its first whole pass: the
//! second WORKED line), and the GET requests and bytes the S3 server sent
//! until then, counted by a proxy in front of it, which can also hold every
//! GET back by `--latency-ms` (a far S3: the latency is the bench's, never
//! the product's).
//!
//! `target/release/bench-lazy-s3 --base /tmp/ab/NAME/main --mib 512 --ws 16 [--reps 3] [--latency-ms 0]`
//! (`BENCH_VERBOSE=1`: each restart's prefetch and fill lines of the
//! engine's debug log too).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_benches::{figure, median};

const BUCKET: &str = "bench-lazy";

#[derive(Default)]
struct Counts {
    gets: AtomicU64,
    bytes: AtomicU64,
}

/// A TCP proxy in front of the S3 server: counts GET requests and the
/// bytes sent back, and holds each GET back by `latency` first.
fn proxy(upstream: u16, latency: Duration, counts: Arc<Counts>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let counts = counts.clone();
            std::thread::spawn(move || conn(c, upstream, latency, &counts));
        }
    });
    port
}

fn conn(client: TcpStream, upstream: u16, latency: Duration, counts: &Arc<Counts>) {
    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
    let (Ok(mut up_r), Ok(mut cl_w)) = (up.try_clone(), client.try_clone()) else { return };
    let c = counts.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = up_r.read(&mut buf) {
            if n == 0 || cl_w.write_all(&buf[..n]).is_err() {
                break;
            }
            c.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = cl_w.shutdown(std::net::Shutdown::Both);
    });
    let mut up_w = up;
    let mut rd = BufReader::new(client);
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
        let header = |name: &str| text.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()));
        if text.starts_with("GET ") {
            counts.gets.fetch_add(1, Ordering::Relaxed);
            if !latency.is_zero() {
                std::thread::sleep(latency);
            }
        }
        if up_w.write_all(&head).is_err() {
            return;
        }
        if header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            // Not parsed further: the rest passes as it is.
            let _ = std::io::copy(&mut rd, &mut up_w);
            return;
        }
        let len: u64 = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        if std::io::copy(&mut (&mut rd).take(len), &mut up_w).is_err() {
            return;
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn moto(port: u16, log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    let child = Command::new("moto_server").args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f).spawn().expect("moto_server (pip install 'moto[server]')");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not answer");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 200"), "create bucket: {r}");
    child
}

/// One request to the S3 server, signed (curl's SigV4: moto refuses an
/// unsigned read of an object); the status and the body.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let tmp = std::env::temp_dir().join(format!("bench-lazy-s3-{}.body", std::process::id()));
    std::fs::write(&tmp, body).unwrap();
    let mut c = Command::new("curl");
    c.args(["-s", "-X", method, "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "bench:bench", "-w", "\n%{http_code}"]);
    if method == "PUT" {
        c.arg("--data-binary").arg(format!("@{}", tmp.display()));
    }
    if method == "HEAD" {
        c.arg("-I");
    }
    let out = c.arg(format!("http://127.0.0.1:{port}{path}")).output().expect("curl");
    let _ = std::fs::remove_file(&tmp);
    let mut o = out.stdout;
    let nl = o.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&o[nl..]).trim().parse().unwrap_or(0);
    o.truncate(nl);
    (code, o)
}

fn wait_nth(rx: &Receiver<String>, prefix: &str, n: usize, timeout: Duration) -> Option<Instant> {
    wait_nth_first(rx, prefix, n, timeout, &mut None)
}

/// Waits for the `n`th line starting with `prefix`; sets `first` at the
/// first line of all.
fn wait_nth_first(rx: &Receiver<String>, prefix: &str, n: usize, timeout: Duration, first: &mut Option<Instant>) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    let mut seen = 0;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let got = rx.recv_timeout(left);
        if got.is_ok() && first.is_none() {
            *first = Some(Instant::now());
        }
        match got {
            Ok(l) if l.starts_with(prefix) => {
                seen += 1;
                if seen == n {
                    return Some(Instant::now());
                }
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

struct Run {
    dir: PathBuf,
    s3_port: u16,
}

impl Run {
    fn cmd(&self, ckpt: &Path, cache: &str) -> Command {
        let mut c = Command::new(ckpt);
        c.env("CKPT_STORE", format!("s3://{BUCKET}/bench"))
            .env("CKPT_COORD", format!("unix:{}", self.dir.join("c.sock").display()))
            .env("CKPT_S3_CACHE", self.dir.join(cache))
            .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.s3_port))
            .env("AWS_ACCESS_KEY_ID", "bench")
            .env("AWS_SECRET_ACCESS_KEY", "bench")
            .env("AWS_REGION", "us-east-1")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, ckpt: &Path, args: &[&str]) {
        let out = self.cmd(ckpt, "cache-0").args(args).output().unwrap();
        assert!(out.status.success(), "ckpt {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

struct Sample {
    /// To the first output (BEAT).
    first_ms: f64,
    ms: f64,
    gets: u64,
    bytes: u64,
}

/// One lazy restart by `ckpt` from a fresh cache until the working set is
/// read; the GETs and bytes until then. `finish`: let the fill end (this
/// build then writes its record), else kill the restart there.
fn restart(run: &Run, ckpt: &Path, counts: &Counts, n: usize, finish: bool) -> Sample {
    for attempt in 0..20 {
        let cache = format!("cache-r{n}-{attempt}");
        let (g0, b0) = (counts.gets.load(Ordering::Relaxed), counts.bytes.load(Ordering::Relaxed));
        let t = Instant::now();
        let mut child = run.cmd(ckpt, &cache).args(["restart", "--lazy"]).env("CKPT_LOG", "ckpt_engine=debug").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let out = ckpt_benches::lines_of(child.stdout.take().unwrap());
        let err = ckpt_benches::lines_of(child.stderr.take().unwrap());
        let mut first = None;
        let done = wait_nth_first(&out, "WORKED", 2, Duration::from_secs(600), &mut first);
        let (g1, b1) = (counts.gets.load(Ordering::Relaxed), counts.bytes.load(Ordering::Relaxed));
        if finish && done.is_some() {
            let _ = run.cmd(ckpt, "cache-0").arg("kill").output();
            let _ = child.wait();
        } else {
            let _ = run.cmd(ckpt, "cache-0").arg("kill").output();
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(run.dir.join(&cache));
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            for l in err.try_iter().filter(|l| l.contains("prefetch") || l.contains("first-touched") || l.contains("fill done")) {
                eprintln!("  {l}");
            }
        }
        match done {
            Some(at) => return Sample { first_ms: first.map(|f| f.duration_since(t).as_secs_f64() * 1000.0).unwrap_or(f64::NAN), ms: at.duration_since(t).as_secs_f64() * 1000.0, gets: g1 - g0, bytes: b1 - b0 },
            None => {
                let e: Vec<String> = err.try_iter().collect();
                eprintln!("restart attempt {attempt} did not reach its working set: {}", e.join(" | "));
                let _ = run.cmd(ckpt, "cache-0").arg("quit").output();
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    panic!("no restart reached its working set");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let num = |name: &str, def: u64| opt(name).and_then(|v| v.parse().ok()).unwrap_or(def);
    let mib = num("--mib", 512);
    let ws = num("--ws", 16);
    let reps = num("--reps", 3) as usize;
    let latency = Duration::from_millis(num("--latency-ms", 0));
    let new = std::env::current_exe().unwrap().parent().unwrap().join("ckpt");
    let base = PathBuf::from(opt("--base").expect("--base DIR (main's ckpt, ckpt-restorer, libckpt_preload.so)")).join("ckpt");
    let dir = std::env::temp_dir().join(format!("ckpt-bench-lazy-s3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let s3 = free_port();
    let mut server = moto(s3, &dir.join("moto.log"));
    let counts = Arc::new(Counts::default());
    let run = Run { dir: dir.clone(), s3_port: proxy(s3, latency, counts.clone()) };

    eprintln!("checkpoint of {mib} MiB (working set {ws} MiB) to S3 ...");
    let mut c = run.cmd(&new, "cache-0");
    c.args(["launch", "--", env!("CKPT_BENCH_HEAP"), "-m", &mib.to_string(), "-w", &ws.to_string()]).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let lines = ckpt_benches::lines_of(child.stdout.take().unwrap());
    wait_nth(&lines, "WORKED", 1, Duration::from_secs(300)).expect("WORKED");
    run.run(&new, &["checkpoint"]);
    run.run(&new, &["kill"]);
    let _ = child.wait();

    eprintln!("first lazy restart (this build, no record yet; it writes one) ...");
    let first = restart(&run, &new, &counts, 0, true);
    // The record the first restart wrote (generation 1: the store's
    // first), taken away for the runs of this build without one; each of
    // those is a first restart again and writes the record the next rep's
    // prefetch uses (it runs until its fill ends).
    let rec = format!("/{BUCKET}/bench/touched/1.rec");
    assert_eq!(http(s3, "HEAD", &rec, &[]).0, 200, "the first restart wrote no first-touched record");
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut c0 = Vec::new();
    for i in 0..reps {
        eprintln!("rep {i}: main's build, this build (prefetch), this build without a record ...");
        a.push(restart(&run, &base, &counts, 3 * i + 1, false));
        b.push(restart(&run, &new, &counts, 3 * i + 2, false));
        assert_eq!(http(s3, "DELETE", &rec, &[]).0, 204);
        c0.push(restart(&run, &new, &counts, 3 * i + 3, true));
        assert_eq!(http(s3, "HEAD", &rec, &[]).0, 200, "a restart without a record wrote none");
    }
    let _ = run.cmd(&new, "cache-0").arg("quit").output();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let med = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
    let (ams, bms) = (med(&a, |s| s.ms), med(&b, |s| s.ms));
    let (agets, bgets) = (med(&a, |s| s.gets as f64), med(&b, |s| s.gets as f64));
    let (abytes, bbytes) = (med(&a, |s| s.bytes as f64), med(&b, |s| s.bytes as f64));
    let (cms, cgets, cbytes) = (med(&c0, |s| s.ms), med(&c0, |s| s.gets as f64), med(&c0, |s| s.bytes as f64));
    println!("`target/release/bench-lazy-s3 --mib {mib} --ws {ws} --reps {reps} --latency-ms {}`; load average {}", latency.as_millis(), load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!();
    println!("| lazy restart from S3 | first output ms | working set read once, ms | GETs until then | MiB received until then |\n|---|---|---|---|---|");
    let row = |name: &str, f: f64, ms: f64, gets: f64, bytes: f64| println!("| {name} | {f:.0} | {ms:.0} | {gets:.0} | {:.1} |", bytes / 1048576.0);
    let fm = |v: &[Sample]| med(v, |s| s.first_ms);
    row("this build, no record yet (first restart)", first.first_ms, first.ms, first.gets as f64, first.bytes as f64);
    row(&format!("main's build (no prefetch), median of {reps}"), fm(&a), ams, agets, abytes);
    row(&format!("this build without a record (fault-around only), median of {reps}"), fm(&c0), cms, cgets, cbytes);
    row(&format!("this build (prefetch of the record), median of {reps}"), fm(&b), bms, bgets, bbytes);
    println!("\nratios to main's build: with the record: time {:.2}×, GETs {:.2}×, bytes {:.2}×; without: time {:.2}×, GETs {:.2}×, bytes {:.2}×", bms / ams, bgets / agets, bbytes / abytes, cms / ams, cgets / agets, cbytes / abytes);
    println!("per rep ms (main, this without record, this): {}", (0..reps).map(|i| format!("({:.0}, {:.0}, {:.0})", a[i].ms, c0[i].ms, b[i].ms)).collect::<Vec<_>>().join(" "));
    figure(&format!("lazy restart from S3 to a {ws} MiB working set of {mib} MiB, prefetch vs none"), bms / ams, "x", None, None);
}
