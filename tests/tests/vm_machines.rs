//! A machine with a kernel of its own: a VM (Debian's 6.1 kernel under
//! qemu TCG, `tests/vm/run-machines.sh`, guest `tests/vm/guest-machines.sh`)
//! is one machine of a computation whose coordinator runs here (6.18), with
//! the store on a real S3 server (moto) that both reach over the network
//! (qemu user networking: this machine is 10.0.2.2 to the guest).
//!
//! VM `vm1` runs a capture helper (`ckpt host`) and `ckpt launch --
//! counter_heap`; this side checkpoints twice (the second incremental, with
//! the soft-dirty bits of the guest's kernel), checks `ckpt log` names the
//! process as PID@vm1, then powers the VM off. A fresh VM `vm2` (another
//! boot, the same disk: the program's working directory, like a volume
//! re-attached to a replacement machine) restarts it with `--host-map
//! vm1=vm2`; the program continues at the tick of the last checkpoint and
//! is checkpointed once more through vm2's helper, then runs to DONE.
//!
//! Needs root and apt (the script installs qemu, busybox-static, cpio and
//! fetches the kernel package once into `<target>/vm-cache`).
//! `CKPT_SKIP_VM=1` skips it.
mod common;
#[path = "common/s3.rs"]
mod s3srv;
use common::*;
use s3srv::S3Server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BUCKET: &str = "ckpt-vm";
/// From qemu's start to the guest's first line of its own (TCG boot).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// What the guest gives itself before it powers off (every wait of the
/// test is shorter).
const GUEST_LIMIT_S: u32 = 170;

struct Vms {
    script: PathBuf,
    work: PathBuf,
    env: Vec<(String, String)>,
}

impl Vms {
    /// The initramfs and the disk the VMs share (the script installs what
    /// it needs and fetches the kernel).
    fn prepare(s: &Session) -> Vms {
        let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let bin_dir = ckpt_bin().parent().unwrap().to_path_buf();
        let mut env = vec![
            ("CKPT_VM_BIN_DIR".to_string(), bin_dir.display().to_string()),
            ("CKPT_VM_PROGRAMS".to_string(), ckpt_tests::PROGRAMS_DIR.to_string()),
        ];
        // The kernel cache goes next to the binaries' target dir.
        if std::env::var_os("CKPT_VM_TARGET").is_none()
            && let Some(target) = bin_dir.parent()
        {
            env.push(("CKPT_VM_TARGET".into(), target.display().to_string()));
        }
        let vms = Vms { script: ws.join("tests/vm/run-machines.sh"), work: s.path("vm"), env };
        let t = Instant::now();
        // Bounds the installs and the kernel download too.
        let out = run_with_timeout(vms.cmd("prepare"), Duration::from_secs(900));
        assert!(out.status.success(), "run-machines.sh prepare failed ({}):\n{}{}", out.status, text(&out.stdout), text(&out.stderr));
        eprintln!("{}[vm_machines] VM prepared in {:.1} s", text(&out.stderr), t.elapsed().as_secs_f64());
        vms
    }

