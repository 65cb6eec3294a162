//! A real one-node Slurm cluster for the Slurm tests: Debian's `slurm-wlm`
//! 22.05 (`slurmctld`, `slurmd`) and `munge`, installed by
//! `scripts/test.sh` (the harness fails naming the packages if they are
//! missing). No mock: jobs are submitted with `sbatch`, signalled with
//! `scancel`, requeued with `scontrol requeue`, and Slurm runs them.
//!
//! [`Slurm::start`] writes everything under the given directory: a munge
//! key of its own and `munged` on a socket there, a `slurm.conf`
//! (`SLURM_CONF` for every command; free loopback ports; state, spool,
//! pid and log files in the directory; `proctrack/linuxproc` and
//! `task/none`, no cgroups; `select/cons_tres`; `cred_expire=5` so a
//! requeued job may start again 6 s later instead of 121; two partitions
//! on the node, `low` (the default, its jobs preempted by requeue) and
//! `high`, by `preempt/partition_prio`), starts the three
//! daemons in the foreground, tied to the test binary (they die with it,
//! see `s3::spawn_tied`), and waits until `sinfo` shows the node idle. One
//! cluster at a time in a test binary (a lock, held by the value): the
//! node is this machine. Dropping it cancels every job, kills what the
//! jobs left that names the directory (a daemonized coordinator), and
//! stops the daemons.
//!
//! [`Slurm::start_nodes`] makes a cluster of several nodes instead, each
//! `slurmd` on a namespace host of its own (`common/netns.rs`: a network
//! namespace with its address on a bridge, a UTS namespace with the node's
//! name), `slurmctld` and `munged` on the machine, reached at the bridge's
//! address; the nodes' spool, pid and log files are per node (`%n`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::s3::{TiedThread, spawn_tied};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub struct Slurm {
    pub dir: PathBuf,
    /// The nodes' names.
    pub nodes: Vec<String>,
    pub conf: PathBuf,
    /// munged, slurmctld, slurmd (stopped in reverse order).
    daemons: Vec<(String, Child, TiedThread)>,
    _lock: MutexGuard<'static, ()>,
}

/// A free TCP port on loopback (bound, then released for the daemon).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn need(bin: &str) -> PathBuf {
    for d in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(d).join(bin);
        if p.is_file() {
            return p;
        }
    }
    panic!("{bin} is not installed: the Slurm tests need Debian's slurm-wlm and munge (apt-get install slurm-wlm munge; scripts/test.sh does it)");
}

