//! The S3 backend against a real S3-compatible server on loopback
//! (`moto_server` from PyPI `moto[server]`, installed with pip if missing).
//! No mock: every request goes over HTTP.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ckpt_store::remote::{self, NoProgress, Remote};
use ckpt_store::{BlobKind, Hash, NewGeneration, Store, StoreError};

const BUCKET: &str = "store-tests";

struct Moto {
    port: u16,
    child: Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `c` so that the kernel kills it when this test binary ends: the
/// server lives in a `static`, whose `Drop` never runs, and an interrupted
/// or `kill -9`ed run runs none at all. `PR_SET_PDEATHSIG` fires when the
/// *thread* that forked the child ends, and a test's thread ends with its
/// test while the server serves the tests after it: a thread of its own
/// forks the child and then parks for the rest of the process.
fn spawn_tied(mut c: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let parent = nix::unistd::getpid();
        let hook = move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent may have died before the prctl.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("the test binary ended while moto_server was being started"));
            }
            Ok(())
        };
        // SAFETY: the hook runs in the forked child before exec and only
        // makes two async-signal-safe system calls.
        unsafe { c.pre_exec(hook) };
        let _ = tx.send(c.spawn());
        loop {
            std::thread::park();
        }
    });
    rx.recv().map_err(|_| std::io::Error::other("the thread spawning moto_server died"))?
}

fn http(port: u16, method: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").ok()?;
    let mut b = String::new();
    s.read_to_string(&mut b).ok()?;
    b.split_whitespace().nth(1)?.parse().ok()
}

