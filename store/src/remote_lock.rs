//! The cross-host writer lock of an S3 store: one object,
//! `s3://BUCKET/PREFIX/lock`, that only one writer can create.
//!
//! The cache directory's `flock` keeps writers on one host apart; writers on
//! different hosts sharing a prefix (two coordinators, a coordinator and
//! `ckpt gc` elsewhere) take this lock too, for the whole time they write:
//! from the first pack upload to the catalog upload, and for gc until the
//! last remote pack is deleted.
//!
//! * Taking it is a conditional PUT (`If-None-Match: *`, object_store's
//!   `PutMode::Create`): the server refuses it while the object exists.
//!   The object is JSON: host, pid, command, when it was taken and last
//!   refreshed, the lease and a random token ([`Holder`]).
//! * While held, a thread refreshes it every quarter lease with a PUT that
//!   only succeeds if the object is still the version this writer wrote
//!   (`If-Match: <ETag>`); the same conditional refresh runs right before
//!   every catalog upload ([`RemoteLock::fence`]), so a writer whose lock
//!   was broken never uploads a catalog ([`StoreError::LockLost`]).
//! * A lock is stale, and the next writer breaks it (with a warning naming
//!   the holder), when it was not refreshed for longer than its lease
//!   (default [`DEFAULT_LEASE`], `CKPT_S3_LOCK_LEASE` seconds), or at once
//!   when its holder is on this host (same host name) and its pid is gone.
//!   Breaking is a conditional PUT on the stale version's ETag, so of two
//!   writers breaking the same stale lock, one wins.
//! * Otherwise taking it fails with [`StoreError::Locked`] naming the
//!   holder; the coordinator and `ckpt gc` retry for a while (see their
//!   `--wait`), other commands fail at once.
//! * Released on drop: deleted if it is still this writer's version (a
//!   kill -9 leaves it behind until its lease runs out, or until a writer
//!   on the same host sees that its pid is gone).
//!
//! The host name is the kernel's (`/proc/sys/kernel/hostname`) unless
//! `CKPT_HOSTNAME` is set; hosts sharing a store need distinct names.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use object_store::{PutMode, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::remote::{CondPut, Remote};

/// Name of the lock object under the prefix.
pub const LOCK_OBJECT: &str = "lock";
/// Lease of a lock: a lock not refreshed for this long is stale.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// Environment variable overriding the lease (seconds).
pub const ENV_LEASE: &str = "CKPT_S3_LOCK_LEASE";
/// Environment variable overriding the host name recorded in locks.
pub const ENV_HOSTNAME: &str = "CKPT_HOSTNAME";

/// What the lock object records about its holder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Host name of the holder.
    pub host: String,
    /// Its pid on that host.
    pub pid: u32,
    /// Its command line (the first few words).
    pub command: String,
    /// When it took the lock (ms since the Unix epoch).
    pub acquired_ms: i64,
    /// When it last refreshed the lock.
    pub refreshed_ms: i64,
    /// Its lease in seconds: stale once `refreshed_ms` is older.
    pub lease_secs: u64,
    /// Random token telling this holder's versions apart.
    pub token: String,
}

impl Holder {
    /// "pid 12 on host a (`ckpt gc`), took it 30 s ago, refreshed 2 s ago, lease 60 s".
    pub fn describe(&self, now_ms: i64) -> String {
        format!(
            "pid {} on host {} (`{}`), took it {} s ago, refreshed {} s ago, lease {} s",
            self.pid,
            self.host,
            self.command,
            (now_ms - self.acquired_ms).max(0) / 1000,
            (now_ms - self.refreshed_ms).max(0) / 1000,
            self.lease_secs
        )
    }

    /// Why this lock may be broken now, or `None` if its holder may be alive.
    pub fn stale_reason(&self, now_ms: i64) -> Option<String> {
        if self.host == hostname() && !pid_alive(self.pid) {
            return Some(format!("its process {} no longer runs on this host", self.pid));
        }
        let age = now_ms - self.refreshed_ms;
        if age > self.lease_secs.saturating_mul(1000) as i64 {
            return Some(format!(
                "it was not refreshed for {} s, longer than its {} s lease (its holder died or hangs)",
                age / 1000,
                self.lease_secs
            ));
        }
        None
    }
}