/// Where the nodes of a cluster run.
enum Layout<'a> {
    /// One node, this machine, on loopback.
    Here,
    /// Node i in network namespace `netns[i]` (`ip netns`; a host of
    /// `netns::Net::new(n, ...)`, at 10.N.0.i+2), named `names[i]`;
    /// slurmctld at the bridge's address 10.N.0.1.
    Hosts { netns: &'a [String], n: u8, names: &'a [&'a str] },
}

impl Slurm {
    pub fn start(dir: &Path) -> Slurm {
        Slurm::start_in(dir, Layout::Here)
    }

    /// A cluster of one node on each of the namespace hosts `netns` (the
    /// `hosts` of `netns::Net::new(n, ...)`), node i named `names[i]`.
    pub fn start_nodes(dir: &Path, netns: &[String], n: u8, names: &[&str]) -> Slurm {
        assert_eq!(netns.len(), names.len(), "one node name for each host");
        Slurm::start_in(dir, Layout::Hosts { netns, n, names })
    }

    fn start_in(dir: &Path, layout: Layout) -> Slurm {
        let lock = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let (munged, slurmctld, slurmd) = (need("munged"), need("slurmctld"), need("slurmd"));
        need("sbatch");
        let dir = dir.join("slurm");
        // The key's directory is private; the socket's must be searchable
        // by all (munged refuses to run otherwise).
        for d in ["munge", "munge-run", "state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("munge"), std::fs::Permissions::from_mode(0o700)).unwrap();
        // munge wants a key of at least 32 bytes, readable by its user only.
        let key = dir.join("munge/key");
        let mut bytes = vec![0u8; 1024];
        use std::io::Read;
        std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut bytes).unwrap();
        std::fs::write(&key, &bytes).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        let sock = dir.join("munge-run/sock");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
        let (ctld_addr, nodes, node_lines) = match &layout {
            Layout::Here => ("127.0.0.1".to_string(), vec![host.clone()], format!("NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN\n")),
            Layout::Hosts { n, names, .. } => {
                let mut lines = String::new();
                for (i, name) in names.iter().enumerate() {
                    lines += &format!("NodeName={name} NodeAddr=10.{n}.0.{} CPUs=2 State=UNKNOWN\n", i + 2);
                    std::fs::create_dir_all(dir.join("spool").join(name)).unwrap();
                }
                (format!("10.{n}.0.1"), names.iter().map(|s| s.to_string()).collect(), lines)
            }
        };
        let (spool, pid, log) = match layout {
            Layout::Here => ("spool", "slurmd.pid", "slurmd.log"),
            Layout::Hosts { .. } => ("spool/%n", "slurmd-%n.pid", "slurmd-%n.log"),
        };
        let node_list = nodes.join(",");
        let d = dir.display();
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=ckpttest\n\
                 SlurmctldHost={host}({ctld_addr})\n\
                 SlurmctldPort={ctld}\n\
                 SlurmdPort={slurmd_port}\n\
                 SlurmUser=root\n\
                 SlurmdUser=root\n\
                 AuthType=auth/munge\n\
                 CredType=cred/munge\n\
                 AuthInfo=socket={sock},cred_expire=5\n\
                 StateSaveLocation={d}/state\n\
                 SlurmdSpoolDir={d}/{spool}\n\
                 SlurmctldPidFile={d}/slurmctld.pid\n\
                 SlurmdPidFile={d}/{pid}\n\
                 SlurmctldLogFile={d}/log/slurmctld.log\n\
                 SlurmdLogFile={d}/log/{log}\n\
                 ProctrackType=proctrack/linuxproc\n\
                 TaskPlugin=task/none\n\
                 SelectType=select/cons_tres\n\
                 SelectTypeParameters=CR_Core\n\
                 SchedulerType=sched/backfill\n\
                 SchedulerParameters=sched_interval=2\n\
                 MpiDefault=none\n\
                 ReturnToService=2\n\
                 JobCompType=jobcomp/none\n\
                 AccountingStorageType=accounting_storage/none\n\
                 JobAcctGatherType=jobacct_gather/none\n\
                 KillWait=5\n\
                 MinJobAge=600\n\
                 PreemptType=preempt/partition_prio\n\
                 PreemptMode=REQUEUE\n\
                 {node_lines}\
                 PartitionName=low Nodes={node_list} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE\n\
                 PartitionName=high Nodes={node_list} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF\n",
                ctld = free_port(),
                slurmd_port = free_port(),
                sock = sock.display(),
            ),
        )
        .unwrap();
        let mut s = Slurm { dir: dir.clone(), nodes, conf, daemons: Vec::new(), _lock: lock };
        let mut m = Command::new(munged);
        m.args(["-F", "--socket"]).arg(&sock).arg("--key-file").arg(&key).arg("--log-file").arg(dir.join("log/munged.log"));
        m.arg("--pid-file").arg(dir.join("munge/pid")).arg("--seed-file").arg(dir.join("munge/seed"));
        s.spawn("munged", m);
        let until = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(Instant::now() < until, "munged did not make its socket {} within 20 s{}", sock.display(), s.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut c = Command::new(slurmctld);
        c.args(["-D", "-f"]).arg(&s.conf);
        s.spawn("slurmctld", c);
        match layout {
            Layout::Here => {
                let mut n = Command::new(slurmd);
                n.args(["-D", "-f"]).arg(&s.conf);
                s.spawn("slurmd", n);
            }
            Layout::Hosts { netns, names, .. } => {
                // nsenter, not `ip netns exec`: that one mounts a /sys of
                // its own, without /sys/fs/cgroup, and slurmd then fails
                // ("Unable to initialize cgroup plugin"). The PID stays
                // slurmd's through the execs.
                for (i, name) in names.iter().enumerate() {
                    let mut n = Command::new("nsenter");
                    n.arg(format!("--net=/run/netns/{}", netns[i])).args(["unshare", "--uts", "sh", "-c", "hostname \"$0\" && exec \"$@\"", name]);
                    n.arg(&slurmd).args(["-D", "-f"]).arg(&s.conf);
                    s.spawn(&format!("slurmd-{name}"), n);
                }
            }
        }
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let o = s.cmd("sinfo").args(["-h", "-o", "%T"]).output().unwrap();
            let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if !state.is_empty() && state.lines().all(|l| l.trim() == "idle") {
                break;
            }
            assert!(Instant::now() < until, "the Slurm node is not idle after 60 s (sinfo says {state:?}; {})", s.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
        s
    }

    fn spawn(&mut self, what: &str, mut c: Command) {
        let log = std::fs::File::create(self.dir.join("log").join(format!("{what}.stderr"))).unwrap();
        c.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).env("SLURM_CONF", &self.conf);
        let (child, tied) = spawn_tied(c).unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        self.daemons.push((what.to_string(), child, tied));
    }

    /// The ends of the daemons' logs, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let mut files = vec!["slurmctld.log".to_string(), "slurmd.log".into(), "munged.log".into(), "munged.stderr".into(), "slurmctld.stderr".into(), "slurmd.stderr".into()];
        if self.nodes.len() > 1 {
            files.truncate(5);
            for n in &self.nodes {
                files.push(format!("slurmd-{n}.log"));
                files.push(format!("slurmd-{n}.stderr"));
            }
        }
        for l in &files {
            let t = std::fs::read_to_string(self.dir.join("log").join(l)).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(15).collect();
            s += &format!("\n--- {l}:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        s
    }

    /// A Slurm command talking to this cluster.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn ok(&self, mut c: Command) -> Output {
        let o = c.output().unwrap();
        assert!(o.status.success(), "{c:?} failed: {}{}", String::from_utf8_lossy(&o.stderr), self.logs());
        o
    }

    /// `sbatch --parsable ARGS... SCRIPT`: the job id. The job runs in
    /// `dir` with `XDG_RUNTIME_DIR=dir/run` (made 0700), so the
    /// coordinator `ckpt run` starts has its socket and log there, not in
    /// the user's runtime directory.
    pub fn sbatch(&self, dir: &Path, args: &[&str], script: &Path) -> u32 {
        use std::os::unix::fs::DirBuilderExt;
        let run = dir.join("run");
        if !run.exists() {
            std::fs::DirBuilder::new().mode(0o700).create(&run).unwrap();
        }
        let mut c = self.cmd("sbatch");
        c.env("XDG_RUNTIME_DIR", &run).arg("--parsable").arg("-D").arg(dir).args(args).arg(script);
        let o = self.ok(c);
        String::from_utf8_lossy(&o.stdout).trim().split(';').next().unwrap().parse().expect("sbatch printed a job id")
    }

    /// `scancel --batch --signal SIG JOB`: the signal to the batch shell
    /// only, as Slurm sends `--signal=B:SIG@N`.
    pub fn signal_batch(&self, job: u32, sig: &str) {
        let mut c = self.cmd("scancel");
        c.args(["--batch", "--signal", sig, &job.to_string()]);
        self.ok(c);
    }

    pub fn requeue(&self, job: u32) {
        let mut c = self.cmd("scontrol");
        c.args(["requeue", &job.to_string()]);
        self.ok(c);
    }

    /// `KEY` of `scontrol show job JOB` (e.g. JobState, ExitCode, Restarts).
    pub fn job_field(&self, job: u32, key: &str) -> String {
        let o = self.cmd("scontrol").args(["show", "job", &job.to_string()]).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        text.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string)).unwrap_or_default()
    }

    /// Waits until job JOB is in `state` (e.g. RUNNING, COMPLETED).
    pub fn wait_state(&self, job: u32, state: &str, timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            let s = self.job_field(job, "JobState");
            if s == state {
                return;
            }
            assert!(Instant::now() < until, "job {job} is {s}, not {state}, after {timeout:?}{}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        // Every job of the cluster, then what they left behind that names
        // this directory (its store path is in their command line).
        for p in ["low", "high"] {
            let _ = self.cmd("scancel").args(["--full", "--signal", "KILL", "--partition", p]).output();
        }
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            let o = self.cmd("squeue").args(["-h", "-o", "%i"]).output();
            if o.map(|o| o.stdout.is_empty()).unwrap_or(true) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let me = std::process::id().to_string();
        let tag = self.dir.parent().unwrap_or(&self.dir).to_string_lossy().into_owned();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name == me || !name.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&tag) && !self.daemons.iter().any(|(_, c, _)| c.id().to_string() == name) {
                    crate::common::sigkill(name.parse().unwrap());
                }
            }
        }
        for (_, child, _) in self.daemons.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