/// One server for the whole test binary; the environment points the client
/// at it (set once, before any test uses S3).
fn moto() -> u16 {
    static SRV: Mutex<Option<Moto>> = Mutex::new(None);
    let mut g = SRV.lock().unwrap();
    if let Some(m) = g.as_ref() {
        return m.port;
    }
    let have = |c: &str| Command::new("sh").args(["-c", &format!("command -v {c}")]).output().map(|o| o.status.success()).unwrap_or(false);
    if !have("moto_server") {
        let st = Command::new("python3").args(["-m", "pip", "install", "-q", "moto[server]>=5.2,<6"]).status().expect("python3 -m pip");
        assert!(st.success(), "pip install 'moto[server]' failed: these tests need a real S3-compatible server");
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut c = Command::new("moto_server");
    c.args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let child = spawn_tied(c).expect("start moto_server");
    let m = Moto { port, child };
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(port, "GET", "/").is_none() {
        assert!(Instant::now() < deadline, "moto_server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http(port, "PUT", &format!("/{BUCKET}")), Some(200));
    // SAFETY (of the process environment): set under the mutex before any
    // S3 client of this binary exists; no test reads these variables itself.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"));
        std::env::set_var("AWS_ACCESS_KEY_ID", "k");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "s");
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    *g = Some(m);
    port
}

fn blob(i: u32, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = i.wrapping_mul(2654435761).wrapping_add(1);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn commit(store: &Store, range: std::ops::Range<u32>) -> (u64, Vec<Hash>) {
    let w = store.writer().unwrap();
    let mut hs = Vec::new();
    for i in range {
        let d = blob(i, 4096);
        let h = Hash::of(&d);
        w.put(BlobKind::Chunk, h, &d).unwrap();
        hs.push(h);
    }
    let m = w.put_meta(format!("manifest {hs:?}").as_bytes()).unwrap();
    let parent = store.latest().unwrap().map(|g| g.id);
    let g = w
        .commit(NewGeneration {
            parent,
            created_ms: 0,
            duration_ms: 0,
            nprocs: 1,
            logical_bytes: hs.len() as u64 * 4096,
            dirty_tracking: "test".into(),
            manifest: m,
            info: serde_json::Value::Null,
        })
        .unwrap();
    (g.id, hs)
}

fn url(prefix: &str) -> String {
    format!("s3://{BUCKET}/{prefix}")
}

fn cache(d: &Path, n: &str) -> Option<std::path::PathBuf> {
    Some(d.join(n))
}

#[test]
fn commit_uploads_and_a_fresh_cache_reads_back_with_ranges() {
    moto();
    let d = tempfile::tempdir().unwrap();
    let u = url("roundtrip");
    let a = Store::open_s3_at(&u, cache(d.path(), "a"), Some(4096)).unwrap();
    let (g1, h1) = commit(&a, 0..100);
    let (g2, h2) = commit(&a, 50..300);
    assert_eq!((g1, g2), (1, 2));
    drop(a);
    // Fresh host: no packs in the cache, every blob fetched by range and verified.
    let b = Store::open_s3_at(&u, cache(d.path(), "b"), None).unwrap();
    assert_eq!(b.generations().unwrap().len(), 2);
    for (i, h) in h1.iter().enumerate().take(5) {
        assert_eq!(b.read_blob(h).unwrap(), blob(i as u32, 4096));
    }
    let got = Mutex::new(0usize);
    b.read_blobs(&h2, |h, data| {
        assert_eq!(Hash::of(data), *h);
        *got.lock().unwrap() += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(*got.lock().unwrap(), h2.len());
    let packs = std::fs::read_dir(b.root().join("packs")).unwrap().count();
    assert_eq!(packs, 0, "reads downloaded pack files into the cache");
    // A writer on the fresh cache continues the numbering.
    let (g3, _) = commit(&b, 300..310);
    assert_eq!(g3, 3);
    let c = Store::open_s3_at(&u, cache(d.path(), "c"), None).unwrap();
    assert_eq!(c.latest().unwrap().unwrap().id, 3);
    // The cache of `a` picks up generation 3 on its next open.
    let a = Store::open_s3_at(&u, cache(d.path(), "a"), None).unwrap();
    assert_eq!(a.latest().unwrap().unwrap().id, 3);
}

#[test]
fn missing_store_and_bucket_are_named() {
    moto();
    let d = tempfile::tempdir().unwrap();
    let e = Store::open_s3_at(&url("none"), cache(d.path(), "x"), None).unwrap_err();
    assert!(e.to_string().contains("holds no ckpt store"), "{e}");
    let e = Store::open_s3_at("s3://no-bucket-here/p", cache(d.path(), "y"), Some(4096)).unwrap_err();
    assert!(e.to_string().contains("bucket no-bucket-here does not exist"), "{e}");
}

#[test]
fn two_writers_on_one_cache_the_second_is_refused() {
    moto();
    let d = tempfile::tempdir().unwrap();
    let u = url("twowriters");
    let a = Store::open_s3_at(&u, cache(d.path(), "a"), Some(4096)).unwrap();
    let b = Store::open_s3_at(&u, cache(d.path(), "a"), None).unwrap();
    let w = a.writer().unwrap();
    let e = b.writer().unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    assert!(e.to_string().contains("in use by another ckpt process"), "{e}");
    drop(w);
    b.writer().unwrap();
}

#[test]
fn corrupt_object_is_reported_with_its_name() {
    moto();
    let d = tempfile::tempdir().unwrap();
    let u = url("corrupt");
    let a = Store::open_s3_at(&u, cache(d.path(), "a"), Some(4096)).unwrap();
    let (_, hs) = commit(&a, 0..50);
    let r = a.remote().unwrap();
    let packs = r.list_packs().unwrap();
    assert_eq!(packs.len(), 1);
    let name = packs.keys().next().unwrap().clone();
    let rel = Remote::pack_rel(&name);
    let mut bytes = std::fs::read(a.pack_path(&name)).unwrap();
    for b in bytes.iter_mut().skip(8).step_by(97) {
        *b ^= 1;
    }
    r.put_bytes(&rel, bytes.clone()).unwrap();
    let b = Store::open_s3_at(&u, cache(d.path(), "b"), None).unwrap();
    let e = b.read_blobs(&hs, |_, _| Ok(())).unwrap_err();
    assert!(e.to_string().contains(&name) && e.to_string().contains("s3://"), "{e}");
    // Truncated.
    bytes.truncate(100);
    r.put_bytes(&rel, bytes).unwrap();
    let e = b.read_blob(&hs[40]).unwrap_err();
    assert!(e.to_string().contains("truncated") && e.to_string().contains(&name), "{e}");
    // pull refuses it too.
    let e = remote::pull(&u, d.path().join("pulled").to_str().unwrap(), &NoProgress).unwrap_err();
    assert!(e.to_string().contains("corrupt") && e.to_string().contains(&name), "{e}");
}

#[test]
fn push_pull_resume() {
    moto();
    let d = tempfile::tempdir().unwrap();
    let local = Store::open_or_create(d.path().join("local").to_str().unwrap(), 4096).unwrap();
    for k in 0..4 {
        commit(&local, k * 100..k * 100 + 150);
    }
    let u = url("pushpull");
    let r1 = remote::push(&local, &u, &NoProgress).unwrap();
    assert_eq!(r1.packs_sent, r1.packs_total);
    assert!(r1.packs_total >= 4);
    // Lose two packs on the remote: a re-run sends just those.
    let r = Remote::connect(&u).unwrap();
    let names: Vec<String> = r.list_packs().unwrap().into_keys().take(2).collect();
    for n in &names {
        r.delete(&Remote::pack_rel(n)).unwrap();
    }
    let r2 = remote::push(&local, &u, &NoProgress).unwrap();
    assert_eq!((r2.packs_sent, r2.packs_skipped), (2, r1.packs_total - 2));
    let dest = d.path().join("pulled");
    let p1 = remote::pull(&u, dest.to_str().unwrap(), &NoProgress).unwrap();
    assert_eq!(p1.packs_sent, r1.packs_total);
    let p2 = remote::pull(&u, dest.to_str().unwrap(), &NoProgress).unwrap();
    assert_eq!(p2.packs_sent, 0);
    let pulled = Store::open(dest.to_str().unwrap()).unwrap();
    assert_eq!(pulled.generations().unwrap(), local.generations().unwrap());
    assert!(pulled.verify().unwrap().is_ok());
    // A diverged destination is refused.
    commit(&pulled, 1000..1010);
    let e = remote::pull(&u, dest.to_str().unwrap(), &NoProgress).unwrap_err();
    assert!(e.to_string().contains("lacks"), "{e}");
}

/// A lock object as another host's writer would leave it.
fn foreign_lock(host: &str, refreshed_ago_ms: i64, lease_secs: u64) -> Vec<u8> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    serde_json::to_vec(&ckpt_store::remote_lock::Holder {
        host: host.into(),
        pid: 4242,
        command: "ckpt coordinator".into(),
        acquired_ms: now - refreshed_ago_ms - 1000,
        refreshed_ms: now - refreshed_ago_ms,
        lease_secs,
        token: "elsewhere".into(),
    })
    .unwrap()
}

/// Two caches of one prefix are two hosts: the S3 lock object keeps their
/// writers apart (moto honours `If-None-Match: *`, else the second writer
/// would get it), names the holder, and is gone once released.
#[test]
fn s3_writer_lock_keeps_two_hosts_apart() {
    moto();
    let d = tempfile::tempdir().unwrap();
    let u = url("s3lock");
    let a = Store::open_s3_at(&u, cache(d.path(), "a"), Some(4096)).unwrap();
    let b = Store::open_s3_at(&u, cache(d.path(), "b"), None).unwrap();
    let w = a.writer().unwrap();
    let r = a.remote().unwrap();
    assert!(r.head(ckpt_store::remote_lock::LOCK_OBJECT).unwrap().is_some(), "no lock object while a writer is open");
    let e = b.writer().unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&format!("pid {}", std::process::id())) && msg.contains(&format!("{u}/lock")) && msg.contains("lease"), "{msg}");
    drop(w);
    assert!(r.head(ckpt_store::remote_lock::LOCK_OBJECT).unwrap().is_none(), "lock object left after release");
    // Polls within half a second are answered from memory; then S3 is asked again.
    std::thread::sleep(Duration::from_millis(600));
    let (g, _) = commit(&b, 0..10);
    assert_eq!(g, 1);
}

/// A fresh lock of another host is respected; a lock whose lease ran out
/// is broken; a writer whose lock was taken away uploads no catalog.
#[test]
fn s3_stale_lock_is_broken_and_a_lost_lock_uploads_nothing() {
    moto();
    let d = tempfile::tempdir().unwrap();
    let u = url("s3stale");
    let a = Store::open_s3_at(&u, cache(d.path(), "a"), Some(4096)).unwrap();
    let r = a.remote().unwrap();
    let lock = ckpt_store::remote_lock::LOCK_OBJECT;
    r.put_bytes(lock, foreign_lock("other-host", 0, 60)).unwrap();
    let e = a.writer().unwrap_err();
    assert!(e.to_string().contains("on host other-host") && e.to_string().contains("pid 4242"), "{e}");
    // Its lease ran out: broken.
    r.put_bytes(lock, foreign_lock("other-host", 5_000, 2)).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let (g1, _) = commit(&a, 0..10);
    assert_eq!(g1, 1);
    // Someone breaks our lock while we write (If-Match refreshes fail):
    // the commit is not uploaded and S3's catalog stays at generation 1.
    let w = a.writer().unwrap();
    let before = r.head(remote::CATALOG_OBJECT).unwrap().unwrap().etag;
    r.put_bytes(lock, foreign_lock("other-host", 0, 60)).unwrap();
    let d1 = blob(999, 4096);
    let h = Hash::of(&d1);
    w.put(BlobKind::Chunk, h, &d1).unwrap();
    let m = w.put_meta(b"manifest lost").unwrap();
    let e = w
        .commit(NewGeneration {
            parent: Some(g1),
            created_ms: 0,
            duration_ms: 0,
            nprocs: 1,
            logical_bytes: 4096,
            dirty_tracking: "test".into(),
            manifest: m,
            info: serde_json::Value::Null,
        })
        .unwrap_err();
    assert!(e.to_string().contains("lost the writer lock"), "{e}");
    assert_eq!(r.head(remote::CATALOG_OBJECT).unwrap().unwrap().etag, before, "a writer without the lock uploaded a catalog");
    drop(w);
    // The foreign lock is left alone by our release.
    assert!(r.head(lock).unwrap().is_some(), "our release deleted another writer's lock");
    r.delete(lock).unwrap();
}