/// This host's name ([`ENV_HOSTNAME`], else the kernel's).
pub fn hostname() -> String {
    if let Some(h) = std::env::var(ENV_HOSTNAME).ok().filter(|h| !h.is_empty()) {
        return h;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn pid_alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else { return false };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(_) => true, // EPERM: it exists
    }
}

fn lease() -> Duration {
    std::env::var(ENV_LEASE)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LEASE)
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().take(3).collect();
    let mut s = args.join(" ");
    if let Some(first) = args.first()
        && let Some(base) = std::path::Path::new(first).file_name()
    {
        s = s.replacen(first.as_str(), &base.to_string_lossy(), 1);
    }
    s
}

struct State {
    holder: Holder,
    etag: String,
    lost: Option<String>,
    stop: bool,
}

struct Shared {
    st: Mutex<State>,
    cv: Condvar,
}

fn lock_state(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.st.lock().unwrap_or_else(|e| e.into_inner())
}

/// The S3 writer lock, held until dropped (see the module doc).
pub struct RemoteLock {
    remote: Arc<Remote>,
    shared: Arc<Shared>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for RemoteLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteLock").field("object", &self.remote.object_url(LOCK_OBJECT)).finish()
    }
}

impl RemoteLock {
    /// Take the lock of `remote`'s store, breaking it if it is stale;
    /// [`StoreError::Locked`] naming the holder if someone else holds it.
    pub fn acquire(remote: &Arc<Remote>) -> Result<RemoteLock> {
        let lease = lease();
        let now = crate::now_ms();
        let token = blake3::hash(format!("{}:{}:{:?}", std::process::id(), now, Instant::now()).as_bytes())
            .to_hex()[..16]
            .to_string();
        let holder = Holder {
            host: hostname(),
            pid: std::process::id(),
            command: command_line(),
            acquired_ms: now,
            refreshed_ms: now,
            lease_secs: lease.as_secs(),
            token,
        };
        let body = serde_json::to_vec(&holder).expect("lock holder serializes");
        let object = remote.object_url(LOCK_OBJECT);
        let mut etag = None;
        // A lock deleted between our refused create and our read: try again.
        for _ in 0..3 {
            if let CondPut::Written(e) = remote.put_if(LOCK_OBJECT, body.clone(), PutMode::Create)? {
                etag = Some(e);
                break;
            }
            let Some((bytes, their_etag, modified_ms)) = remote.get_small(LOCK_OBJECT)? else {
                continue;
            };
            let now = crate::now_ms();
            let (desc, stale) = match serde_json::from_slice::<Holder>(&bytes) {
                Ok(h) => (h.describe(now), h.stale_reason(now)),
                Err(_) => {
                    let age = (now - modified_ms) / 1000;
                    let stale = (age > DEFAULT_LEASE.as_secs() as i64)
                        .then(|| format!("it is not a ckpt lock and is {age} s old"));
                    (format!("an unreadable lock object written {age} s ago"), stale)
                }
            };
            let Some(reason) = stale else {
                return Err(StoreError::Locked {
                    store: remote.url().to_string(),
                    holder: format!(
                        "{desc}; its lock is {object}, broken once the lease runs out without a refresh, or at once by a writer on the same host if that pid is gone"
                    ),
                });
            };
            let update = PutMode::Update(UpdateVersion { e_tag: Some(their_etag), version: None });
            match remote.put_if(LOCK_OBJECT, body.clone(), update)? {
                CondPut::Written(e) => {
                    tracing::warn!(lock = %object, "broke the stale S3 writer lock held by {desc}: {reason}");
                    eprintln!("ckpt: broke the stale writer lock {object} held by {desc}: {reason}");
                    etag = Some(e);
                    break;
                }
                CondPut::Refused => {
                    return Err(StoreError::Locked {
                        store: remote.url().to_string(),
                        holder: format!("another writer took over the stale lock {object} of {desc} first"),
                    });
                }
            }
        }
        let Some(etag) = etag else {
            return Err(StoreError::Locked {
                store: remote.url().to_string(),
                holder: format!("the lock {object} kept changing hands; try again"),
            });
        };
        tracing::debug!(lock = %object, "S3 writer lock taken");
        let shared = Arc::new(Shared {
            st: Mutex::new(State { holder, etag, lost: None, stop: false }),
            cv: Condvar::new(),
        });
        let refresher = {
            let (remote, shared) = (remote.clone(), shared.clone());
            let every = (lease / 4).max(Duration::from_millis(500));
            std::thread::Builder::new()
                .name("ckpt-s3-lock".into())
                .spawn(move || refresh_loop(&remote, &shared, every))
                .map_err(|e| StoreError::io("start the S3 lock refresher", e))?
        };
        Ok(RemoteLock { remote: remote.clone(), shared, refresher: Some(refresher) })
    }