    fn cmd(&self, op: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(&self.script).arg(op).arg(&self.work);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Boots a guest; its console lines are the Proc's output (the Proc's
    /// child is qemu itself: dropping it powers the machine off).
    fn boot(&self, name: &str, params: &[(&str, String)]) -> Proc {
        let mut c = self.cmd("boot");
        for (k, v) in params {
            assert!(!v.contains(' '), "kernel parameter {k}={v} has a space");
            c.arg(format!("ckpt_{k}={v}"));
        }
        let mut vm = Proc::spawn(format!("VM {name}"), c);
        vm.wait_prefix("CKPT-VM: kernel", BOOT_TIMEOUT);
        vm
    }
}

/// `ckpt ARGS` with the S3 server's variables.
fn ckpt_s3(s: &Session, srv: &S3Server, args: &[&str]) -> Output {
    let mut c = Command::new(&s.ckpt);
    c.args(args).current_dir(&s.dir);
    srv.apply(&mut c, &s.path("s3-cache"));
    run_with_timeout(c, CMD_TIMEOUT)
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed ({}):\nstdout: {}\nstderr: {}", out.status, text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// The coordinator's log says `n` capture helpers joined so far.
fn wait_helpers(s: &Session, n: usize, vm: &mut Proc) {
    let deadline = Instant::now() + LINE_TIMEOUT * 2;
    while std::fs::read_to_string(s.path("coordinator.log")).unwrap_or_default().matches("capture helper joined").count() < n {
        vm.drain();
        assert!(
            Instant::now() < deadline,
            "the capture helper of {} did not join: {}\n{}",
            vm.what,
            std::fs::read_to_string(s.path("coordinator.log")).unwrap_or_default(),
            vm.context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the coordinator lists `n` processes; returns their hosts.
fn wait_processes(s: &Session, n: usize, vm: &mut Proc) -> Vec<String> {
    let deadline = Instant::now() + LINE_TIMEOUT * 2;
    loop {
        vm.drain();
        let out = s.run("status", &["--json"]);
        let v = Json::parse(&text(&out.stdout)).unwrap_or(Json::Null);
        let procs = v.get("processes").and_then(Json::as_array).cloned().unwrap_or_default();
        if procs.len() == n {
            return procs.iter().map(|p| p.get("host").and_then(Json::as_str).unwrap_or("").to_string()).collect();
        }
        assert!(Instant::now() < deadline, "the coordinator lists {} processes, not {n}: {}\n{}", procs.len(), text(&out.stdout), vm.context());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every `"dirty_tracking"` value in generation `g` of `ckpt log --json`.
fn trackings(g: &Json) -> Vec<String> {
    fn walk(j: &Json, out: &mut Vec<String>) {
        match j {
            Json::Obj(m) => {
                for (k, v) in m {
                    if k == "dirty_tracking" {
                        out.extend(v.as_str().map(str::to_string));
                    } else {
                        walk(v, out);
                    }
                }
            }
            Json::Arr(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(g, &mut out);
    out
}

#[test]
fn a_vm_is_a_machine_of_the_computation_and_a_fresh_vm_restarts_it() {
    if std::env::var_os("CKPT_SKIP_VM").is_some_and(|v| v == "1") {
        eprintln!("CKPT_SKIP_VM=1: VM machines test skipped");
        return;
    }
    let t0 = Instant::now();
    let mut s = Session::new("vm_machines");
    let vms = Vms::prepare(&s);
    let srv = S3Server::start();
    srv.create_bucket(BUCKET);
    s.store = format!("s3://{BUCKET}/vm");
    // The coordinator on loopback: qemu's user network takes the guests'
    // connections to 10.0.2.2 to this machine's 127.0.0.1.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    s.coord = format!("tcp:127.0.0.1:{port}");
    let log = std::fs::File::create(s.path("coordinator.log")).unwrap();
    let mut c = Command::new(&s.ckpt);
    c.args(["coordinator", "--daemonize", "--coord", &s.coord, "--store", &s.store])
        .current_dir(&s.dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    srv.apply(&mut c, &s.path("s3-cache"));
    assert!(c.status().unwrap().success(), "ckpt coordinator: {}", std::fs::read_to_string(s.path("coordinator.log")).unwrap_or_default());

    // The secret the coordinator made (this user's default file), carried
    // into each VM as an administrator copies it to each machine.
    let coordkey = std::fs::read_to_string(std::env::var_os("CKPT_SECRET_FILE").map(std::path::PathBuf::from).unwrap_or_else(|| "/root/.config/ckpt/coord.key".into()))
        .expect("the coordinator's secret file");
    let coordkey = coordkey.trim().to_string();
    // The store's key, as its owner takes it to each machine (`ckpt key
    // export` here, `ckpt key import` there): a machine without it can
    // neither read the sealed store nor write it.
    let exported = s.path("store.key");
    let mut c = Command::new(&s.ckpt);
    c.args(["key", "export", "--store", &s.store, exported.to_str().unwrap()]);
    srv.apply(&mut c, &s.path("s3-cache"));
    let out = c.output().unwrap();
    assert!(out.status.success(), "ckpt key export: {}", text(&out.stderr));
    let keyfile = std::fs::read_to_string(&exported).unwrap();
    let field = |name: &str| keyfile.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("no {name:?} line in the exported key")).to_string();
    let (store_id, store_key) = (field("store "), field("key "));
    let params = |role: &str, host: &str| -> Vec<(&'static str, String)> {
        vec![
            ("coordkey", coordkey.clone()),
            ("storeid", store_id.clone()),
            ("storekey", store_key.clone()),
            ("role", role.to_string()),
            ("host", host.to_string()),
            ("coord", format!("tcp:10.0.2.2:{port}")),
            ("store", s.store.clone()),
            ("s3", format!("http://10.0.2.2:{}", srv.port)),
            ("key", s3srv::KEY_ID.to_string()),
            ("secret", s3srv::SECRET.to_string()),
            ("limit", GUEST_LIMIT_S.to_string()),
        ]
    };

    // ---- vm1: launch, two checkpoints.
    let t = Instant::now();
    let mut vm1 = vms.boot("vm1", &params("launch", "vm1"));
    let up = vm1.wait_prefix("CKPT-VM: machine vm1 up", BOOT_TIMEOUT);
    eprintln!("[vm_machines] {up} ({:.1} s after qemu started)", t.elapsed().as_secs_f64());
    let pid: i32 = vm1.wait_prefix("PID ", LINE_TIMEOUT * 2)[4..].trim().parse().unwrap();
    vm1.wait_prefix("CKPT-VM: disk synced", LINE_TIMEOUT * 2);
    wait_helpers(&s, 1, &mut vm1);
    let hosts = wait_processes(&s, 1, &mut vm1);
    assert_eq!(hosts, ["vm1"], "the coordinator's process list");
    vm1.wait_ticks(2, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut vm1);
    let g2 = s.checkpoint_bounded(&mut vm1);
    let gens: Vec<Json> = match Json::parse(&ok(ckpt_s3(&s, &srv, &["log", "--json", "--store", &s.store]), "ckpt log --json")) {
        Ok(Json::Arr(a)) => a,
        other => panic!("ckpt log --json is not an array: {other:?}"),
    };
    let generation = |id: u64| gens.iter().find(|g| g.get("id").and_then(Json::as_u64) == Some(id)).unwrap_or_else(|| panic!("no generation {id} in ckpt log --json"));
    let (full, incr) = (generation(g1.id).u64_field("new_bytes"), generation(g2.id).u64_field("new_bytes"));
    let ms = |g: u64| generation(g).get("duration_ms").and_then(Json::as_f64).unwrap_or(-1.0);
    eprintln!("[vm_machines] generation {}: {full} new bytes in {} ms; generation {}: {incr} in {} ms", g1.id, ms(g1.id), g2.id, ms(g2.id));
    assert!(full >= 16 << 20, "the first checkpoint stored only {full} new bytes of a 16 MiB heap");
    assert!(incr * 3 < full, "the second checkpoint stored {incr} new bytes, the first {full}: not incremental\n{:?}\n{:?}", generation(g1.id), generation(g2.id));
    // The guest's 6.1 kernel has no userfaultfd WP_ASYNC: soft-dirty bits.
    for g in [g1.id, g2.id] {
        let t = trackings(generation(g));
        assert!(!t.is_empty() && t.iter().all(|t| t == "soft-dirty"), "dirty tracking of generation {g} on the 6.1 guest: {t:?}");
    }
    let out = ok(ckpt_s3(&s, &srv, &["log", "--store", &s.store]), "ckpt log");
    assert!(out.contains(&format!("{pid}@vm1")), "`ckpt log` does not show process {pid} on vm1:\n{out}");

    // ---- vm1 is gone (powered off, its processes with it).
    vm1.drain();
    let last = vm1.last_tick.unwrap();
    drop(vm1);
    // vm1's CLOCK_MONOTONIC never passed the time since its qemu started.
    // ckpt does not yet carry a process's monotonic clock to another
    // machine (no time namespace): vm2 restarts once its own clock is
    // past that, as docs/computations.md says a user must wait.
    let vm1_uptime = t.elapsed().as_secs() + 1;
    let mut vm2 = vms.boot("vm2", &{
        let mut p = params("restart", "vm2");
        p.push(("min_uptime", vm1_uptime.to_string()));
        p.push(("map", "vm1=vm2".into()));
        p.push(("gen", (g2.id + 1).to_string()));
        p
    });
    wait_processes(&s, 0, &mut vm2);

    // ---- vm2: restart, one more checkpoint, DONE.
    vm2.wait_prefix("CKPT-VM: machine vm2 up", BOOT_TIMEOUT);
    let first = vm2.wait_ticks(1, LINE_TIMEOUT * 3);
    eprintln!("[vm_machines] vm1 printed up to tick {last}; restarted on vm2 at tick {first} (generation {}: {}..={})", g2.id, g2.lo, g2.hi);
    assert!((g2.lo..=g2.hi).contains(&first) && first <= last + 1, "the restart continued at tick {first}, expected {}..={} (vm1 ended at {last})\n{}", g2.lo, g2.hi, vm2.context());
    wait_helpers(&s, 2, &mut vm2);
    let hosts = wait_processes(&s, 1, &mut vm2);
    assert_eq!(hosts, ["vm2"], "the coordinator's process list after the restart");
    vm2.wait_ticks(2, LINE_TIMEOUT);
    let g3 = s.checkpoint();
    assert_eq!(g3, g2.id + 1, "the checkpoint after the restart is not the next generation (the guest waits for {})", g2.id + 1);
    let out = ok(ckpt_s3(&s, &srv, &["log", "--store", &s.store]), "ckpt log");
    assert!(out.contains(&format!("{pid}@vm2")), "`ckpt log` does not show process {pid} on vm2:\n{out}");

    // The guest sees generation g3 in the store and stops the program.
    vm2.wait_line(|l| l == "DONE", LINE_TIMEOUT * 3);
    let verdict = vm2.wait_prefix("CKPT-VM-VERDICT:", LINE_TIMEOUT);
    assert_eq!(verdict, "CKPT-VM-VERDICT: PASS", "{}", vm2.context());
    vm2.wait_exit(LINE_TIMEOUT); // powered off
    let out = ckpt_s3(&s, &srv, &["verify", "--all", "--store", &s.store]);
    ok(out, "ckpt verify --all");
    eprintln!("[vm_machines] passed in {:.1} s", t0.elapsed().as_secs_f64());
}
