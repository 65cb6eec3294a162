//! The coordinator daemon.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::collections::{HashMap, HashSet};

use ckpt_engine::capture::{AgentReport, Base};
use ckpt_engine::dirty::Backend;
use ckpt_engine::fds::TcpEnd;
use ckpt_engine::image::{GenerationManifest, IMAGE_VERSION};
use ckpt_store::{GenerationInfo, NewGeneration, Store, Writer};
use ckpt_wire::Pod;
use ckpt_wire::agent::{self as proto, CheckpointRequest, Failed, Header, Hello, NowDone, Prepare, Resume, Welcome, kind};
use serde_json::{Value, json};

use crate::host::Op;
use crate::host::remote::RemoteHost;
use crate::machine::{self, AgentLink, Captured, RoundOpts, Stray, Target, Work, parse_suspended};
use crate::protocol::{self, CheckpointReply, CoordinatorStatus, Done, External, HelloReply, KillReply, ProcessStatus, Request, StatusReply};
use crate::{Address, CoordError, Stream};

/// How the coordinator runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub addr: Address,
    pub store_url: String,
    /// Checkpoint this often while processes are registered.
    pub interval: Option<Duration>,
    /// Forked checkpointing: the program resumes once a copy-on-write
    /// snapshot is taken, and the snapshot is stored while it runs.
    pub fork: bool,
    /// Command hooks and the hook timeout (`--hook`, `--hook-timeout`).
    pub hooks: crate::hooks::Hooks,
}