    /// Refresh the lock now and fail with [`StoreError::LockLost`] if it is
    /// no longer this writer's: call right before uploading a catalog.
    pub fn fence(&self) -> Result<()> {
        let mut st = lock_state(&self.shared);
        if st.lost.is_none() {
            refresh(&self.remote, &mut st)?;
        }
        match &st.lost {
            Some(reason) => Err(StoreError::LockLost {
                object: self.remote.object_url(LOCK_OBJECT),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// What the lock object says about us.
    pub fn holder(&self) -> Holder {
        lock_state(&self.shared).holder.clone()
    }
}

/// One conditional refresh; marks the lock lost if S3 refuses it.
fn refresh(remote: &Remote, st: &mut State) -> Result<()> {
    let mut h = st.holder.clone();
    h.refreshed_ms = crate::now_ms();
    let body = serde_json::to_vec(&h).expect("lock holder serializes");
    let mode = PutMode::Update(UpdateVersion { e_tag: Some(st.etag.clone()), version: None });
    match remote.put_if(LOCK_OBJECT, body, mode)? {
        CondPut::Written(e) => {
            st.holder = h;
            st.etag = e;
        }
        CondPut::Refused => {
            let who = remote
                .get_small(LOCK_OBJECT)
                .ok()
                .flatten()
                .and_then(|(b, _, _)| serde_json::from_slice::<Holder>(&b).ok())
                .map(|o| format!("it now belongs to {}", o.describe(crate::now_ms())))
                .unwrap_or_else(|| "it was deleted".into());
            let reason = format!("another writer broke it as stale; {who}");
            tracing::error!(lock = %remote.object_url(LOCK_OBJECT), "S3 writer lock lost: {reason}");
            st.lost = Some(reason);
        }
    }
    Ok(())
}

fn refresh_loop(remote: &Remote, shared: &Shared, every: Duration) {
    let mut st = lock_state(shared);
    loop {
        // Stop may have been asked before this thread first waited.
        st = shared
            .cv
            .wait_timeout_while(st, every, |s| !s.stop && s.lost.is_none())
            .unwrap_or_else(|e| e.into_inner())
            .0;
        if st.stop || st.lost.is_some() {
            return;
        }
        if let Err(e) = refresh(remote, &mut st) {
            tracing::warn!(lock = %remote.object_url(LOCK_OBJECT), error = %e, "cannot refresh the S3 writer lock; trying again");
        }
    }
}

impl Drop for RemoteLock {
    fn drop(&mut self) {
        {
            let mut st = lock_state(&self.shared);
            st.stop = true;
            self.shared.cv.notify_all();
        }
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let st = lock_state(&self.shared);
        if st.lost.is_some() {
            return;
        }
        // Delete it only if it is still our version (S3 has no conditional
        // DELETE here: the HEAD narrows the window to one round trip).
        let object = self.remote.object_url(LOCK_OBJECT);
        match self.remote.head(LOCK_OBJECT) {
            Ok(Some(info)) if info.etag.as_deref() == Some(st.etag.as_str()) => {
                if let Err(e) = self.remote.delete(LOCK_OBJECT) {
                    tracing::warn!(lock = %object, error = %e, "cannot release the S3 writer lock; it goes stale after its lease");
                } else {
                    tracing::debug!(lock = %object, "S3 writer lock released");
                }
            }
            Ok(_) => tracing::warn!(lock = %object, "the S3 writer lock changed hands before release; left alone"),
            Err(e) => tracing::warn!(lock = %object, error = %e, "cannot release the S3 writer lock; it goes stale after its lease"),
        }
    }
}