/// How long a checkpoint waits for another writer (`ckpt gc`) to finish.
const WRITER_WAIT: Duration = Duration::from_secs(300);
/// How many rounds a checkpoint tries when a round meets a moving target.
const CHECKPOINT_ATTEMPTS: u32 = 4;
/// How long the restart on one host waits for the others'.
const RESTART_BARRIER_SECS: u64 = 120;
/// How long a new child may take to register with the coordinator.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a process may take to stop all its threads.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a capture helper may take for its share of a phase.
const HOST_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a new connection may take to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// The same for a connection of our own user or root, or a TCP peer that
/// proved a key: `ckpt restart` opens each restored agent's connection
/// before it writes the memory, and the agent speaks first only once its
/// process runs (seconds later for a big image on a loaded machine).
const TRUSTED_FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the stopped phase of a round may take by default (`$CKPT_ROUND_DEADLINE`
/// seconds overrides it): past it the step in progress fails, naming itself
/// and its process, and the processes resume.
const ROUND_DEADLINE_S: u64 = 60;
/// How long `ckpt kill`/`quit` wait for a cancelled round to let go of the
/// processes; past it they go ahead anyway.
const CANCEL_WAIT: Duration = Duration::from_secs(5);
/// How long `ckpt kill` waits for the killed processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(8);
/// How long `ckpt kill` waits for processes still joining (a restart's,
/// whose program may already run) before it kills the others; the late
/// ones are killed as they join.
const KILL_JOIN_WAIT: Duration = Duration::from_secs(10);
/// Most connections that have not yet sent a whole first message (each
/// holds a thread): more are closed at once.
const MAX_UNAUTHENTICATED: usize = 64;

/// A registered process: its machine ([`machine::machine_key`], 0 for the
/// coordinator's own) and its pid there.
type Key = (u64, i32);

enum AgentMsg {
    Frame(u32, Vec<u8>),
    Closed,
}

struct Proc {
    conn_id: u64,
    /// 0: read by the coordinator itself; else the key of the machine whose
    /// capture helper reads it.
    machine: u64,
    hello: Hello,
    host: String,
    writer: Mutex<Stream>,
    rx: Mutex<Receiver<AgentMsg>>,
    since_ms: i64,
    /// Why the coordinator closed this agent's connection, if it did.
    broken: Mutex<Option<String>>,
    /// A pidfd on the registered process (this machine's processes only):
    /// `ckpt kill` goes through it, never through a pid.
    pidfd: Option<std::os::fd::OwnedFd>,
    /// A checkpoint this process asked for (CHECKPOINT_NOW) is in progress.
    asking: Arc<AtomicBool>,
}

impl Proc {
    fn send(&self, kind: u32, payload: &[u8]) -> std::io::Result<()> {
        // One write: a round sends CHECKPOINT and RESUME to every process
        // back to back, and each write may wake the agent (which then
        // takes the core from the loop that still has others to send).
        let mut frame = Vec::with_capacity(std::mem::size_of::<Header>() + payload.len());
        frame.extend_from_slice(Header::new(kind, payload.len()).as_bytes());
        frame.extend_from_slice(payload);
        self.writer.lock().unwrap().write_all(&frame)
    }

    fn recv(&self, timeout: Duration) -> Option<(u32, Vec<u8>)> {
        match self.rx.lock().unwrap().recv_timeout(timeout) {
            Ok(AgentMsg::Frame(k, p)) => Some((k, p)),
            Ok(AgentMsg::Closed) | Err(RecvTimeoutError::Disconnected) | Err(RecvTimeoutError::Timeout) => None,
        }
    }

    /// Ends this agent's membership: its connection is closed (the agent
    /// resumes its threads on its own when it sees that).
    fn close(&self, why: String) {
        tracing::warn!(pid = self.hello.pid, "closing the agent's connection: {why}");
        self.broken.lock().unwrap().get_or_insert(why);
        self.writer.lock().unwrap().shutdown();
    }

    /// What a round says of an agent that did not answer.
    fn silent(&self, what: String) -> String {
        match &*self.broken.lock().unwrap() {
            Some(why) => format!("process {}: {why}; its connection is closed", self.hello.pid),
            None => what,
        }
    }
}

struct Coordinator {
    cfg: Config,
    store: Store,
    procs: Mutex<BTreeMap<Key, Arc<Proc>>>,
    /// Per pid of this machine: (connection, what its last committed
    /// capture left). Capture helpers keep their machine's.
    bases: Mutex<HashMap<i32, (u64, Base)>>,
    /// Capture helpers, by machine key.
    hosts: Mutex<HashMap<u64, Arc<RemoteHost>>>,
    /// Bumped whenever generations seen earlier are gone from the store
    /// (gc): capture helpers then forget which blobs it holds.
    epoch: AtomicU64,
    seen_gens: Mutex<Vec<u64>>,
    ckpt_lock: Mutex<()>,
    next_conn: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Fds given to the computation from outside by `ckpt restart` (its
    /// stdio): (fd, readlink target).
    externals: Mutex<Vec<(i32, String)>>,
    /// Per generation, the restart barrier of its hosts.
    restarts: Mutex<HashMap<u64, RestartBarrier>>,
    started: Instant,
    host: String,
    /// This coordinator's PID namespace inode and boot id.
    pidns: u64,
    boot_id: String,
    quit: AtomicBool,
    /// The coordinator's effective uid: its user (and root) may use every
    /// command; other users' processes may only register as agents that
    /// hold the membership key.
    uid: u32,
    agent_key: [u8; 32],
    /// Connections that have not yet sent their first message.
    pending: std::sync::atomic::AtomicUsize,
    /// Connections of our own user, root or a proved TCP peer that have not
    /// yet said what they are, or (agents) not yet joined: a restored
    /// process's connection, opened by `ckpt restart` before the process
    /// runs, stays here until its HELLO is served ([`Joining`]).
    joining: Joining,
    /// Set by `ckpt kill`/`quit`: the round in progress ends at once.
    cancel: Arc<AtomicBool>,
    /// Seconds the stopped phase of a round may take.
    deadline_s: u64,
    /// The computation's command hooks and hook timeout.
    hooks: Mutex<crate::hooks::Hooks>,
}

/// `CLOCK_MONOTONIC` in ns: the clock agents of this machine report in.
fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64).unwrap_or(0)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Runs the coordinator until `ckpt quit`.
pub fn run(cfg: Config) -> Result<(), CoordError> {
    let secret_path = crate::Secret::default_path()?;
    let secret = crate::Secret::load_or_create(&secret_path)?;
    let store = Store::open_or_create(&cfg.store_url, ckpt_store::DEFAULT_CHUNK_SIZE)?;
    // One store, one computation: held for the coordinator's whole life
    // (the writer lock is only taken per checkpoint, so gc runs between).
    let _owner = store.claim_owner(&format!("coordinator at {}", cfg.addr))?;
    // Fail now, not at the first checkpoint, if another process writes it.
    drop(store.writer()?);
    let listener = cfg.addr.listen(&secret).map_err(|e| CoordError::Listen { addr: cfg.addr.to_string(), source: e })?;
    if matches!(cfg.addr, Address::Tcp(_)) {
        tracing::info!(secret = %secret_path.display(), "TCP peers must prove the secret in this file (copy it, mode 0600, to the computation's other machines)");
    }
    tracing::info!(addr = %cfg.addr, store = %cfg.store_url, "coordinator listening");
    let c = Arc::new(Coordinator {
        cfg: cfg.clone(),
        store,
        procs: Mutex::new(BTreeMap::new()),
        bases: Mutex::new(HashMap::new()),
        hosts: Mutex::new(HashMap::new()),
        epoch: AtomicU64::new(0),
        seen_gens: Mutex::new(Vec::new()),
        ckpt_lock: Mutex::new(()),
        next_conn: AtomicU64::new(1),
        last_error: Mutex::new(None),
        externals: Mutex::new(Vec::new()),
        restarts: Mutex::new(HashMap::new()),
        started: Instant::now(),
        host: hostname(),
        pidns: crate::host::pidns(),
        boot_id: crate::host::boot_id(),
        quit: AtomicBool::new(false),
        uid: nix::unistd::geteuid().as_raw(),
        agent_key: secret.agent_key(),
        pending: std::sync::atomic::AtomicUsize::new(0),
        joining: Joining::default(),
        cancel: Arc::new(AtomicBool::new(false)),
        hooks: Mutex::new(cfg.hooks.clone()),
        deadline_s: std::env::var("CKPT_ROUND_DEADLINE").ok().and_then(|v| v.parse().ok()).filter(|&s| s > 0).unwrap_or(ROUND_DEADLINE_S),
    });
    if let Some(every) = cfg.interval {
        let c = c.clone();
        std::thread::spawn(move || interval_loop(c, every));
    }
    // Processes of the computation that changed their uid cannot reach the
    // private socket any more (a program that drops privileges, then execs
    // or forks): they join through the member socket, which speaks only the
    // agent protocol and admits other users only with the membership key.
    if let Some(name) = cfg.addr.member_socket() {
        let l = crate::addr::bind_member_socket(&name).map_err(|e| CoordError::Listen { addr: format!("the member socket @{name}"), source: e })?;
        let c = c.clone();
        std::thread::spawn(move || {
            for stream in l.incoming() {
                let Ok(stream) = stream else { continue };
                if c.quit.load(Ordering::Acquire) {
                    return;
                }
                c.clone().admit_connection(Stream::Unix(stream).into(), "local".into(), Some(crate::addr::Proved::AgentOnly));
            }
        });
    }
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        if c.quit.load(Ordering::Acquire) {
            break;
        }
        c.clone().admit_connection(stream, peer, None);
    }
    if let Address::Unix(p) = &cfg.addr {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

impl Coordinator {
    /// Counts a new connection against [`MAX_UNAUTHENTICATED`] and serves it
    /// in a thread of its own (after its TCP handshake, if any). `limit`
    /// narrows what the peer may do whatever it proves.
    fn admit_connection(self: Arc<Self>, stream: crate::addr::Accepted, peer: String, limit: Option<crate::addr::Proved>) {
        let c = self;
        // The coordinator's own user and root are never turned away; others
        // (and TCP peers, until their channel says who they are) share the cap.
        let counted = !stream.peer_cred().is_some_and(|p| p.uid == 0 || p.uid == c.uid);
        if counted && c.pending.fetch_add(1, Ordering::AcqRel) >= MAX_UNAUTHENTICATED {
            c.pending.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(peer = %peer, cred = ?stream.peer_cred(), "closed a connection: {MAX_UNAUTHENTICATED} others have not sent their first message yet");
            return;
        }
        std::thread::spawn(move || match stream.establish(&peer) {
            Some((stream, proved)) => c.serve(stream, peer, limit.unwrap_or(proved), counted),
            None => c.unpend(counted),
        });
    }
}

/// The PID namespace of process `pid` (ours) and its PID there.
fn ns_view(pid: i32) -> Option<(u64, i32)> {
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    let ns = ns.to_str()?.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let inner = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?.split_whitespace().last()?.parse().ok()?;
    Some((ns, inner))
}

fn interval_loop(c: Arc<Coordinator>, every: Duration) {
    loop {
        std::thread::sleep(every);
        if c.quit.load(Ordering::Acquire) {
            return;
        }
        if c.procs.lock().unwrap().is_empty() {
            continue;
        }
        match c.checkpoint() {
            Ok(g) => tracing::info!(generation = g.id, "interval checkpoint committed"),
            Err(e) => tracing::warn!("interval checkpoint failed: {e}"),
        }
    }
}

impl Coordinator {
    /// The gate. On a Unix connection the kernel says who connected
    /// (`SO_PEERCRED`): the coordinator's own user and root get every
    /// command; anyone else may only register as an agent holding the
    /// membership key. TCP peers proved the secret (or only the membership
    /// key, `proved`) in their channel's handshake.
    fn serve(self: Arc<Self>, mut stream: Stream, peer: String, proved: crate::addr::Proved, counted: bool) {
        let cred = stream.peer_cred();
        let trusted = cred.is_none_or(|c| c.uid == 0 || c.uid == self.uid);
        let mut first = [0u8; 4];
        let known = !counted || cred.is_none();
        // A connection of our own (a restored agent's, made by `ckpt
        // restart` before its process runs) is joining until it says what
        // it is, for `ckpt kill` to wait for.
        let ticket = known.then(|| self.joining.enter());
        let _ = stream.set_read_timeout(Some(if known { TRUSTED_FIRST_MESSAGE_TIMEOUT } else { FIRST_MESSAGE_TIMEOUT }));
        let got = stream.read_exact(&mut first);
        if got.is_err() {
            self.unpend(counted);
            return;
        }
        if u32::from_le_bytes(first) == proto::MAGIC {
            self.clone().serve_agent(stream, first, peer, cred, trusted, counted, ticket);
            return;
        }
        drop(ticket);
        self.unpend(counted);
        let _ = stream.set_read_timeout(None);
        if proved == crate::addr::Proved::AgentOnly {
            // The membership key makes a process a member, nothing more.
            tracing::warn!(peer, "closed a connection that proved only the membership key but did not speak the agent protocol");
            stream.shutdown();
            return;
        }
        if !trusted {
            let c = cred.unwrap_or(crate::PeerCred { pid: 0, uid: u32::MAX, gid: u32::MAX });
            tracing::warn!(uid = c.uid, pid = c.pid, "refused a command from another user: only uid {} and root may command this coordinator", self.uid);
            stream.shutdown();
            return;
        }
        if u32::from_le_bytes(first) == crate::host::MAGIC {
            self.serve_host(stream, first);
        } else {
            self.serve_client(stream, first);
        }
    }

    /// A connection counted against [`MAX_UNAUTHENTICATED`] sent its first
    /// message (or gave up).
    fn unpend(&self, counted: bool) {
        if counted {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn serve_agent(
        self: Arc<Self>,
        mut stream: Stream,
        first: [u8; 4],
        peer: String,
        cred: Option<crate::PeerCred>,
        trusted: bool,
        counted: bool,
        ticket: Option<JoinTicket<'_>>,
    ) {
        let hello = self.read_hello(&mut stream, first);
        self.unpend(counted);
        let Some(hello) = hello else { return };
        let _ = stream.set_read_timeout(None);
        if let Err(why) = self.admit(&hello, cred, trusted) {
            let c = cred.unwrap_or(crate::PeerCred { pid: 0, uid: u32::MAX, gid: u32::MAX });
            tracing::warn!(uid = c.uid, pid = c.pid, claimed_pid = hello.pid, peer = %peer, "refused an agent: {why}");
            stream.shutdown();
            return;
        }
        let pidfd = if self.machine_of(&hello) == 0 { machine::pidfd_open(hello.pid) } else { None };
        if self.machine_of(&hello) == 0 && pidfd.is_none() {
            tracing::warn!(claimed_pid = hello.pid, "refused an agent: its process is gone");
            return;
        }
        if hello.restored_gen != 0 {
            hold_for_tests("join-");
        }
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx): (Sender<AgentMsg>, Receiver<AgentMsg>) = channel();
        let Ok(writer) = stream.try_clone() else { return };
        let host = match hello.host_name() {
            "" if peer == "local" => self.host.clone(),
            "" => peer,
            name => name.to_string(),
        };
        let machine = self.machine_of(&hello);
        let key = (machine, hello.pid);
        let p = Arc::new(Proc {
            conn_id,
            machine,
            hello,
            host,
            writer: Mutex::new(writer),
            rx: Mutex::new(rx),
            since_ms: now_ms(),
            pidfd,
            broken: Mutex::new(None),
            asking: Arc::new(AtomicBool::new(false)),
        });
        let welcome = Welcome { ok: 1, _pad: 0, last_gen: 0 };
        if p.send(kind::WELCOME, welcome.as_bytes()).is_err() {
            return;
        }
        {
            // A process that execs joins again from its new image while the
            // old image's connection may still be on its way in: the old
            // one's thread can reach this lock after the new one's (seen
            // under load), and must not replace it, or its close at once
            // (the exec closed its socket) would take the process out of
            // the computation. A connection's id orders its joins: the new
            // image's HELLO is read after the old one's WELCOME was sent.
            let mut procs = self.procs.lock().unwrap();
            match procs.get(&key) {
                Some(newer) if newer.conn_id > conn_id => {
                    tracing::debug!(pid = hello.pid, "an older connection of the process came in after its newer one; kept the newer");
                }
                _ => {
                    tracing::info!(pid = hello.pid, restored_from = hello.restored_gen, "process joined");
                    procs.insert(key, p.clone());
                }
            }
        }
        // Joined, so a `ckpt kill` from now on sees it; one that came
        // while it was joining (and waited for it in vain) kills it here.
        if ticket.is_some_and(|t| t.leave()) {
            tracing::warn!(pid = hello.pid, "a process joined after `ckpt kill` stopped waiting for it: killed");
            if let Some(fd) = &p.pidfd {
                machine::pidfd_kill(fd);
            }
        }
        loop {
            let mut hb = [0u8; 16];
            if stream.read_exact(&mut hb).is_err() {
                break;
            }
            let Some(h) = Header::read_from(&hb) else { break };
            // Capped before anything is allocated for the payload.
            let len = match h.payload_len(proto::MAGIC, proto::MAX_PAYLOAD) {
                Ok(len) => len,
                Err(e) => {
                    p.close(format!("it sent {e}"));
                    break;
                }
            };
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).is_err() {
                break;
            }
            if h.kind == kind::CHECKPOINT_NOW {
                self.clone().checkpoint_for(p.clone());
                continue;
            }
            if tx.send(AgentMsg::Frame(h.kind, payload)).is_err() {
                break;
            }
        }
        let _ = tx.send(AgentMsg::Closed);
        let mut procs = self.procs.lock().unwrap();
        if procs.get(&key).map(|p| p.conn_id) == Some(conn_id) {
            procs.remove(&key);
            tracing::info!(pid = hello.pid, "process left");
        }
    }

    /// The HELLO that must open an agent's connection (header then
    /// payload, at most a few hundred bytes), within the first-message
    /// timeout.
    fn read_hello(&self, stream: &mut Stream, first: [u8; 4]) -> Option<Hello> {
        let mut rest = [0u8; 12];
        stream.read_exact(&mut rest).ok()?;
        let mut hb = first.to_vec();
        hb.extend_from_slice(&rest);
        let h = Header::read_from(&hb)?;
        let len = h.payload_len(proto::MAGIC, 4 * std::mem::size_of::<Hello>()).ok()?;
        if h.kind != kind::HELLO {
            return None;
        }
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).ok()?;
        Hello::parse(&payload)
    }

    /// Whether an agent may register. Its process must exist with a pid
    /// the kernel vouches for: on a Unix connection the process that
    /// connected, or (for the connections `ckpt restart` makes for the
    /// processes it restores) a descendant of it. A process of another
    /// user than the coordinator's must hold the membership key.
    fn admit(&self, hello: &Hello, cred: Option<crate::PeerCred>, trusted: bool) -> Result<(), String> {
        if hello.pid <= 0 {
            return Err(format!("it claims pid {}", hello.pid));
        }
        if !trusted && !crate::secret::keys_equal(&hello.key, &self.agent_key) {
            return Err("it runs as another user and lacks the computation's membership key (CKPT_AGENT_KEY, set by `ckpt launch`)".into());
        }
        let Some(c) = cred else { return Ok(()) };
        if self.machine_of(hello) != 0 {
            // A process in a PID namespace below ours (one ckpt made for its
            // computation): the connection was made by it (the kernel
            // gives us its PID here and its PID there) or by that
            // namespace's init (ckpt's, restarting it), and by our user.
            return match ns_view(c.pid) {
                Some((ns, inner)) if trusted && ns == hello.pidns && (inner == hello.pid || inner == 1) => Ok(()),
                _ => Err(format!("a local connection (pid {}) claims pid {} of another PID namespace, which it is not in", c.pid, hello.pid)),
            };
        }
        if c.pid == hello.pid {
            return Ok(());
        }
        // A restored process speaks on a connection its restart driver
        // made: it must be the driver's descendant.
        let mut p = hello.pid;
        for _ in 0..64 {
            match ckpt_engine::procfs::tree_ids(p) {
                Ok(t) if t.ppid == c.pid => return Ok(()),
                Ok(t) if t.ppid > 1 => p = t.ppid,
                _ => break,
            }
        }
        // A restored daemon was reparented away from the driver: then the
        // process must at least hold a socket where it says its
        // connection is.
        if trusted
            && std::fs::read_link(format!("/proc/{}/fd/{}", hello.pid, hello.agent_fd)).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
        {
            return Ok(());
        }
        Err(format!("it claims pid {}, but the connection was made by pid {}, which is neither that process nor its ancestor", hello.pid, c.pid))
    }

    /// Serves one request of the CLI ([`crate::protocol`]): a bad one is
    /// answered naming what was wrong, and only its connection closes.
    fn serve_client(self: Arc<Self>, mut stream: Stream, first: [u8; 4]) {
        let Ok(mut out) = stream.try_clone() else { return };
        let _ = stream.set_read_timeout(Some(protocol::REQUEST_TIMEOUT));
        let req = match protocol::read_line(&mut stream, &first, protocol::MAX_LINE).and_then(|l| Request::decode(&l)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("refused a client request: {e}");
                let _ = out.write_all(&protocol::error_line(&e.to_string()));
                return;
            }
        };
        let answer = match req {
            Request::Hello {} => Ok(protocol::ok_line(&self.hello())),
            Request::Status {} => Ok(protocol::ok_line(&self.status())),
            Request::Checkpoint {} => match self.checkpoint() {
                Ok(g) => Ok(protocol::ok_line(&CheckpointReply { generation: g.id, info: g })),
                Err(e) => {
                    *self.last_error.lock().unwrap() = Some(e.clone());
                    Err(e)
                }
            },
            Request::Kill {} => self.kill_all().map(|k| protocol::ok_line(&k)),
            Request::Externals { fds } => {
                self.add_externals(fds);
                Ok(protocol::ok_line(&Done {}))
            }
            Request::RestartBarrier { generation, arrived, hosts } => self.restart_barrier(generation, arrived, hosts).map(|()| protocol::ok_line(&Done {})),
            Request::WaitProcess { pid } => self.wait_process(pid).map(|()| protocol::ok_line(&Done {})),
            Request::SetHooks { hooks } => {
                tracing::info!(?hooks, "command hooks set");
                *self.hooks.lock().unwrap() = hooks;
                Ok(protocol::ok_line(&Done {}))
            }
            Request::Quit {} => {
                self.quit.store(true, Ordering::Release);
                // No checkpoint may be half-way when we go: a round in
                // progress is cancelled (its processes resume); the catalog
                // is left as one self-contained file before we answer.
                match self.cancel_round() {
                    Some(no_checkpoint) => {
                        if let Err(e) = self.store.checkpoint_wal() {
                            tracing::warn!("folding the catalog's WAL: {e}");
                        }
                        std::mem::forget(no_checkpoint);
                    }
                    None => tracing::warn!("quitting while a checkpoint round did not let go within {} s (nothing of it is committed)", CANCEL_WAIT.as_secs()),
                }
                let _ = out.write_all(&protocol::ok_line(&Done {}));
                if let Address::Unix(p) = &self.cfg.addr {
                    let _ = std::fs::remove_file(p);
                }
                tracing::info!("quit requested");
                std::process::exit(0);
            }
        };
        let _ = out.write_all(&answer.unwrap_or_else(|e| protocol::error_line(&e)));
    }

    fn hello(&self) -> HelloReply {
        HelloReply { store: self.cfg.store_url.clone(), addr: self.cfg.addr.to_string(), pid: std::process::id() }
    }

    /// `ckpt restart`'s stdio, as fds of the computation's outside.
    fn add_externals(&self, fds: Vec<External>) {
        let mut ext = self.externals.lock().unwrap();
        for External { fd, target } in fds {
            if !ext.iter().any(|(_, t)| *t == target) {
                ext.push((fd, target));
            }
        }
    }

    /// The restarts of one generation on several hosts: each names the
    /// hosts (as recorded) whose processes it brings back, and is answered
    /// once every host has arrived.
    fn restart_barrier(&self, generation: u64, arrived: Vec<String>, hosts: Vec<String>) -> Result<(), String> {
        {
            let mut all = self.restarts.lock().unwrap();
            // Barriers that opened a while ago are done with.
            all.retain(|g, b| *g == generation || b.1.is_none_or(|t| t.elapsed() <= Duration::from_secs(5)));
            if !all.contains_key(&generation) && all.len() >= protocol::MAX_LIST {
                return Err(format!("{} restart barriers are open already: let them finish (or time out) first", all.len()));
            }
            let entry = all.entry(generation).or_default();
            // A barrier that opened a while ago belongs to an earlier
            // restart of this generation.
            if entry.1.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
                *entry = Default::default();
            }
            entry.0.extend(arrived);
        }
        let deadline = Instant::now() + Duration::from_secs(RESTART_BARRIER_SECS);
        loop {
            let mut all = self.restarts.lock().unwrap();
            let entry = all.entry(generation).or_default();
            let missing: Vec<&String> = hosts.iter().filter(|h| !entry.0.contains(*h)).collect();
            if missing.is_empty() {
                entry.1.get_or_insert_with(Instant::now);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let e = format!(
                    "no restart of generation {generation} arrived from host(s) {missing:?} within {RESTART_BARRIER_SECS} s: run `ckpt restart {generation} --host NAME` on each host of the generation"
                );
                return Err(e);
            }
            drop(all);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Returns once process `pid` registered (a restored process).
    fn wait_process(&self, pid: i32) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.procs.lock().unwrap().keys().any(|(_, p)| *p == pid) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!("process {pid} did not register with the coordinator"))
    }

    fn status(&self) -> StatusReply {
        let processes = self
            .procs
            .lock()
            .unwrap()
            .values()
            .map(|p| {
                let pid = p.hello.pid;
                // Processes of other machines: their helper knows.
                let comm = if p.machine == 0 { std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string() } else { String::new() };
                ProcessStatus {
                    pid,
                    ppid: p.hello.ppid,
                    host: p.host.clone(),
                    comm,
                    restored_from: p.hello.restored_gen,
                    since_ms: p.since_ms,
                    dirty_tracking: Backend::choose(p.hello.tracking, p.hello.uffd_fd).name().to_string(),
                    fork: self.cfg.fork && p.hello.flags & proto::HELLO_NO_FORK == 0,
                }
            })
            .collect();
        StatusReply {
            coordinator: CoordinatorStatus {
                pid: std::process::id(),
                addr: self.cfg.addr.to_string(),
                uptime_s: self.started.elapsed().as_secs(),
                interval_s: self.cfg.interval.map(|d| d.as_secs()),
            },
            store: self.cfg.store_url.clone(),
            processes,
            last_generation: self.store.latest().ok().flatten(),
            last_error: self.last_error.lock().unwrap().clone(),
        }
    }

    /// A checkpoint the program asked for (`ckpt_checkpoint_now`), in a
    /// thread of its own: answered with NOW_DONE once it ended. One at a
    /// time per process.
    fn checkpoint_for(self: Arc<Self>, p: Arc<Proc>) {
        if p.asking.swap(true, Ordering::AcqRel) {
            let d = NowDone::new(None, "a checkpoint this process asked for is in progress already");
            let _ = p.send(kind::NOW_DONE, d.as_bytes());
            return;
        }
        std::thread::spawn(move || {
            tracing::info!(pid = p.hello.pid, "checkpoint asked for by the program");
            let d = match self.checkpoint() {
                Ok(g) => NowDone::new(Some(g.id), ""),
                Err(e) => {
                    *self.last_error.lock().unwrap() = Some(e.clone());
                    NowDone::new(None, &e)
                }
            };
            p.asking.store(false, Ordering::Release);
            let _ = p.send(kind::NOW_DONE, d.as_bytes());
        });
    }

    /// What a command hook is told.
    fn hook_env(&self, procs: &[Arc<Proc>]) -> crate::hooks::HookEnv {
        crate::hooks::HookEnv { store: self.cfg.store_url.clone(), coord: self.cfg.addr.to_string(), pids: procs.iter().map(|p| p.hello.pid).collect(), ..Default::default() }
    }

    /// The first step of a checkpoint, every program running: the
    /// pre-checkpoint command hook, then PREPARE to every agent (each runs
    /// its program's pre-checkpoint callbacks), all within the hook
    /// timeout. Returns the agents that were asked (they get ROUND_DONE
    /// whatever happens next; None if the pre-checkpoint command failed),
    /// and the error that refuses the round.
    fn prepare(&self, hooks: &crate::hooks::Hooks, procs: &[Arc<Proc>]) -> (Option<Vec<Arc<Proc>>>, Result<(), String>) {
        if let Some(cmd) = &hooks.pre_checkpoint
            && let Err(e) = crate::hooks::run("pre-checkpoint", cmd, hooks.timeout(), &self.hook_env(procs)) {
                return (None, Err(e));
            }
        let timeout = hooks.timeout();
        let msg = Prepare { timeout_ms: timeout.as_millis() as u64, _reserved: 0 };
        let mut asked = Vec::new();
        let mut failure = None;
        // Processes stopped by job control cannot run callbacks (nor
        // answer): their machine's helper says which they are.
        let mut stopped: HashSet<Key> = HashSet::new();
        let mut by_machine: HashMap<u64, Vec<i32>> = HashMap::new();
        for p in procs.iter().filter(|p| p.hello.version >= 4) {
            if p.machine == 0 {
                if ckpt_engine::jobstop::is_stopped(p.hello.pid) {
                    stopped.insert((0, p.hello.pid));
                }
            } else {
                by_machine.entry(p.machine).or_default().push(p.hello.pid);
            }
        }
        for (m, pids) in by_machine {
            let Some(h) = self.hosts.lock().unwrap().get(&m).cloned() else { continue };
            match h.call(Op::Stopped { pids }, SUSPEND_TIMEOUT) {
                Ok(a) => stopped.extend(a.get("stopped").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_i64).map(|p| (m, p as i32))),
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        for p in procs {
            // Agents older than the hooks, and processes stopped by job
            // control, are not asked.
            if p.hello.version < 4 || stopped.contains(&(p.machine, p.hello.pid)) {
                continue;
            }
            // Answers of an earlier PREPARE that came too late.
            while let Ok(AgentMsg::Frame(..)) = p.rx.lock().unwrap().try_recv() {}
            match p.send(kind::PREPARE, msg.as_bytes()) {
                Ok(()) => asked.push(p.clone()),
                Err(e) => failure = failure.or(Some(format!("process {} cannot be reached: {e}", p.hello.pid))),
            }
        }
        // The agent keeps to the timeout itself; a margin for the answer.
        let deadline = Instant::now() + timeout + Duration::from_secs(5);
        for p in &asked {
            let left = deadline.saturating_duration_since(Instant::now());
            let what = match self.recv(p, left) {
                Some((kind::PREPARED, _)) => continue,
                Some((kind::FAILED, payload)) => Failed::read_from(&payload).map(|f| String::from_utf8_lossy(f.message()).into_owned()).unwrap_or_default(),
                Some((k, _)) => format!("it answered PREPARE with message kind {k}"),
                None => p.silent(format!("its pre-checkpoint callbacks did not return within {} s", timeout.as_secs())),
            };
            let comm = if p.machine == 0 { std::fs::read_to_string(format!("/proc/{}/comm", p.hello.pid)).unwrap_or_default().trim().to_string() } else { p.host.clone() };
            failure = failure.or(Some(format!("process {} ({comm}): {what}", p.hello.pid)));
        }
        (Some(asked), failure.map_or(Ok(()), Err))
    }

    /// The last step of a checkpoint whose first step ran: ROUND_DONE to
    /// every agent asked to prepare, then the post-checkpoint command hook.
    fn after_round(&self, hooks: &crate::hooks::Hooks, asked: &[Arc<Proc>], procs: &[Arc<Proc>], result: &Result<GenerationInfo, String>) {
        let generation = result.as_ref().map_or(0, |g| g.id);
        let done = Resume { outcome: if result.is_ok() { proto::OUTCOME_WRITTEN } else { proto::OUTCOME_ABORTED }, _pad: 0, generation };
        for p in asked {
            let _ = p.send(kind::ROUND_DONE, done.as_bytes());
        }
        if let Some(cmd) = &hooks.post_checkpoint {
            let env = crate::hooks::HookEnv {
                generation,
                outcome: Some(if result.is_ok() { "committed" } else { "failed" }),
                error: result.as_ref().err().cloned(),
                ..self.hook_env(procs)
            };
            if let Err(e) = crate::hooks::run("post-checkpoint", cmd, hooks.timeout(), &env) {
                tracing::warn!("{e}");
                *self.last_error.lock().unwrap() = Some(e);
            }
        }
    }

    /// One checkpoint of every registered process: all or nothing, between
    /// the hooks' first and last steps ([`Self::prepare`], [`Self::after_round`]).
    fn checkpoint(&self) -> Result<GenerationInfo, String> {
        let _one_at_a_time = self.ckpt_lock.lock().unwrap();
        let hooks = self.hooks.lock().unwrap().clone();
        let procs: Vec<Arc<Proc>> = self.procs.lock().unwrap().values().cloned().collect();
        if procs.is_empty() {
            return Err("no processes to checkpoint: start one with `ckpt launch -- PROGRAM`".into());
        }
        let t_prepare = Instant::now();
        let (asked, prepared) = self.prepare(&hooks, &procs);
        tracing::debug!(ms = t_prepare.elapsed().as_secs_f64() * 1000.0, asked = asked.as_ref().map_or(0, Vec::len), "pre-checkpoint step");
        let result = match prepared {
            Ok(()) => self.checkpoint_rounds(),
            Err(e) => {
                let e = format!("checkpoint refused: {e}; no generation was written, and the programs go on");
                tracing::warn!("{e}");
                Err(e)
            }
        };
        // The last step runs whenever the pre-checkpoint command (if any)
        // succeeded: what it or a callback closed may be opened again.
        if let Some(asked) = asked {
            self.after_round(&hooks, &asked, &procs, &result);
        }
        result
    }

    /// The rounds of one checkpoint (tried again on a moving target).
    fn checkpoint_rounds(&self) -> Result<GenerationInfo, String> {
        // A round that met a moving target (a TCP connection that received
        // data while the computation was read, a connection not yet
        // accepted) is tried again after the programs ran a moment.
        let mut attempt = 1;
        loop {
            match self.checkpoint_once() {
                Err((e, true)) if attempt < CHECKPOINT_ATTEMPTS && !self.cancel.load(Ordering::Acquire) => {
                    tracing::info!(attempt, "checkpoint round refused ({e}); trying again");
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(100 * attempt as u64));
                }
                r => return r.map_err(|(e, _)| e),
            }
        }
    }

    /// One round; an error says whether trying again may succeed.
    fn checkpoint_once(&self) -> Result<GenerationInfo, (String, bool)> {
        let t0 = Instant::now();
        let procs: Vec<Arc<Proc>> = self.procs.lock().unwrap().values().cloned().collect();
        if procs.is_empty() {
            return Err(("no processes to checkpoint: start one with `ckpt launch -- PROGRAM`".into(), false));
        }
        let mut hosts: HashMap<u64, Arc<RemoteHost>> = HashMap::new();
        for p in procs.iter().filter(|p| p.machine != 0) {
            match self.hosts.lock().unwrap().get(&p.machine) {
                Some(h) => {
                    hosts.insert(p.machine, h.clone());
                }
                None => {
                    return Err((format!(
                        "process {} on host {} runs on another machine or in another PID namespace than this coordinator, and no capture \
                         helper serves it: run `ckpt host --coord {}` on that host, in the processes' PID namespace",
                        p.hello.pid, p.host, self.cfg.addr
                    ), false));
                }
            }
        }
        // A process stopped by job control cannot answer (its checkpoint
        // thread is stopped too): that one thread is kept running for the
        // round, by ptrace, here or by the helper of its machine; the rest
        // stays stopped (ckpt_engine::jobstop). Dropped at the round's end.
        let mut _wakers = Vec::new();
        let mut remote_wake: HashMap<u64, Vec<[i32; 2]>> = HashMap::new();
        for p in &procs {
            if p.machine != 0 {
                remote_wake.entry(p.machine).or_default().push([p.hello.pid, p.hello.ckpt_tid]);
            } else if ckpt_engine::jobstop::is_stopped(p.hello.pid) {
                _wakers.push(ckpt_engine::jobstop::Waker::start(p.hello.pid, p.hello.ckpt_tid).map_err(|e| (e, false))?);
            }
        }
        let mut _remote_wakers = Vec::new();
        for (machine, targets) in remote_wake {
            let h = hosts[&machine].clone();
            let a = h.call(Op::Wake { targets }, SUSPEND_TIMEOUT).map_err(|e| (e, false))?;
            if a.get("woken").and_then(Value::as_u64).unwrap_or(0) > 0 {
                _remote_wakers.push(RemoteWakers(h));
            }
        }
        // The store's writer lock is taken per checkpoint, so that `ckpt gc`
        // can work between checkpoints; wait for it if gc holds it now.
        let writer = Arc::new(self.take_writer().map_err(|e| (e, false))?);
        let epoch = self.note_removals();
        let generation = writer.next_generation_id();
        let req = CheckpointRequest { generation, flags: 0 };
        // The last commit's catalog fold ends before the stop, not during it.
        writer.wait_catalog_fold();
        // The programs are stopped from here until RESUME.
        let t_stop = Instant::now();
        let mono_stop = mono_ns();
        let mut sent = Vec::new();
        let mut failure: Option<String> = None;
        for p in &procs {
            match p.send(kind::CHECKPOINT, req.as_bytes()) {
                Ok(()) => sent.push(p.clone()),
                Err(e) => failure = Some(format!("process {} cannot be reached: {e}", p.hello.pid)),
            }
        }
        let sent_ms = t_stop.elapsed().as_secs_f64() * 1000.0;
        // Stop everyone; remember who is stopped.
        let mut stopped: Vec<Stopped> = Vec::new();
        for p in &sent {
            match self.recv(p, SUSPEND_TIMEOUT) {
                Some((kind::SUSPENDED, payload)) => match parse_suspended(&p.hello, &payload) {
                    Ok(report) => stopped.push(Stopped { p: p.clone(), report, raw: payload }),
                    Err(e) => {
                        p.close(e.clone());
                        failure = Some(e);
                    }
                },
                Some((kind::FAILED, payload)) => {
                    let f = Failed::read_from(&payload);
                    let msg = f.map(|f| String::from_utf8_lossy(f.message()).into_owned()).unwrap_or_default();
                    failure = Some(format!("process {} could not stop: {msg}", p.hello.pid));
                }
                Some((k, _)) => failure = Some(format!("process {} answered with message kind {k}", p.hello.pid)),
                None if self.cancel.load(Ordering::Acquire) => failure = Some(format!("the checkpoint was cancelled (`ckpt kill` or `ckpt quit`) while process {} was stopping", p.hello.pid)),
                None => failure = Some(p.silent(format!("process {} died or did not stop within {}s", p.hello.pid, SUSPEND_TIMEOUT.as_secs()))),
            }
        }
        let all_suspended_ms = t_stop.elapsed().as_secs_f64() * 1000.0;
        if failure.is_none()
            && let Err(f) = self.stop_descendants(&req, &mut stopped, &hosts) {
                failure = Some(f);
            }
        tracing::debug!(sent_ms, all_suspended_ms, descendants_ms = t_stop.elapsed().as_secs_f64() * 1000.0 - all_suspended_ms, "stopped phase: processes stopped");
        if failure.is_none() {
            hold_for_tests("");
        }
        let suspend_ms = t_stop.elapsed().as_secs_f64() * 1000.0;
        if let Some(f) = failure {
            writer.abort();
            finish_round(&stopped, proto::OUTCOME_ABORTED, generation, &[]);
            tracing::warn!("checkpoint aborted: {f}");
            return Err((f, false));
        }
        // The tracking bases of this machine's processes are consumed: on
        // success they are replaced, on failure tracking starts over with a
        // full read. (Helpers do the same with theirs.)
        let mut bases: HashMap<i32, Base> = HashMap::new();
        {
            let mut all = self.bases.lock().unwrap();
            for s in stopped.iter().filter(|s| s.p.machine == 0) {
                if let Some((conn, b)) = all.remove(&s.p.hello.pid)
                    && conn == s.p.conn_id {
                        bases.insert(s.p.hello.pid, b);
                    }
            }
        }
        let opts = RoundOpts {
            generation,
            fork: self.cfg.fork,
            chunk_size: self.store.chunk_size(),
            externals: self.externals.lock().unwrap().clone(),
            deadline_s: self.deadline_s,
            cancel: self.cancel.clone(),
        };
        for h in hosts.values() {
            h.begin(writer.clone());
        }
        // Every machine's processes have ended their round (snapshots
        // killed, helpers told) when this returns with an error.
        let abort = |work: &[Work], e: String| {
            writer.abort();
            let snapshots: Vec<i32> = work.iter().filter_map(|w| w.snapshot).collect();
            self.end_hosts(&hosts, false);
            finish_round(&stopped, proto::OUTCOME_ABORTED, generation, &snapshots);
            tracing::warn!("checkpoint aborted: {e}");
        };

        // Phase A, everyone stopped: metadata, dirty pages, snapshot; every
        // machine at once.
        let local: Vec<(Target, AgentReport)> = stopped.iter().filter(|s| s.p.machine == 0).map(|s| (s.target(), s.report.clone())).collect();
        let link = LocalLink(self);
        // Every machine's TCP connections stay in repair mode until every
        // machine is read.
        let gate = machine::Gate::new(hosts.len() + usize::from(!local.is_empty()));
        let (mut work, results) = std::thread::scope(|sc| {
            let remote: Vec<_> = hosts
                .values()
                .map(|h| {
                    let targets: Vec<Target> = stopped.iter().filter(|s| s.p.machine == h.key).map(Stopped::target).collect();
                    let (opts, gate) = (&opts, &gate);
                    sc.spawn(move || remote_phase_a(h, targets, opts, epoch, gate))
                })
                .collect();
            let (work, local_result) = if local.is_empty() {
                (Vec::new(), Ok(Vec::new()))
            } else {
                let arrived = std::cell::Cell::new(false);
                let r = machine::phase_a(&local, &bases, &*writer, &link, &opts, &|| {
                    arrived.set(true);
                    gate.arrive()
                });
                if !arrived.get() {
                    gate.fail();
                }
                r
            };
            let mut results = vec![local_result];
            results.extend(remote.into_iter().map(|t| t.join().unwrap_or_else(|_| Err(("internal: a helper thread panicked".into(), false)))));
            (work, results)
        });
        let mut ends: Vec<TcpEnd> = Vec::new();
        let mut first_err = None;
        for r in results {
            match r {
                Ok(e) => ends.extend(e),
                Err(e) => {
                    // A retry only if every failure says so.
                    first_err = match first_err {
                        None => Some(e),
                        Some((m, retry)) => Some((m, retry && e.1)),
                    }
                }
            }
        }
        if first_err.is_none()
            && let Err(e) = ckpt_engine::fds::check_tcp_ends(&ends) {
                let retry = matches!(e, ckpt_engine::EngineError::SocketBusy { .. });
                first_err = Some((e.to_string(), retry));
            }
        if let Some(e) = first_err.or_else(|| hosts.values().find_map(|h| h.blob_error()).map(|e| (e, false))) {
            abort(&work, e.0.clone());
            return Err(e);
        }
        let phase_a_ms = t_stop.elapsed().as_secs_f64() * 1000.0;
        let resume = Resume { outcome: proto::OUTCOME_WRITTEN, _pad: 0, generation };
        for s in &stopped {
            let _ = s.p.send(kind::RESUME, resume.as_bytes());
        }
        let resume_sent_ms = t_stop.elapsed().as_secs_f64() * 1000.0;
        tracing::debug!(phase_a_ms, resume_sent_ms, "stopped phase: processes read, told to resume");
        // The downtime ends when the last program runs again: when its
        // agent let its threads go (RESUMED says when, on this machine's
        // clock), which is after our RESUME reached it.
        let mut downtime_ms = resume_sent_ms;
        let resumed = |s: &Stopped, downtime_ms: &mut f64| {
            if let Some((kind::RESUMED, payload)) = s.p.recv(Duration::from_secs(10))
                && s.p.machine == 0
                && let Some(r) = proto::Resumed::read_from(&payload).filter(|_| payload.len() == std::mem::size_of::<proto::Resumed>())
            {
                let released_ms = r.released_ns.saturating_sub(mono_stop) as f64 / 1e6;
                // (A figure outside the round is not believed.)
                if released_ms <= t_stop.elapsed().as_secs_f64() * 1000.0 {
                    *downtime_ms = downtime_ms.max(released_ms);
                }
            }
        };
        // The processes of this machine that were read while stopped
        // (no snapshot) get the cores to wake up on before phase B takes
        // them: with phase B's hashing running beside them (rayon, every
        // core), the last of 16 let its threads go 1-13 ms after its
        // RESUME under load (bench-trees). An agent with a snapshot says
        // RESUMED once the snapshot is gone, which phase B does: those are
        // waited for after it.
        let forked: HashSet<i32> = work.iter().filter(|w| w.snapshot.is_some()).map(|w| w.pid).collect();
        let early = |s: &Stopped| s.p.machine == 0 && !forked.contains(&s.p.hello.pid);
        for s in stopped.iter().filter(|s| early(s)) {
            resumed(s, &mut downtime_ms);
        }
        let woken_ms = t_stop.elapsed().as_secs_f64() * 1000.0 - resume_sent_ms;

        // Phase B, the programs running again: memory from the snapshots,
        // then the images, from every machine at once.
        let (local_b, remote_b) = std::thread::scope(|sc| {
            let remote: Vec<_> = hosts.values().map(|h| sc.spawn(move || remote_phase_b(h, generation))).collect();
            let local = machine::phase_b(&mut work, &bases, &*writer, generation);
            let remote: Vec<Result<Vec<Captured>, String>> =
                remote.into_iter().map(|t| t.join().unwrap_or_else(|_| Err("internal: a helper thread panicked".into()))).collect();
            (local, remote)
        });
        let phase_b_ms = t_stop.elapsed().as_secs_f64() * 1000.0 - resume_sent_ms - woken_ms;
        for s in stopped.iter().filter(|s| !early(s)) {
            resumed(s, &mut downtime_ms);
        }
        tracing::debug!(woken_ms, phase_b_ms, resume_sent_ms, downtime_ms, resumed_wait_ms = t_stop.elapsed().as_secs_f64() * 1000.0 - resume_sent_ms - woken_ms - phase_b_ms, "running phase done");
        let mut captured = Vec::new();
        let mut new_bases = Vec::new();
        let mut failed = None;
        match local_b {
            Ok(done) => {
                for (c, b) in done {
                    new_bases.push((c.entry.pid, c.conn, b));
                    captured.push(c);
                }
            }
            Err(e) => failed = Some(e),
        }
        for r in remote_b {
            match r {
                Ok(c) => captured.extend(c),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        let blob_errors: Vec<String> = hosts.values().filter_map(|h| h.end()).collect();
        let result = match failed.or(blob_errors.into_iter().next()) {
            Some(e) => Err(e),
            None => self.commit(&writer, generation, captured, t0, [downtime_ms, suspend_ms, resume_sent_ms]),
        };
        match result {
            Ok(g) => {
                self.end_hosts(&hosts, true);
                let mut all = self.bases.lock().unwrap();
                for (pid, conn, b) in new_bases {
                    all.insert(pid, (conn, b));
                }
                self.seen_gens.lock().unwrap().push(g.id);
                tracing::info!(generation = g.id, ms = g.duration_ms, downtime_ms, new_bytes = g.new_bytes, "generation committed");
                Ok(g)
            }
            Err(e) => {
                writer.abort();
                self.end_hosts(&hosts, false);
                tracing::warn!("checkpoint aborted: {e}");
                Err((e, false))
            }
        }
    }

    /// Tells every helper of the round how it ended (it installs its new
    /// bases, or drops them, and kills its snapshots).
    fn end_hosts(&self, hosts: &HashMap<u64, Arc<RemoteHost>>, committed: bool) {
        for h in hosts.values() {
            h.end();
            if let Err(e) = h.call(Op::End { committed }, Duration::from_secs(30)) {
                tracing::warn!("{e}");
            }
        }
    }

    /// The epoch helpers compare to know whether blobs may have left the
    /// store since the last round: bumped when a generation seen before is
    /// gone (gc ran).
    fn note_removals(&self) -> u64 {
        let now: HashSet<u64> = self.store.generations().map(|g| g.iter().map(|g| g.id).collect()).unwrap_or_default();
        let mut seen = self.seen_gens.lock().unwrap();
        if seen.iter().any(|g| !now.contains(g)) {
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
        *seen = now.into_iter().collect();
        self.epoch.load(Ordering::Acquire)
    }

    /// Writes the manifest of every machine's images and commits the generation.
    /// `stopped`: the downtime, the part of it until every process was
    /// stopped, and the time the last RESUME was sent (ms from the round's
    /// first CHECKPOINT).
    fn commit(&self, writer: &Writer, generation: u64, mut captured: Vec<Captured>, t0: Instant, stopped: [f64; 3]) -> Result<GenerationInfo, String> {
        let [downtime_ms, suspend_ms, resume_sent_ms] = stopped;
        let mut backends: Vec<String> = Vec::new();
        let mut logical = 0;
        let mut summary = Vec::new();
        let mut entries = Vec::new();
        let nprocs = captured.len() as u32;
        // A generation that could not restore is never committed.
        let images: Vec<ckpt_engine::image::ProcessImage> = captured.iter_mut().filter_map(|c| c.image.take().map(|i| *i)).collect();
        let tc = Instant::now();
        ckpt_engine::restore::check_tree(generation, &images).map_err(|e| e.to_string())?;
        tracing::debug!(ms = tc.elapsed().as_secs_f64() * 1000.0, "images checked");
        for c in captured {
            logical += c.logical_bytes;
            if !backends.contains(&c.backend) {
                backends.push(c.backend.clone());
            }
            summary.push(c.summary);
            entries.push(c.entry);
        }
        let manifest = GenerationManifest { version: IMAGE_VERSION, generation, processes: entries };
        let mbytes = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
        let mhash = writer.put_meta(&mbytes).map_err(|e| e.to_string())?;
        let parent = self.store.latest().map_err(|e| e.to_string())?.map(|g| g.id);
        let g = writer
            .commit(NewGeneration {
                parent,
                created_ms: now_ms(),
                duration_ms: t0.elapsed().as_millis() as u64,
                nprocs,
                logical_bytes: logical,
                dirty_tracking: backends.join(","),
                manifest: mhash,
                info: {
                    let mut info = json!({"processes": summary, "downtime_ms": downtime_ms, "suspend_ms": suspend_ms, "resume_sent_ms": resume_sent_ms});
                    // Stored with the computation: `ckpt restart` runs
                    // them again.
                    let hooks = self.hooks.lock().unwrap().clone();
                    if !hooks.is_empty() {
                        info["hooks"] = serde_json::to_value(&hooks).map_err(|e| e.to_string())?;
                    }
                    info
                },
            })
            .map_err(|e| e.to_string())?;
        if g.id != generation {
            tracing::warn!(expected = generation, got = g.id, "generation number moved");
        }
        Ok(g)
    }

    /// The live children of `parents` (all on machine `machine`) that are
    /// not in `known`.
    fn strays(&self, machine: u64, hosts: &HashMap<u64, Arc<RemoteHost>>, parents: &[i32], known: &HashSet<i32>) -> Result<Vec<Stray>, String> {
        if machine == 0 {
            return Ok(machine::strays(parents, known));
        }
        let h = hosts.get(&machine).ok_or("internal: no helper for a machine of the round")?;
        let a = h.call(Op::Children { parents: parents.to_vec(), known: known.iter().copied().collect() }, SUSPEND_TIMEOUT)?;
        serde_json::from_value(a.get("strays").cloned().unwrap_or_default()).map_err(|e| format!("host {}: {e}", h.name))
    }

    fn alive(&self, machine: u64, hosts: &HashMap<u64, Arc<RemoteHost>>, pid: i32) -> bool {
        if machine == 0 {
            return machine::alive(pid);
        }
        hosts
            .get(&machine)
            .and_then(|h| h.call(Op::Alive { pid }, SUSPEND_TIMEOUT).ok())
            .and_then(|a| a.get("alive").and_then(Value::as_bool))
            .unwrap_or(false)
    }

    /// Brings the children of the stopped processes into the round: a child
    /// forked (or exec'd) since the round began registers within moments,
    /// and is stopped too. A live child that never registers is outside the
    /// agent's reach (a static program, or one started without the agent's
    /// environment): the round fails, naming it. Exited, unreaped children
    /// (zombies) are recorded in their parent's image instead.
    fn stop_descendants(&self, req: &CheckpointRequest, stopped: &mut Vec<Stopped>, hosts: &HashMap<u64, Arc<RemoteHost>>) -> Result<(), String> {
        loop {
            let mut missing = Vec::new();
            let machines: HashSet<u64> = stopped.iter().map(|s| s.p.machine).collect();
            for m in machines {
                let known: HashSet<i32> = stopped.iter().filter(|s| s.p.machine == m).map(|s| s.p.hello.pid).collect();
                let parents: Vec<i32> = known.iter().copied().collect();
                missing.extend(self.strays(m, hosts, &parents, &known)?.into_iter().map(|s| (m, s)));
            }
            if missing.is_empty() {
                return Ok(());
            }
            for (m, Stray { child, parent, comm }) in missing {
                let deadline = Instant::now() + JOIN_TIMEOUT;
                let proc_ = loop {
                    if let Some(p) = self.procs.lock().unwrap().get(&(m, child)) {
                        break Some(p.clone());
                    }
                    if !self.alive(m, hosts, child) || Instant::now() >= deadline {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                let Some(p) = proc_ else {
                    if self.alive(m, hosts, child) {
                        return Err(format!(
                            "process {child} ({comm}), a child of {parent}, is not under checkpoint control: it runs without the ckpt agent \
                             (a statically linked program, or its environment lost LD_PRELOAD/CKPT_COORD); run it with the agent or let it finish before checkpointing"
                        ));
                    }
                    continue; // it exited meanwhile: a zombie, seen next time round
                };
                p.send(kind::CHECKPOINT, req.as_bytes()).map_err(|e| format!("process {child} cannot be reached: {e}"))?;
                match self.recv(&p, SUSPEND_TIMEOUT) {
                    Some((kind::SUSPENDED, payload)) => match parse_suspended(&p.hello, &payload) {
                        Ok(report) => stopped.push(Stopped { p: p.clone(), report, raw: payload }),
                        Err(e) => {
                            p.close(e.clone());
                            return Err(e);
                        }
                    },
                    _ => return Err(p.silent(format!("process {child} (a child of {parent}) did not stop for the checkpoint"))),
                }
            }
        }
    }

    /// Sends a message to the agent of a stopped process and returns its answer.
    fn agent_call(&self, machine: u64, pid: i32, k: u32, payload: &[u8]) -> Result<(u32, Vec<u8>), String> {
        let p = self.procs.lock().unwrap().get(&(machine, pid)).cloned().ok_or_else(|| format!("process {pid} left the computation during the checkpoint"))?;
        p.send(k, payload).map_err(|e| format!("process {pid}: {e}"))?;
        self.recv(&p, machine::AGENT_TIMEOUT).ok_or_else(|| p.silent(format!("process {pid} did not answer during the checkpoint")))
    }

    /// The agent's next message within `timeout`, or None at once when the
    /// round is cancelled.
    fn recv(&self, p: &Proc, timeout: Duration) -> Option<(u32, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.cancel.load(Ordering::Acquire) {
                return None;
            }
            let slice = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
            match p.rx.lock().unwrap().recv_timeout(slice) {
                Ok(AgentMsg::Frame(k, payload)) => return Some((k, payload)),
                Ok(AgentMsg::Closed) | Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => return None,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Cancels the round in progress, if any, and takes the checkpoint
    /// lock once it let go (its processes resumed): None if it did not
    /// within [`CANCEL_WAIT`].
    fn cancel_round(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.cancel.store(true, Ordering::Release);
        let deadline = Instant::now() + CANCEL_WAIT;
        let guard = loop {
            match self.ckpt_lock.try_lock() {
                Ok(g) => break Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(std::sync::TryLockError::WouldBlock) => break None,
            }
        };
        self.cancel.store(false, Ordering::Release);
        guard
    }

    /// Kills every process of the computation (`ckpt kill`), on every
    /// machine. All are first held by their agents, as for a checkpoint, so
    /// that none sees another die (a reset on a connection to a killed peer
    /// on another machine) before it dies too.
    ///
    /// A round in progress is cancelled first (its processes resume); kill
    /// returns once every process killed here is gone (exited; a zombie is
    /// its parent's to reap), or fails naming the ones that are not.
    fn kill_all(&self) -> Result<KillReply, String> {
        let no_checkpoint = self.cancel_round();
        // A restart's processes may run before they join (their program's
        // first output can come first): they are the computation's too.
        let late = self.joining.doom_and_wait(Instant::now() + KILL_JOIN_WAIT);
        if late > 0 {
            tracing::warn!("{late} connection(s) still joining after {} s: their processes are killed as they join", KILL_JOIN_WAIT.as_secs());
        }
        let procs: Vec<Arc<Proc>> = self.procs.lock().unwrap().values().cloned().collect();
        if no_checkpoint.is_some() {
            let hold = CheckpointRequest { generation: 0, flags: 0 };
            // A process stopped by a signal cannot answer: it is not held.
            let held: Vec<&Arc<Proc>> =
                procs.iter().filter(|p| !(p.machine == 0 && stopped_or_traced(p.hello.pid)) && p.send(kind::CHECKPOINT, hold.as_bytes()).is_ok()).collect();
            // One bound for all: a process that cannot answer (stopped by
            // SIGSTOP) must not hold the others' kill up.
            let until = Instant::now() + Duration::from_secs(3);
            for p in held {
                let _ = p.recv(until.saturating_duration_since(Instant::now()));
            }
        } else {
            tracing::warn!("killing the computation while a checkpoint round did not let go within {} s", CANCEL_WAIT.as_secs());
        }
        // Children without an agent (a snapshot a round still reads, a
        // program started without the agent) are the computation's too:
        // pidfds taken before their parents die and they move away.
        let local: Vec<i32> = procs.iter().filter(|p| p.machine == 0).map(|p| p.hello.pid).collect();
        let known: HashSet<i32> = local.iter().copied().collect();
        let strays: Vec<(i32, std::os::fd::OwnedFd)> = machine::strays(&local, &known).into_iter().filter_map(|s| machine::pidfd_open(s.child).map(|fd| (s.child, fd))).collect();
        let mut by_machine: HashMap<u64, Vec<i32>> = HashMap::new();
        for (_, fd) in &strays {
            machine::pidfd_kill(fd);
        }
        for p in &procs {
            match &p.pidfd {
                // This machine's processes: through the pidfd taken when
                // each registered, never through a pid.
                Some(fd) => machine::pidfd_kill(fd),
                None if p.machine != 0 => by_machine.entry(p.machine).or_default().push(p.hello.pid),
                None => {}
            }
        }
        let mut errors = Vec::new();
        for (m, pids) in &by_machine {
            let h = self.hosts.lock().unwrap().get(m).cloned();
            let r = match h {
                Some(h) => h.call(Op::Kill { pids: pids.clone() }, Duration::from_secs(10)).map(|_| ()),
                None => Err(format!("processes {pids:?} are on a machine without a capture helper: kill them there")),
            };
            if let Err(e) = r {
                errors.push(e);
            }
        }
        let deadline = Instant::now() + KILL_WAIT;
        let mut alive: Vec<i32> = procs.iter().filter_map(|p| p.pidfd.as_ref().filter(|fd| !machine::wait_gone(fd, p.hello.pid, deadline)).map(|_| p.hello.pid)).collect();
        alive.extend(strays.iter().filter(|(pid, fd)| !machine::wait_gone(fd, *pid, deadline)).map(|(pid, _)| *pid));
        if !alive.is_empty() {
            errors.push(format!("processes {alive:?} were sent SIGKILL but are still there after {} s (uninterruptible sleep?): look at /proc/PID/stack", KILL_WAIT.as_secs()));
        }
        let killed: Vec<i32> = procs.iter().map(|p| p.hello.pid).collect();
        if errors.is_empty() { Ok(KillReply { killed }) } else { Err(errors.join("; ")) }
    }

    /// Serves a capture helper (`ckpt host`) until it goes away.
    fn serve_host(self: Arc<Self>, mut stream: Stream, first: [u8; 4]) {
        let Ok(hello) = crate::host::read_msg(&mut stream, Some(first)) else { return };
        let Ok(writer) = stream.try_clone() else { return };
        let name = hello.json.get("host").and_then(Value::as_str).unwrap_or("?").to_string();
        let boot = hello.json.get("boot_id").and_then(Value::as_str).unwrap_or("").to_string();
        let pidns = hello.json.get("pidns").and_then(Value::as_u64).unwrap_or(0);
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(RemoteHost::new(machine::machine_key(boot.as_bytes(), pidns), name.clone(), conn_id, writer));
        let refuse = if hello.kind != crate::host::kind::HELLO {
            Some("the first message must be HELLO".to_string())
        } else if hello.json.get("version").and_then(Value::as_u64) != Some(crate::host::VERSION as u64) {
            Some(format!("protocol version {} is not this coordinator's ({}): run the same ckpt on every host", hello.json["version"], crate::host::VERSION))
        } else if boot.is_empty() || (boot == self.boot_id && pidns == self.pidns) {
            Some("the coordinator reads the processes of its own machine and PID namespace itself: no helper is needed here".to_string())
        } else {
            None
        };
        let welcome = match &refuse {
            Some(e) => json!({"ok": false, "error": e}),
            None => json!({"ok": true}),
        };
        if h.send(crate::host::kind::WELCOME, &welcome, &[]).is_err() || refuse.is_some() {
            return;
        }
        if let Some(old) = self.hosts.lock().unwrap().insert(h.key, h.clone()) {
            tracing::warn!(host = %name, "a new capture helper replaces the one already connected for this machine");
            old.close();
        }
        tracing::info!(host = %name, "capture helper joined");
        while let Ok(m) = crate::host::read_msg(&mut stream, None) {
            if m.kind == crate::host::kind::AGENT {
                // An agent may take a while: answered from a thread of its own.
                let (c, h) = (self.clone(), h.clone());
                std::thread::spawn(move || {
                    let pid = m.json.get("pid").and_then(Value::as_i64).and_then(|p| i32::try_from(p).ok()).filter(|&p| p > 0);
                    let k = m.json.get("kind").and_then(Value::as_u64).and_then(|k| u32::try_from(k).ok());
                    let id = m.json.get("id").cloned().unwrap_or(Value::Null);
                    // A helper asks its machine's stopped agents only what a
                    // round needs: write tracking, the snapshot and POSIX timers.
                    let call = match (pid, k) {
                        (Some(pid), Some(k @ (kind::REGISTER | kind::FORK | kind::TIMERS))) => c.agent_call(h.key, pid, k, &m.data),
                        _ => Err(format!("host {}: a malformed agent request ({}): a helper asks agents only REGISTER, FORK or TIMERS of a process", h.name, m.json)),
                    };
                    let (json, data) = match call {
                        Ok((k, data)) => (json!({"id": id, "ok": true, "kind": k}), data),
                        Err(e) => (json!({"id": id, "ok": false, "error": e}), Vec::new()),
                    };
                    let _ = h.send(crate::host::kind::AGENT_REPLY, &json, &data);
                });
            } else {
                h.on_message(m);
            }
        }
        h.close();
        let mut hosts = self.hosts.lock().unwrap();
        if hosts.get(&h.key).is_some_and(|x| x.conn_id == conn_id) {
            hosts.remove(&h.key);
        }
        tracing::info!(host = %name, "capture helper left");
    }

    /// 0 for a process the coordinator reaches through its own `/proc`
    /// (same kernel, same PID namespace; agents that do not say are), else
    /// the key of its machine.
    fn machine_of(&self, h: &Hello) -> u64 {
        let boot = |b: &[u8]| b.iter().take_while(|&&c| c != 0 && c != b'\n').copied().collect::<Vec<u8>>();
        if (h.pidns == 0 || h.pidns == self.pidns) && (h.boot_id[0] == 0 || boot(&h.boot_id) == boot(self.boot_id.as_bytes())) {
            0
        } else {
            machine::machine_key(&h.boot_id, h.pidns)
        }
    }

    fn take_writer(&self) -> Result<Writer, String> {
        let deadline = Instant::now() + WRITER_WAIT;
        loop {
            match self.store.writer() {
                Ok(w) => return Ok(w),
                Err(ckpt_store::StoreError::Locked { .. }) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// A machine's share of phase A, done by its capture helper.
fn remote_phase_a(h: &RemoteHost, targets: Vec<Target>, opts: &RoundOpts, epoch: u64, gate: &machine::Gate) -> Result<Vec<TcpEnd>, (String, bool)> {
    let a = h.phase_a(Op::PhaseA { opts: opts.clone(), targets, epoch }, gate, HOST_TIMEOUT).map_err(|e| (e, false))?;
    if a.get("ok").and_then(Value::as_bool) != Some(true) {
        let e = a.get("error").and_then(Value::as_str).unwrap_or("refused without a reason");
        return Err((format!("host {}: {e}", h.name), a.get("retry").and_then(Value::as_bool).unwrap_or(false)));
    }
    serde_json::from_value(a.get("ends").cloned().unwrap_or_default()).map_err(|e| (format!("host {}: {e}", h.name), false))
}

/// A machine's share of phase B, done by its capture helper.
fn remote_phase_b(h: &RemoteHost, generation: u64) -> Result<Vec<Captured>, String> {
    let a = h.call(Op::PhaseB { generation }, HOST_TIMEOUT)?;
    serde_json::from_value(a.get("captured").cloned().unwrap_or_default()).map_err(|e| format!("host {}: {e}", h.name))
}

/// Agents of this machine, asked directly.
struct LocalLink<'a>(&'a Coordinator);

impl AgentLink for LocalLink<'_> {
    fn call(&self, pid: i32, k: u32, payload: &[u8]) -> Result<(u32, Vec<u8>), String> {
        self.0.agent_call(0, pid, k, payload)
    }
}

/// A process stopped for the round in progress.
struct Stopped {
    p: Arc<Proc>,
    report: AgentReport,
    /// The SUSPENDED payload, as received (for a capture helper).
    raw: Vec<u8>,
}

impl Stopped {
    fn target(&self) -> Target {
        Target::new(self.p.hello.pid, self.p.conn_id, &self.p.host, &self.p.hello, &self.raw)
    }
}

/// Fault injection for tests: when `$CKPT_TEST_HOLD/armed` exists once
/// every process is stopped, the coordinator removes it, creates
/// `$CKPT_TEST_HOLD/held` and waits (at most 60 s) for `$CKPT_TEST_HOLD/go`,
/// so that a test can kill a process at exactly this point of a checkpoint.
/// With `point` "join-", the same files named `join-armed`, `join-held`
/// and `join-go` hold a restored process's join (its HELLO read, it not yet
/// a member): the moment its program may already run unseen.
fn hold_for_tests(point: &str) {
    let Some(dir) = std::env::var_os("CKPT_TEST_HOLD").map(std::path::PathBuf::from) else { return };
    let file = |name: &str| dir.join(format!("{point}{name}"));
    if std::fs::remove_file(file("armed")).is_err() {
        return;
    }
    let _ = std::fs::write(file("held"), b"");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !file("go").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(file("go"));
    let _ = std::fs::remove_file(file("held"));
}

/// Connections that may yet become members of the computation
/// ([`Coordinator::joining`]), each under a serial of its own and marked
/// once a `ckpt kill` came while it was still joining.
#[derive(Default)]
struct Joining {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, bool>>,
    changed: std::sync::Condvar,
}

/// A connection's place in [`Joining`], given up when it is dropped.
struct JoinTicket<'a> {
    joining: &'a Joining,
    serial: u64,
}

impl Joining {
    fn enter(&self) -> JoinTicket<'_> {
        let serial = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().unwrap().insert(serial, false);
        JoinTicket { joining: self, serial }
    }

    /// Marks every connection joining now as killed, then waits until all
    /// of those have joined or gone, or until `until`: returns how many
    /// are still joining then (each is killed as it joins).
    fn doom_and_wait(&self, until: Instant) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let doomed: Vec<u64> = conns.keys().copied().collect();
        conns.values_mut().for_each(|d| *d = true);
        loop {
            let left = doomed.iter().filter(|s| conns.contains_key(s)).count();
            let now = Instant::now();
            if left == 0 || now >= until {
                return left;
            }
            conns = self.changed.wait_timeout(conns, until - now).unwrap().0;
        }
    }
}

impl JoinTicket<'_> {
    /// Leaves [`Joining`]: whether a kill came while this connection was in it.
    fn leave(self) -> bool {
        let doomed = self.joining.conns.lock().unwrap().remove(&self.serial).unwrap_or(false);
        self.joining.changed.notify_all();
        std::mem::forget(self);
        doomed
    }
}

impl Drop for JoinTicket<'_> {
    fn drop(&mut self) {
        self.joining.conns.lock().unwrap().remove(&self.serial);
        self.joining.changed.notify_all();
    }
}

/// Whether `pid` (of this machine) is stopped by a signal (`T`) or a tracer (`t`).
fn stopped_or_traced(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next())).is_some_and(|c| c == 'T' || c == 't')
}

/// The hosts whose restart of a generation arrived, and when the barrier
/// opened.
type RestartBarrier = (HashSet<String>, Option<Instant>);

/// Ends a round that failed: snapshots killed, every process resumed.
fn finish_round(stopped: &[Stopped], outcome: u32, generation: u64, snapshots: &[i32]) {
    machine::kill_all(snapshots);
    let resume = Resume { outcome, _pad: 0, generation };
    for s in stopped {
        let _ = s.p.send(kind::RESUME, resume.as_bytes());
    }
    for s in stopped {
        let _ = s.p.recv(Duration::from_secs(10));
    }
}

/// A helper's wakers of job-stopped processes for one round: dropped, it
/// tells the helper to let them stop again.
struct RemoteWakers(Arc<RemoteHost>);

impl Drop for RemoteWakers {
    fn drop(&mut self) {
        if let Err(e) = self.0.call(Op::Wake { targets: Vec::new() }, SUSPEND_TIMEOUT) {
            tracing::warn!("{e}");
        }
    }
}
